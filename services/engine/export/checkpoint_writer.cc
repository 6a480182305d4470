#include "services/engine/export/checkpoint_writer.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <future>
#include <limits>
#include <memory>
#include <set>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/safetensors_writer.h"
#include "common/status.h"
#include "kernels/quant_grid.h"
#include "nlohmann/json.hpp"
#include "services/engine/export/gptq_pack.h"
#include "services/engine/model.h"

namespace qcal::engine {
namespace fs = std::filesystem;

bool IsGptqExportable(const Recipe& recipe) {
  const int b = recipe.weights.bits;
  if (recipe.weights.grid == kernels::GridKind::kBalanced) return b == 2;  // stored as 3-bit codes
  return recipe.weights.grid == kernels::GridKind::kUniform &&
         (b == 2 || b == 3 || b == 4 || b == 8);
}

nlohmann::ordered_json QuantizationConfig(const Recipe& recipe) {
  nlohmann::ordered_json q;
  q["quant_method"] = IsGptqExportable(recipe) ? "gptq" : "qcal_fake";
  // The stored code width: 3 for the balanced grid, whose codes 0..4 any 3-bit reader dequantizes.
  q["bits"] = kernels::CodeBits(SpecOf(recipe));
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
  q["qcal"] = {{"activation_bits", recipe.activations.bits},
               {"recipe_sha256", recipe.Sha256()},
               {"grid", std::string(RecipeName(recipe.weights.grid))}};
  return q;
}

absl::Status ExportOptions::Validate() const {
  if (shard_size < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ExportOptions.shard_size must be at least 1 byte, got ", shard_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParseByteSize(const std::string& text) {
  auto error = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("byte size \"", text, "\": ", why));
  };
  const absl::string_view s = absl::StripAsciiWhitespace(text);
  size_t i = 0;
  auto digits = [&]() {
    const size_t start = i;
    while (i < s.size() && absl::ascii_isdigit(static_cast<unsigned char>(s[i]))) ++i;
    return s.substr(start, i - start);
  };
  const absl::string_view whole = digits();
  absl::string_view fraction;
  const bool has_point = i < s.size() && s[i] == '.';
  if (has_point) {
    ++i;
    fraction = digits();
  }
  if (whole.empty() || (has_point && fraction.empty())) {
    return error("expected a number such as 4GiB, 500MB or 1048576");
  }
  const std::string unit = absl::AsciiStrToLower(absl::StripLeadingAsciiWhitespace(s.substr(i)));
  static const std::map<std::string, int64_t>* const kUnits =
      new std::map<std::string, int64_t>{{"", 1},
                                         {"b", 1},
                                         {"kb", 1000},
                                         {"mb", 1000 * 1000},
                                         {"gb", 1000 * 1000 * 1000},
                                         {"tb", 1000ll * 1000 * 1000 * 1000},
                                         {"kib", 1ll << 10},
                                         {"mib", 1ll << 20},
                                         {"gib", 1ll << 30},
                                         {"tib", 1ll << 40}};
  auto u = kUnits->find(unit);
  if (u == kUnits->end()) {
    return error(
        absl::StrCat("unknown unit \"", unit, "\" (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"));
  }
  const int64_t mult = u->second;
  if (!fraction.empty() && mult == 1) return error("a fraction of a byte");
  if (whole.size() > 19 || fraction.size() > 18) return error("too many digits");
  // 128-bit arithmetic: whole < 10^19 and mult <= 2^40 cannot overflow it.
  __int128 bytes = 0;
  for (char c : whole) bytes = bytes * 10 + (c - '0');
  bytes *= mult;
  __int128 frac = 0, denom = 1;
  for (char c : fraction) {
    frac = frac * 10 + (c - '0');
    denom *= 10;
  }
  bytes += frac * mult / denom;
  if (bytes > std::numeric_limits<int64_t>::max()) return error("more than 2^63 - 1 bytes");
  if (bytes < 1) return error("must be at least 1 byte");
  return static_cast<int64_t>(bytes);
}

