#include "services/engine/export/checkpoint_loader.h"

#include <filesystem>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
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
  Tensor w = Tensor::Zeros(DType::kF32, {d_out, d_in});
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
  q.quant_method = qc.value("quant_method", std::string("gptq"));
  if (q.quant_method != "gptq" && q.quant_method != "qcal_fake") {
    return absl::InvalidArgumentError(absl::StrCat(source, ": unsupported quant_method \"",
                                                   q.quant_method,
                                                   "\" (supported: gptq, qcal_fake)"));
  }
  if (q.quant_method == "gptq") {
    const std::string format = qc.value("checkpoint_format", std::string("gptq"));
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
  return q;
}

absl::StatusOr<std::unique_ptr<Model>> LoadCheckpoint(const std::string& dir,
                                                      kernels::Backend* backend) {
  QCAL_ASSIGN_OR_RETURN(CheckpointQuantization q, ReadCheckpointQuantization(dir));
  if (q.quant_method != "gptq") return Model::Load(dir, backend);
  const int bits = q.bits;
  return Model::Load(
      dir, backend,
      [bits](const CheckpointReader& reader, const std::string& prefix, int64_t d_out,
             int64_t d_in) { return DequantizeGptq(reader, prefix, d_out, d_in, bits); });
}

}  // namespace qcal::engine
