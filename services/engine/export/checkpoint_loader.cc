#include "services/engine/export/checkpoint_loader.h"

#include <filesystem>
#include <map>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/engine/export/abq_checkpoint.h"
#include "services/engine/export/gptq_pack.h"

namespace qcal::engine {
namespace fs = std::filesystem;

namespace {

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON: ", e.what()));
  }
}

// The string under `key` of a JSON object, `fallback` when absent; an error naming the key when
// it is there but not a string (nlohmann's value() would throw).
absl::StatusOr<std::string> StringOr(const nlohmann::json& j, const char* key,
                                     const std::string& fallback, const std::string& source) {
  if (!j.contains(key)) return fallback;
  if (!j[key].is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": key \"", key, "\" must be a string"));
  }
  return j[key].get<std::string>();
}

absl::StatusOr<Tensor> ReadTyped(const CheckpointReader& reader, const std::string& name,
                                 DType dtype, const Shape& shape) {
  QCAL_ASSIGN_OR_RETURN(Tensor t, reader.Get(name));
  if (t.dtype() != dtype || t.shape() != shape) {
    QCAL_ASSIGN_OR_RETURN(std::string file, reader.FileOf(name));
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor \"", name, "\" is ",
                                                   t.DebugString(), ", expected ", DTypeName(dtype),
                                                   ShapeString(shape)));
  }
  return t;
}

// Dequantizes one GPTQ v1 linear: W[o][i] = scale[g][o] · (q[o][i] − z[g][o]), g = g_idx[i].
absl::StatusOr<Tensor> DequantizeGptq(const CheckpointReader& reader, const std::string& prefix,
                                      int64_t d_out, int64_t d_in, int bits) {
  if (!reader.Has(prefix + ".qweight")) {
    // Unquantized linears may remain in a GPTQ checkpoint.
    return reader.GetF32(prefix + ".weight", {d_out, d_in});
  }
  const int64_t in_words = (d_in + 31) / 32 * bits;
  const int64_t out_words = (d_out + 31) / 32 * bits;
  QCAL_ASSIGN_OR_RETURN(Tensor qweight,
                        ReadTyped(reader, prefix + ".qweight", DType::kI32, {in_words, d_out}));
  QCAL_ASSIGN_OR_RETURN(Tensor g_idx, ReadTyped(reader, prefix + ".g_idx", DType::kI32, {d_in}));
  QCAL_ASSIGN_OR_RETURN(Tensor scales_raw, reader.Get(prefix + ".scales"));
  if (scales_raw.rank() != 2 || scales_raw.dim(1) != d_out) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, ".scales has shape ",
                                                   ShapeString(scales_raw.shape()),
                                                   ", expected [n_groups, ", d_out, "]"));
  }
  const int64_t n_groups = scales_raw.dim(0);
  QCAL_ASSIGN_OR_RETURN(Tensor scales, scales_raw.ToF32());
  QCAL_ASSIGN_OR_RETURN(Tensor qzeros,
                        ReadTyped(reader, prefix + ".qzeros", DType::kI32, {n_groups, out_words}));
  QCAL_ASSIGN_OR_RETURN(
      std::vector<int32_t> codes,
      UnpackQweight(std::span<const int32_t>(qweight.data<int32_t>(), qweight.numel()), d_out, d_in,
                    bits));
  QCAL_ASSIGN_OR_RETURN(
      std::vector<int32_t> zeros,
      UnpackQzeros(std::span<const int32_t>(qzeros.data<int32_t>(), qzeros.numel()), n_groups,
                   d_out, bits));
  const int32_t* gi = g_idx.data<int32_t>();
  for (int64_t i = 0; i < d_in; ++i) {
    if (gi[i] < 0 || gi[i] >= n_groups) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, ".g_idx[", i, "] = ", gi[i], " is outside [0, ", n_groups, ")"));
    }
  }
  Tensor w = Tensor::ZerosMapped(DType::kF32, {d_out, d_in});
  float* wp = w.data<float>();
  const float* sp = scales.data<float>();
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t i = 0; i < d_in; ++i) {
      const int64_t g = gi[i];
      wp[o * d_in + i] =
          sp[g * d_out + o] * static_cast<float>(codes[o * d_in + i] - zeros[g * d_out + o]);
    }
  }
  return w;
}

}  // namespace