namespace {

constexpr char kEmbedTokens[] = "model.embed_tokens.weight";
constexpr char kAdapterPrefix[] = "base_model.model.";

// The block of a tensor named "model.layers.{b}.…", or -1 for any other name.
int BlockOf(absl::string_view name) {
  if (!absl::ConsumePrefix(&name, "model.layers.")) return -1;
  const size_t dot = name.find('.');
  if (dot == absl::string_view::npos || dot == 0 || dot > 9 || (name[0] == '0' && dot > 1)) {
    return -1;
  }
  int b = 0;
  for (size_t i = 0; i < dot; ++i) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(name[i]))) return -1;
    b = b * 10 + (name[i] - '0');
  }
  return b;
}

std::string BlockPrefix(int b) { return absl::StrCat("model.layers.", b, "."); }

// Where the bytes of one planned tensor come from.
enum class Source {
  kCopy,     // the source tensor of that name (or the block's replacement of it)
  kQweight,  // GPTQ tensors of the linear `key`
  kQzeros,
  kScales,
  kGIdx,
  kFakeWeight,  // the dequantized fp32 weight of the linear `key`
  kLoraA,       // adapter factors of the linear `key`
  kLoraB,
};

struct PlanItem {
  PlannedTensor tensor;
  Source source = Source::kCopy;
  std::string key;  // the linear's name, for every source but kCopy
};

struct LinearPlan {
  int64_t d_out = 0;
  int64_t d_in = 0;
  int64_t n_groups = 0;
};

struct BlockPlan {
  std::vector<PlanItem> model;    // sorted by name
  std::vector<PlanItem> adapter;  // sorted by name
  std::map<std::string, LinearPlan> linears;
  std::map<std::string, int64_t> ranks;
  std::set<std::string> copied;  // source tensors of the block written as they are (or replaced)
};

struct ExportPlan {
  std::vector<PlanItem> head;  // the embeddings
  std::vector<BlockPlan> blocks;
  std::vector<PlanItem> tail;  // every other source tensor, sorted
};

void SortByName(std::vector<PlanItem>& items) {
  std::sort(items.begin(), items.end(),
            [](const PlanItem& a, const PlanItem& b) { return a.tensor.name < b.tensor.name; });
}

absl::StatusOr<ExportPlan> MakePlan(const CheckpointReader& reader, const std::string& source_dir,
                                    const ModelConfig& config, const Recipe& recipe, int num_blocks,
                                    const std::map<std::string, int64_t>& adapter_ranks) {
  const bool gptq = IsGptqExportable(recipe);
  const QuantSpec spec = SpecOf(recipe);
  const int bits = kernels::CodeBits(spec);
  ExportPlan plan;
  plan.blocks.resize(num_blocks);
  std::set<std::string> quantized_weights;
  for (int b = 0; b < num_blocks; ++b) {
    BlockPlan& bp = plan.blocks[b];
    // Every quantized linear: a dense block's seven, or an MoE block's attention linears and every
    // expert's gate/up/down (the router and shared_expert_gate are copied as they are).
    for (const LinearId& id : BlockLinears(config, b)) {
      const std::string prefix = LinearPrefix(config, b, id);
      const std::string weight = prefix + ".weight";
      if (!reader.Has(weight)) {
        return absl::InvalidArgumentError(absl::StrCat(
            source_dir, ": the source checkpoint has no tensor ", weight, " (block ", b, ")"));
      }
      QCAL_ASSIGN_OR_RETURN(TensorInfo info, reader.Info(weight));
      if (info.shape.size() != 2) {
        return absl::InvalidArgumentError(absl::StrCat(source_dir, ": ", weight, " has shape ",
                                                       ShapeString(info.shape), ", not 2-D"));
      }
      const LinearPlan lp{info.shape[0], info.shape[1], kernels::NumGroups(spec, info.shape[1])};
      bp.linears[prefix] = lp;
      quantized_weights.insert(weight);
      if (gptq) {
        bp.model.push_back(
            {{prefix + ".qweight", DType::kI32, {PackedLength(lp.d_in, bits), lp.d_out}},
             Source::kQweight,
             prefix});
        bp.model.push_back(
            {{prefix + ".qzeros", DType::kI32, {lp.n_groups, PackedLength(lp.d_out, bits)}},
             Source::kQzeros,
             prefix});
        bp.model.push_back(
            {{prefix + ".scales", DType::kF16, {lp.n_groups, lp.d_out}}, Source::kScales, prefix});
        bp.model.push_back({{prefix + ".g_idx", DType::kI32, {lp.d_in}}, Source::kGIdx, prefix});
      } else {
        bp.model.push_back(
            {{weight, DType::kF32, {lp.d_out, lp.d_in}}, Source::kFakeWeight, prefix});
      }
    }
  }
  for (const std::string& name : reader.Names()) {
    if (quantized_weights.count(name)) continue;
    QCAL_ASSIGN_OR_RETURN(TensorInfo info, reader.Info(name));
    PlanItem item{{name, info.dtype, info.shape}, Source::kCopy, ""};
    const int b = BlockOf(name);
    if (name == kEmbedTokens) {
      plan.head.push_back(std::move(item));
    } else if (b >= 0 && b < num_blocks) {
      plan.blocks[b].copied.insert(name);
      plan.blocks[b].model.push_back(std::move(item));
    } else {
      plan.tail.push_back(std::move(item));
    }
  }
  for (const auto& [name, rank] : adapter_ranks) {
    const int b = BlockOf(name);
    if (b < 0 || b >= num_blocks || !plan.blocks[b].linears.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter rank for ", name, ", which is not a quantized linear"));
    }
    if (rank < 1) {
      return absl::InvalidArgumentError(absl::StrCat("adapter rank of ", name, " is ", rank));
    }
    BlockPlan& bp = plan.blocks[b];
    const LinearPlan& lp = bp.linears[name];
    bp.ranks[name] = rank;
    const std::string base = kAdapterPrefix + name;
    bp.adapter.push_back(
        {{base + ".lora_A.weight", DType::kF32, {rank, lp.d_in}}, Source::kLoraA, name});
    bp.adapter.push_back(
        {{base + ".lora_B.weight", DType::kF32, {lp.d_out, rank}}, Source::kLoraB, name});
  }
  std::set<std::string> names;
  for (BlockPlan& bp : plan.blocks) {
    SortByName(bp.model);
    SortByName(bp.adapter);
  }
  SortByName(plan.tail);
  for (const auto* items : {&plan.head, &plan.tail}) {
    for (const PlanItem& item : *items) names.insert(item.tensor.name);
  }
  for (const BlockPlan& bp : plan.blocks) {
    for (const PlanItem& item : bp.model) {
      if (!names.insert(item.tensor.name).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(source_dir, ": the source checkpoint already has a tensor ",
                         item.tensor.name, ", which the export writes for a quantized linear"));
      }
    }
  }
  return plan;
}

