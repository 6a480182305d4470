#include "services/engine/export/checkpoint_writer.h"

#include <cstring>
#include <filesystem>
#include <set>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "services/engine/export/gptq_pack.h"

namespace qcal::engine {
namespace fs = std::filesystem;

bool IsGptqExportable(const Recipe& recipe) {
  const int b = recipe.weights.bits;
  return recipe.weights.grid == kernels::GridKind::kUniform &&
         (b == 2 || b == 3 || b == 4 || b == 8);
}

nlohmann::ordered_json QuantizationConfig(const Recipe& recipe) {
  nlohmann::ordered_json q;
  q["quant_method"] = IsGptqExportable(recipe) ? "gptq" : "qcal_fake";
  q["bits"] = recipe.weights.bits;
  q["group_size"] = recipe.weights.group_size;
  q["desc_act"] = recipe.method == QuantMethod::kGptq && recipe.gptq.act_order;
  q["sym"] = recipe.weights.symmetric;
  q["damp_percent"] = recipe.gptq.damp;
  q["true_sequential"] = recipe.gptq.true_sequential;
  q["static_groups"] = false;
  if (IsGptqExportable(recipe)) {
    q["checkpoint_format"] = "gptq";
  } else {
    q["grid"] = std::string(RecipeName(recipe.weights.grid));
  }
  q["qcal"] = {{"activation_bits", recipe.activations.bits}, {"recipe_sha256", recipe.Sha256()}};
  return q;
}

namespace {

Tensor I32Tensor(const std::vector<int32_t>& v, Shape shape) {
  Tensor t = Tensor::Zeros(DType::kI32, std::move(shape));
  std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

absl::Status AddGptqTensors(const std::string& name, const QuantizedLinear& q, int bits,
                            std::map<std::string, Tensor>& out) {
  QCAL_ASSIGN_OR_RETURN(std::vector<int32_t> qweight, PackQweight(q.codes, q.d_out, q.d_in, bits));
  QCAL_ASSIGN_OR_RETURN(std::vector<int32_t> qzeros,
                        PackQzeros(q.zeros, q.n_groups, q.d_out, bits));
  const int64_t in_words = (q.d_in + 31) / 32 * bits;
  const int64_t out_words = (q.d_out + 31) / 32 * bits;
  out[name + ".qweight"] = I32Tensor(qweight, {in_words, q.d_out});
  out[name + ".qzeros"] = I32Tensor(qzeros, {q.n_groups, out_words});
  Tensor scales = Tensor::Zeros(DType::kF16, {q.n_groups, q.d_out});
  uint16_t* sp = scales.data<uint16_t>();
  for (size_t i = 0; i < q.scales.size(); ++i) sp[i] = FloatToHalf(q.scales[i]);
  out[name + ".scales"] = scales;
  out[name + ".g_idx"] = I32Tensor(q.g_idx, {q.d_in});
  return absl::OkStatus();
}

absl::Status CopySmallFiles(const std::string& source_dir, const std::string& dir) {
  for (const char* f : {"tokenizer.model", "generation_config.json", "tokenizer_config.json",
                        "special_tokens_map.json"}) {
    const fs::path src = fs::path(source_dir) / f;
    if (!fs::exists(src)) continue;
    QCAL_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(src.string()));
    QCAL_RETURN_IF_ERROR(WriteStringToFile((fs::path(dir) / f).string(), bytes));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteQuantizedCheckpoint(const std::string& source_dir, const std::string& dir,
                                      const Recipe& recipe,
                                      const std::map<std::string, QuantizedLinear>& quantized,
                                      const CheckpointExtras& extras) {
  QCAL_ASSIGN_OR_RETURN(auto reader, CheckpointReader::Open(source_dir));
  for (const auto& [name, t] : extras.replaced) {
    if (!reader->Has(name)) {
      return absl::InternalError(
          absl::StrCat("replaced tensor ", name, " is not in the source checkpoint"));
    }
  }
  for (const auto& [name, a] : extras.adapters) {
    if (!quantized.count(name)) {
      return absl::InternalError(absl::StrCat("adapter for ", name, ", not a quantized linear"));
    }
  }
  const bool gptq = IsGptqExportable(recipe);
  std::map<std::string, Tensor> tensors;
  for (const std::string& name : reader->Names()) {
    const std::string suffix = ".weight";
    if (name.size() > suffix.size() &&
        name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0) {
      const std::string prefix = name.substr(0, name.size() - suffix.size());
      auto it = quantized.find(prefix);
      if (it != quantized.end()) {
        const QuantizedLinear& q = it->second;
        if (gptq) {
          QCAL_RETURN_IF_ERROR(AddGptqTensors(prefix, q, recipe.weights.bits, tensors));
        } else {
          tensors[name] = Tensor::FromVector(q.Dequantized(), {q.d_out, q.d_in});
        }
        continue;
      }
    }
    auto replaced = extras.replaced.find(name);
    if (replaced != extras.replaced.end()) {
      QCAL_ASSIGN_OR_RETURN(TensorInfo info, reader->Info(name));
      QCAL_ASSIGN_OR_RETURN(Tensor converted, replaced->second.ConvertTo(info.dtype));
      QCAL_ASSIGN_OR_RETURN(Tensor back, converted.ToF32());
      if (back.shape() != info.shape ||
          std::memcmp(back.raw(), replaced->second.raw(), back.numel() * sizeof(float)) != 0) {
        return absl::InternalError(
            absl::StrCat("replaced tensor ", name, " is not exactly ", DTypeName(info.dtype)));
      }
      tensors[name] = std::move(converted);
      continue;
    }
    QCAL_ASSIGN_OR_RETURN(tensors[name], reader->Get(name));
  }
  for (const auto& [prefix, q] : quantized) {
    if (!reader->Has(prefix + ".weight")) {
      return absl::InternalError(
          absl::StrCat("quantized linear ", prefix, " is not in the source checkpoint"));
    }
  }
  QCAL_RETURN_IF_ERROR(WriteSafetensors((fs::path(dir) / "model.safetensors").string(), tensors,
                                        {{"format", "pt"}}));

  const std::string config_path = (fs::path(source_dir) / "config.json").string();
  QCAL_ASSIGN_OR_RETURN(std::string config_text, ReadFileToString(config_path));
  nlohmann::ordered_json config;
  try {
    config = nlohmann::ordered_json::parse(config_text);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(config_path, ": malformed JSON: ", e.what()));
  }
  const nlohmann::ordered_json qc = QuantizationConfig(recipe);
  config["quantization_config"] = qc;
  if (!gptq) config["torch_dtype"] = "float32";
  if (config.contains("dtype") && !gptq) config["dtype"] = "float32";
  QCAL_RETURN_IF_ERROR(
      WriteStringToFile((fs::path(dir) / "config.json").string(), config.dump(2) + "\n"));
  QCAL_RETURN_IF_ERROR(
      WriteStringToFile((fs::path(dir) / "quantize_config.json").string(), qc.dump(2) + "\n"));
  if (!extras.adapters.empty()) {
    QCAL_RETURN_IF_ERROR(WriteLoraAdapter((fs::path(dir) / "adapter").string(), extras.adapters));
  }
  return CopySmallFiles(source_dir, dir);
}

absl::Status WriteLoraAdapter(const std::string& dir,
                              const std::map<std::string, LowRankAdapter>& adapters) {
  std::map<int64_t, int> count;
  std::set<std::string> modules;
  std::map<std::string, Tensor> tensors;
  for (const auto& [name, ad] : adapters) {
    if (ad.a.rank() != 2 || ad.b.rank() != 2 || ad.a.dim(1) != ad.b.dim(0) ||
        ad.a.dtype() != DType::kF32 || ad.b.dtype() != DType::kF32) {
      return absl::InternalError(absl::StrCat("adapter ", name, ": factors ", ad.a.DebugString(),
                                              " and ", ad.b.DebugString()));
    }
    ++count[ad.a.dim(1)];
    modules.insert(name.substr(name.rfind('.') + 1));
    tensors["base_model.model." + name + ".lora_A.weight"] = ad.b;
    tensors["base_model.model." + name + ".lora_B.weight"] = ad.a;
  }
  int64_t r = 0;
  int best = 0;
  for (const auto& [rank, n] : count) {
    if (n >= best) {
      best = n;
      r = rank;
    }
  }
  nlohmann::ordered_json rank_pattern = nlohmann::ordered_json::object();
  nlohmann::ordered_json alpha_pattern = nlohmann::ordered_json::object();
  for (const auto& [name, ad] : adapters) {
    if (ad.a.dim(1) == r) continue;
    rank_pattern[name] = ad.a.dim(1);
    alpha_pattern[name] = ad.a.dim(1);
  }
  nlohmann::ordered_json cfg;
  cfg["peft_type"] = "LORA";
  cfg["task_type"] = "CAUSAL_LM";
  cfg["r"] = r;
  cfg["lora_alpha"] = r;
  cfg["target_modules"] = std::vector<std::string>(modules.begin(), modules.end());
  cfg["lora_dropout"] = 0;
  cfg["bias"] = "none";
  cfg["base_model_name_or_path"] = "..";
  if (!rank_pattern.empty()) {
    cfg["rank_pattern"] = rank_pattern;
    cfg["alpha_pattern"] = alpha_pattern;
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": ", ec.message()));
  QCAL_RETURN_IF_ERROR(WriteSafetensors((fs::path(dir) / "adapter_model.safetensors").string(),
                                        tensors, {{"format", "pt"}}));
  return WriteStringToFile((fs::path(dir) / "adapter_config.json").string(), cfg.dump(2) + "\n");
}

}  // namespace qcal::engine