absl::StatusOr<CheckpointQuantization> ReadCheckpointQuantization(const std::string& dir) {
  const std::string config_path = (fs::path(dir) / "config.json").string();
  QCAL_ASSIGN_OR_RETURN(nlohmann::json config, ReadJson(config_path));
  nlohmann::json qc;
  std::string source = config_path;
  if (config.is_object() && config.contains("quantization_config") &&
      !config["quantization_config"].is_null()) {
    qc = config["quantization_config"];
  } else {
    const std::string qpath = (fs::path(dir) / "quantize_config.json").string();
    if (!fs::exists(qpath)) return CheckpointQuantization{};
    QCAL_ASSIGN_OR_RETURN(qc, ReadJson(qpath));
    source = qpath;
  }
  if (!qc.is_object())
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": quantization config is not an object"));
  CheckpointQuantization q;
  // quantize_config.json written by AutoGPTQ may omit quant_method; it is GPTQ then.
  QCAL_ASSIGN_OR_RETURN(q.quant_method, StringOr(qc, "quant_method", "gptq", source));
  if (q.quant_method != "gptq" && q.quant_method != "qcal_fake") {
    return absl::InvalidArgumentError(absl::StrCat(source, ": unsupported quant_method \"",
                                                   q.quant_method,
                                                   "\" (supported: gptq, qcal_fake)"));
  }
  if (q.quant_method == "gptq") {
    QCAL_ASSIGN_OR_RETURN(const std::string format,
                          StringOr(qc, "checkpoint_format", "gptq", source));
    if (format != "gptq") {
      return absl::InvalidArgumentError(absl::StrCat(source, ": unsupported checkpoint_format \"",
                                                     format,
                                                     "\" (only GPTQ v1, \"gptq\", is supported)"));
    }
    if (!qc.contains("bits") || !qc["bits"].is_number_integer()) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": missing integer key \"bits\""));
    }
    q.bits = qc["bits"].get<int>();
    if (q.bits != 2 && q.bits != 3 && q.bits != 4 && q.bits != 8) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": GPTQ bits must be 2, 3, 4 or 8, got ", q.bits));
    }
  } else if (qc.contains("bits") && qc["bits"].is_number_integer()) {
    q.bits = qc["bits"].get<int>();
  }
  if (qc.contains("group_size") && qc["group_size"].is_number_integer())
    q.group_size = qc["group_size"].get<int>();
  if (qc.contains("qcal") && qc["qcal"].is_object() && qc["qcal"].contains("activation_bits") &&
      qc["qcal"]["activation_bits"].is_number_integer()) {
    q.activation_bits = qc["qcal"]["activation_bits"].get<int>();
  }
  if (qc.contains("qcal") && qc["qcal"].is_object() && qc["qcal"].contains("grid")) {
    const nlohmann::json& grid = qc["qcal"]["grid"];
    if (!grid.is_string() || (grid != "uniform" && grid != "cuberoot" && grid != "balanced")) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": qcal.grid must be \"uniform\", \"cuberoot\" or \"balanced\", got ",
          grid.dump()));
    }
    q.grid = grid.get<std::string>();
  }
  if (q.quant_method == "gptq" && q.grid == "cuberoot") {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": qcal.grid \"cuberoot\" cannot be stored as GPTQ (it is a qcal_fake export)"));
  }
  if (q.quant_method == "gptq" && q.grid == "balanced" && q.bits != 3) {
    return absl::InvalidArgumentError(absl::StrCat(
        source, ": qcal.grid \"balanced\" is stored as 3-bit codes (bits 3), got bits ", q.bits));
  }
  return q;
}