std::vector<PlannedTensor> Tensors(const std::vector<PlanItem>& items) {
  std::vector<PlannedTensor> out;
  out.reserve(items.size());
  for (const PlanItem& item : items) out.push_back(item.tensor);
  return out;
}

// Checks block `b`'s export against the plan before any of its tensors is written.
absl::Status CheckBlock(int b, const BlockPlan& bp, const BlockExport& e) {
  for (const auto& [name, q] : e.quantized) {
    auto it = bp.linears.find(name);
    if (it == bp.linears.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": quantized linear ", name, " is not a linear of the block"));
    }
    const LinearPlan& lp = it->second;
    if (q.d_out != lp.d_out || q.d_in != lp.d_in || q.n_groups != lp.n_groups) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": quantized linear ", name, " is [", q.d_out, ", ", q.d_in,
                       "] with ", q.n_groups, " groups per row; the export planned [", lp.d_out,
                       ", ", lp.d_in, "] with ", lp.n_groups));
    }
    const size_t params = static_cast<size_t>(q.n_groups * q.d_out);
    if (q.codes.size() != static_cast<size_t>(q.d_out * q.d_in) || q.scales.size() != params ||
        q.zeros.size() != params || q.g_idx.size() != static_cast<size_t>(q.d_in)) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": quantized linear ", name, " has ", q.codes.size(),
                       " codes, ", q.scales.size(), " scales, ", q.zeros.size(), " zeros and ",
                       q.g_idx.size(), " g_idx entries, which do not fit its shape"));
    }
  }
  for (const auto& [name, lp] : bp.linears) {
    if (!e.quantized.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": quantized linear ", name, " is missing"));
    }
  }
  for (const auto& [name, t] : e.extras.replaced) {
    if (!bp.copied.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": replaced tensor ", name,
                       " is not an unquantized tensor of the block in the source checkpoint"));
    }
  }
  for (const auto& [name, ad] : e.extras.adapters) {
    auto it = bp.ranks.find(name);
    if (it == bp.ranks.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": adapter for ", name, ", which has no planned adapter rank"));
    }
    const LinearPlan& lp = bp.linears.at(name);
    if (ad.a.dtype() != DType::kF32 || ad.b.dtype() != DType::kF32 ||
        ad.a.shape() != Shape{lp.d_out, it->second} || ad.b.shape() != Shape{it->second, lp.d_in}) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": adapter ", name, ": factors ", ad.a.DebugString(), " and ",
                       ad.b.DebugString(), ", expected F32[", lp.d_out, ", ", it->second,
                       "] and F32[", it->second, ", ", lp.d_in, "]"));
    }
  }
  for (const auto& [name, rank] : bp.ranks) {
    if (!e.extras.adapters.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": the adapter of ", name, " (rank ", rank, ") is missing"));
    }
  }
  return absl::OkStatus();
}

// A replacement for source tensor `name` in its source dtype, which must represent it exactly.
absl::StatusOr<Tensor> Replacement(const CheckpointReader& reader, const std::string& name,
                                   const Tensor& replaced) {
  QCAL_ASSIGN_OR_RETURN(TensorInfo info, reader.Info(name));
  QCAL_ASSIGN_OR_RETURN(Tensor converted, replaced.ConvertTo(info.dtype));
  QCAL_ASSIGN_OR_RETURN(Tensor back, converted.ToF32());
  if (back.shape() != info.shape ||
      std::memcmp(back.raw(), replaced.raw(), back.numel() * sizeof(float)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("replaced tensor ", name, " is not exactly ",
                                                   DTypeName(info.dtype), ShapeString(info.shape),
                                                   " (given ", replaced.DebugString(), ")"));
  }
  return converted;
}

template <typename T>
absl::Status WriteVector(ShardedSafetensorsWriter& w, const std::string& name,
                         const std::vector<T>& v) {
  return w.WriteBytes(name, v.data(), v.size() * sizeof(T));
}

// Writes `items` in order; `e` is the block they belong to (null outside blocks).
absl::Status WriteItems(const CheckpointReader& reader, const std::vector<PlanItem>& items,
                        const BlockExport* e, int bits, ShardedSafetensorsWriter& w) {
  // Packing a 70B block's codes takes seconds on one thread: pack its linears' qweights on a
  // thread each, then write in plan order.
  std::map<std::string, std::future<absl::StatusOr<std::vector<int32_t>>>> packed;
  for (const PlanItem& item : items) {
    if (item.source != Source::kQweight) continue;
    const QuantizedLinear* q = &e->quantized.at(item.key);
    packed[item.tensor.name] = std::async(
        std::launch::async, [q, bits] { return PackQweight(q->codes, q->d_out, q->d_in, bits); });
  }
  for (const PlanItem& item : items) {
    const std::string& name = item.tensor.name;
    if (item.source == Source::kCopy) {
      if (e != nullptr) {
        auto it = e->extras.replaced.find(name);
        if (it != e->extras.replaced.end()) {
          QCAL_ASSIGN_OR_RETURN(Tensor t, Replacement(reader, name, it->second));
          QCAL_RETURN_IF_ERROR(w.Write(name, t));
          continue;
        }
      }
      QCAL_ASSIGN_OR_RETURN(Tensor t, reader.Get(name));
      QCAL_RETURN_IF_ERROR(w.Write(name, t));
      continue;
    }
    QCAL_CHECK(e != nullptr);
    if (item.source == Source::kLoraA || item.source == Source::kLoraB) {
      const LowRankAdapter& ad = e->extras.adapters.at(item.key);
      QCAL_RETURN_IF_ERROR(w.Write(name, item.source == Source::kLoraA ? ad.b : ad.a));
      continue;
    }
    const QuantizedLinear& q = e->quantized.at(item.key);
    switch (item.source) {
      case Source::kQweight: {
        QCAL_ASSIGN_OR_RETURN(std::vector<int32_t> v, packed.at(name).get());
        QCAL_RETURN_IF_ERROR(WriteVector(w, name, v));
        break;
      }
      case Source::kQzeros: {
        QCAL_ASSIGN_OR_RETURN(std::vector<int32_t> v,
                              PackQzeros(q.zeros, q.n_groups, q.d_out, bits));
        QCAL_RETURN_IF_ERROR(WriteVector(w, name, v));
        break;
      }
      case Source::kScales: {
        std::vector<uint16_t> v(q.scales.size());
        for (size_t i = 0; i < v.size(); ++i) v[i] = FloatToHalf(q.scales[i]);
        QCAL_RETURN_IF_ERROR(WriteVector(w, name, v));
        break;
      }
      case Source::kGIdx:
        QCAL_RETURN_IF_ERROR(WriteVector(w, name, q.g_idx));
        break;
      case Source::kFakeWeight:
        QCAL_RETURN_IF_ERROR(WriteVector(w, name, q.Dequantized()));
        break;
      default:
        QCAL_CHECK(false);
    }
  }
  return absl::OkStatus();
}