namespace {

// A PEFT LoRA adapter (DESIGN section 5), validated at open and installed block by block.
class LoraAdapter {
 public:
  static absl::StatusOr<std::unique_ptr<LoraAdapter>> Open(const std::string& adapter_dir,
                                                           const ModelConfig& config) {
    auto a = std::unique_ptr<LoraAdapter>(new LoraAdapter());
    a->config_path_ = (fs::path(adapter_dir) / "adapter_config.json").string();
    a->weights_path_ = (fs::path(adapter_dir) / "adapter_model.safetensors").string();
    QCAL_ASSIGN_OR_RETURN(nlohmann::json cfg, ReadJson(a->config_path_));
    if (!cfg.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(a->config_path_, ": not a JSON object"));
    }
    QCAL_ASSIGN_OR_RETURN(const std::string peft_type,
                          StringOr(cfg, "peft_type", "", a->config_path_));
    if (peft_type != "LORA") {
      return absl::InvalidArgumentError(
          absl::StrCat(a->config_path_, ": peft_type must be \"LORA\""));
    }
    QCAL_RETURN_IF_ERROR(a->Number(cfg.value("r", nlohmann::json()), "r", &a->r_));
    QCAL_RETURN_IF_ERROR(
        a->Number(cfg.value("lora_alpha", nlohmann::json()), "lora_alpha", &a->alpha_));
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      if (cfg.contains(key) && !cfg[key].is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(a->config_path_, ": \"", key, "\" must be an object"));
      }
    }
    a->rank_pattern_ = cfg.value("rank_pattern", nlohmann::json::object());
    a->alpha_pattern_ = cfg.value("alpha_pattern", nlohmann::json::object());
    QCAL_ASSIGN_OR_RETURN(a->file_, SafetensorsFile::Open(a->weights_path_));
    std::map<std::string, std::pair<int, LinearKind>> linears;
    for (int b = 0; b < config.num_layers; ++b) {
      for (LinearKind k : kAllLinears) linears[LinearPrefix(b, k)] = {b, k};
    }
    const std::string head = "base_model.model.";
    const std::string a_tail = ".lora_A.weight", b_tail = ".lora_B.weight";
    for (const auto& tensor : a->file_->tensors()) {
      const std::string& name = tensor.first;  // not a structured binding: clang 14 captures none
      auto ends_with = [&](const std::string& tail) {
        return name.size() > tail.size() &&
               name.compare(name.size() - tail.size(), tail.size(), tail) == 0;
      };
      const bool is_a = ends_with(a_tail), is_b = ends_with(b_tail);
      if (name.rfind(head, 0) != 0 || (!is_a && !is_b)) {
        return absl::InvalidArgumentError(
            absl::StrCat(a->weights_path_, ": unexpected tensor \"", name, "\""));
      }
      const std::string prefix =
          name.substr(head.size(), name.size() - head.size() - a_tail.size());
      auto it = linears.find(prefix);
      if (it == linears.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(a->weights_path_, ": \"", prefix, "\" is not a linear of the model"));
      }
      Entry& e = a->entries_[it->second.first][it->second.second];
      (is_a ? e.a_name : e.b_name) = name;
    }
    for (const auto& [b, kinds] : a->entries_) {
      for (const auto& [k, e] : kinds) {
        if (e.a_name.empty() || e.b_name.empty()) {
          return absl::InvalidArgumentError(absl::StrCat(a->weights_path_, ": ", LinearPrefix(b, k),
                                                         " has only ",
                                                         e.a_name.empty() ? "lora_B" : "lora_A"));
        }
      }
    }
    return a;
  }

  // Adds the low-rank branches of block b's listed linears to `w` (on `backend`).
  absl::Status Install(int b, BlockWeights& w, kernels::Backend& backend) const {
    auto it = entries_.find(b);
    if (it == entries_.end()) return absl::OkStatus();
    for (const auto& [k, e] : it->second) {
      const std::string prefix = LinearPrefix(b, k);
      QCAL_ASSIGN_OR_RETURN(Tensor la_raw, file_->Get(e.a_name));
      QCAL_ASSIGN_OR_RETURN(Tensor lb_raw, file_->Get(e.b_name));
      QCAL_ASSIGN_OR_RETURN(Tensor la, la_raw.ToF32());  // L_B [r, d_in]
      QCAL_ASSIGN_OR_RETURN(Tensor lb, lb_raw.ToF32());  // L_A [d_out, r]
      Linear& lin = w.at(k);
      const int64_t d_out = lin.d_out(), d_in = lin.d_in();
      if (la.rank() != 2 || lb.rank() != 2 || la.dim(1) != d_in || lb.dim(0) != d_out ||
          la.dim(0) != lb.dim(1) || la.dim(0) < 1) {
        return absl::InvalidArgumentError(absl::StrCat(
            weights_path_, ": ", prefix, " lora_A ", ShapeString(la.shape()), " and lora_B ",
            ShapeString(lb.shape()), " do not fit a [", d_out, ", ", d_in, "] linear"));
      }
      double rank = r_, alpha = alpha_;
      if (rank_pattern_.contains(prefix)) {
        QCAL_RETURN_IF_ERROR(Number(rank_pattern_[prefix], "rank_pattern." + prefix, &rank));
      }
      if (alpha_pattern_.contains(prefix)) {
        QCAL_RETURN_IF_ERROR(Number(alpha_pattern_[prefix], "alpha_pattern." + prefix, &alpha));
      }
      if (rank != static_cast<double>(la.dim(0))) {
        return absl::InvalidArgumentError(absl::StrCat(config_path_, ": rank of ", prefix, " is ",
                                                       rank, " but its factors have rank ",
                                                       la.dim(0)));
      }
      const float scale = static_cast<float>(alpha / rank);
      if (scale != 1.0f) {
        float* p = lb.data<float>();
        for (int64_t i = 0; i < lb.numel(); ++i) p[i] *= scale;
      }
      QCAL_ASSIGN_OR_RETURN(lin.lora_b, backend.ToDevice(la));
      QCAL_ASSIGN_OR_RETURN(lin.lora_a, backend.ToDevice(lb));
    }
    return absl::OkStatus();
  }

 private:
  struct Entry {
    std::string a_name, b_name;  // tensor names of lora_A and lora_B
  };
  LoraAdapter() = default;
  absl::Status Number(const nlohmann::json& j, const std::string& key, double* out) const {
    if (!j.is_number() || !(j.get<double>() > 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_path_, ": \"", key, "\" must be a positive number"));
    }
    *out = j.get<double>();
    return absl::OkStatus();
  }

  std::string config_path_, weights_path_;
  double r_ = 0, alpha_ = 0;
  nlohmann::json rank_pattern_, alpha_pattern_;
  std::unique_ptr<SafetensorsFile> file_;
  std::map<int, std::map<LinearKind, Entry>> entries_;  // block -> linear -> tensors
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> LoadCheckpoint(const std::string& dir,
                                                      kernels::Backend* backend,
                                                      const LoadOptions& options) {
  QCAL_ASSIGN_OR_RETURN(CheckpointQuantization q, ReadCheckpointQuantization(dir));
  const int act_bits = options.act_bits != 0 ? options.act_bits : q.activation_bits;
  if (act_bits != 16 && (act_bits < 4 || act_bits > 8)) {
    return absl::InvalidArgumentError(
        absl::StrCat(options.act_bits != 0 ? std::string("--act-bits") : dir + "/config.json",
                     ": activation bits must be 16 (off) or 4..8, got ", act_bits));
  }
  if (act_bits < 16 && !backend->SupportsOp(kernels::Op::kActQuant)) {
    return absl::UnimplementedError(absl::StrCat("activation quantization is not supported by the ",
                                                 backend->name(), " backend"));
  }
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  std::shared_ptr<LoraAdapter> adapter;
  const fs::path adapter_dir = fs::path(dir) / "adapter";
  if (fs::exists(adapter_dir / "adapter_config.json")) {
    if (config.moe()) {
      return absl::UnimplementedError(absl::StrCat(adapter_dir.string(),
                                                   ": adapters on a mixture-of-experts model (",
                                                   config.model_type, ") are not supported yet"));
    }
    QCAL_ASSIGN_OR_RETURN(adapter, LoraAdapter::Open(adapter_dir.string(), config));
  }
  ModelLoadOptions mo;
  mo.residency = options.residency;
  if (options.abq_kernel.has_value()) {
    AbqInferenceOptions ao;
    ao.kernel = *options.abq_kernel;
    ao.act_bits = options.act_bits;
    QCAL_ASSIGN_OR_RETURN(AbqInferencePlan plan, PlanAbqInference(dir, ao));
    const kernels::AbqSpec spec = plan.spec;
    mo.linear_pack = [spec](const CheckpointReader& reader, const std::string& prefix,
                            int64_t d_out, int64_t d_in) {
      return ReadAbqLinear(reader, prefix, d_out, d_in, spec);
    };
    mo.abq_kernel = plan.kernel;
  }
  if (q.quant_method == "gptq") {
    const int bits = q.bits;
    mo.linear_weight = [bits](const CheckpointReader& reader, const std::string& prefix,
                              int64_t d_out, int64_t d_in) {
      return DequantizeGptq(reader, prefix, d_out, d_in, bits);
    };
  }
  mo.on_block_loaded = [adapter, act_bits, backend, config](int b,
                                                            BlockWeights& w) -> absl::Status {
    if (adapter) QCAL_RETURN_IF_ERROR(adapter->Install(b, w, *backend));
    for (const LinearId& id : BlockLinears(config, b)) w.at(id).act_bits = act_bits;
    return absl::OkStatus();
  };
  return Model::Load(dir, backend, mo);
}

absl::Status LoadLoraAdapter(const std::string& adapter_dir, Model& model) {
  QCAL_ASSIGN_OR_RETURN(auto adapter, LoraAdapter::Open(adapter_dir, model.config()));
  for (int b = 0; b < model.num_blocks(); ++b) {
    if (!model.resident(b)) {
      return absl::FailedPreconditionError(
          absl::StrCat("LoadLoraAdapter: block ", b, " is not loaded"));
    }
    QCAL_RETURN_IF_ERROR(adapter->Install(b, model.block(b), model.backend()));
  }
  return absl::OkStatus();
}

}  // namespace qcal::engine