// adapter_config.json for adapters of these ranks (see WriteLoraAdapter).
nlohmann::ordered_json AdapterConfig(const std::map<std::string, int64_t>& ranks) {
  std::map<int64_t, int> count;
  std::set<std::string> modules;
  for (const auto& [name, rank] : ranks) {
    ++count[rank];
    modules.insert(name.substr(name.rfind('.') + 1));
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
  for (const auto& [name, rank] : ranks) {
    if (rank == r) continue;
    rank_pattern[name] = rank;
    alpha_pattern[name] = rank;
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
  return cfg;
}

absl::Status CreateDirectory(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": ", ec.message()));
  return absl::OkStatus();
}

absl::Status CopySmallFiles(const std::string& source_dir, const std::string& dir) {
  for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "generation_config.json"}) {
    const fs::path src = fs::path(source_dir) / f;
    if (!fs::exists(src)) continue;
    QCAL_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(src.string()));
    QCAL_RETURN_IF_ERROR(WriteStringToFile((fs::path(dir) / f).string(), bytes));
  }
  return absl::OkStatus();
}

absl::Status WriteConfigs(const std::string& source_dir, const std::string& dir,
                          const Recipe& recipe) {
  const bool gptq = IsGptqExportable(recipe);
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
  return WriteStringToFile((fs::path(dir) / "quantize_config.json").string(), qc.dump(2) + "\n");
}

}  // namespace

absl::Status WriteQuantizedCheckpoint(const std::string& source_dir, const std::string& dir,
                                      const Recipe& recipe, int num_blocks,
                                      const BlockExportFn& block,
                                      const std::map<std::string, int64_t>& adapter_ranks,
                                      const ExportOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(source_dir));
  QCAL_RETURN_IF_ERROR(Annotate(recipe.CheckForModel(config), source_dir));
  if (num_blocks != config.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(source_dir, "/config.json: ", config.num_layers,
                                                   " layers, but the export has ", num_blocks,
                                                   " blocks"));
  }
  QCAL_ASSIGN_OR_RETURN(auto reader, CheckpointReader::Open(source_dir));
  QCAL_ASSIGN_OR_RETURN(ExportPlan plan,
                        MakePlan(*reader, source_dir, config, recipe, num_blocks, adapter_ranks));
  std::vector<PlannedTensor> model_tensors = Tensors(plan.head);
  std::vector<PlannedTensor> adapter_tensors;
  for (const BlockPlan& bp : plan.blocks) {
    for (const PlanItem& item : bp.model) model_tensors.push_back(item.tensor);
    for (const PlanItem& item : bp.adapter) adapter_tensors.push_back(item.tensor);
  }
  for (const PlanItem& item : plan.tail) model_tensors.push_back(item.tensor);

  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  QCAL_ASSIGN_OR_RETURN(auto model_writer,
                        ShardedSafetensorsWriter::Create(dir, std::move(model_tensors),
                                                         options.shard_size, "model", metadata));
  std::unique_ptr<ShardedSafetensorsWriter> adapter_writer;
  const std::string adapter_dir = (fs::path(dir) / "adapter").string();
  if (!adapter_ranks.empty()) {
    QCAL_RETURN_IF_ERROR(CreateDirectory(adapter_dir));
    QCAL_ASSIGN_OR_RETURN(
        adapter_writer, ShardedSafetensorsWriter::Create(adapter_dir, std::move(adapter_tensors), 0,
                                                         "adapter_model", metadata));
  }
  const int bits = kernels::CodeBits(SpecOf(recipe));
  QCAL_RETURN_IF_ERROR(WriteItems(*reader, plan.head, nullptr, bits, *model_writer));
  for (int b = 0; b < num_blocks; ++b) {
    QCAL_ASSIGN_OR_RETURN(const BlockExport e, block(b));
    const BlockPlan& bp = plan.blocks[b];
    QCAL_RETURN_IF_ERROR(CheckBlock(b, bp, e));
    QCAL_RETURN_IF_ERROR(WriteItems(*reader, bp.model, &e, bits, *model_writer));
    if (adapter_writer) {
      QCAL_RETURN_IF_ERROR(WriteItems(*reader, bp.adapter, &e, bits, *adapter_writer));
    }
  }
  QCAL_RETURN_IF_ERROR(WriteItems(*reader, plan.tail, nullptr, bits, *model_writer));
  QCAL_RETURN_IF_ERROR(model_writer->Finish());
  if (adapter_writer) {
    QCAL_RETURN_IF_ERROR(adapter_writer->Finish());
    QCAL_RETURN_IF_ERROR(WriteStringToFile((fs::path(adapter_dir) / "adapter_config.json").string(),
                                           AdapterConfig(adapter_ranks).dump(2) + "\n"));
  }
  QCAL_RETURN_IF_ERROR(WriteConfigs(source_dir, dir, recipe));
  return CopySmallFiles(source_dir, dir);
}

absl::Status WriteQuantizedCheckpoint(const std::string& source_dir, const std::string& dir,
                                      const Recipe& recipe,
                                      const std::map<std::string, QuantizedLinear>& quantized,
                                      const CheckpointExtras& extras,
                                      const ExportOptions& options) {
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(source_dir));
  const int num_blocks = config.num_layers;
  auto outside = [&](const std::string& name) {
    const int b = BlockOf(name);
    return b < 0 || b >= num_blocks;
  };
  for (const auto& [name, q] : quantized) {
    if (outside(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("quantized linear ", name, " is not in a block of the model"));
    }
  }
  for (const auto& [name, t] : extras.replaced) {
    if (outside(name)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "replaced tensor ", name, " is not in a block of the model (only block tensors are)"));
    }
  }
  std::map<std::string, int64_t> ranks;
  for (const auto& [name, ad] : extras.adapters) {
    if (!quantized.count(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter for ", name, ", not a quantized linear"));
    }
    if (ad.a.rank() != 2) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter ", name, ": factor L_A is ", ad.a.DebugString()));
    }
    ranks[name] = ad.a.dim(1);
  }
  // Each block's entries of a name-sorted map share the prefix "model.layers.{b}.".
  auto of_block = [](const auto& map, const std::string& prefix, auto& out) {
    for (auto it = map.lower_bound(prefix); it != map.end() && absl::StartsWith(it->first, prefix);
         ++it) {
      out.insert(*it);
    }
  };
  const BlockExportFn block = [&](int b) -> absl::StatusOr<BlockExport> {
    const std::string prefix = BlockPrefix(b);
    BlockExport e;
    of_block(quantized, prefix, e.quantized);
    of_block(extras.replaced, prefix, e.extras.replaced);
    of_block(extras.adapters, prefix, e.extras.adapters);
    return e;
  };
  return WriteQuantizedCheckpoint(source_dir, dir, recipe, num_blocks, block, ranks, options);
}

absl::Status WriteLoraAdapter(const std::string& dir,
                              const std::map<std::string, LowRankAdapter>& adapters) {
  std::map<std::string, int64_t> ranks;
  std::map<std::string, Tensor> tensors;
  for (const auto& [name, ad] : adapters) {
    if (ad.a.rank() != 2 || ad.b.rank() != 2 || ad.a.dim(1) != ad.b.dim(0) ||
        ad.a.dtype() != DType::kF32 || ad.b.dtype() != DType::kF32) {
      return absl::InternalError(absl::StrCat("adapter ", name, ": factors ", ad.a.DebugString(),
                                              " and ", ad.b.DebugString()));
    }
    ranks[name] = ad.a.dim(1);
    tensors[kAdapterPrefix + name + ".lora_A.weight"] = ad.b;
    tensors[kAdapterPrefix + name + ".lora_B.weight"] = ad.a;
  }
  QCAL_RETURN_IF_ERROR(CreateDirectory(dir));
  QCAL_RETURN_IF_ERROR(WriteSafetensors((fs::path(dir) / "adapter_model.safetensors").string(),
                                        tensors, {{"format", "pt"}}));
  return WriteStringToFile((fs::path(dir) / "adapter_config.json").string(),
                           AdapterConfig(ranks).dump(2) + "\n");
}

}  // namespace qcal::engine
