#include "services/engine/export/abq_checkpoint.h"

#include <filesystem>
#include <span>

#include "absl/strings/str_cat.h"
#include "common/hf_config.h"
#include "common/status.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/model.h"

namespace qcal::engine {
namespace {

using kernels::AbqKernel;
using kernels::AbqKernelName;

// "<prefix>: <status message>", keeping the code.
absl::Status AtLinear(const std::string& prefix, const absl::Status& status) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(prefix, ": ", status.message()));
}

// Checks one tensor's header: dtype (one of `dtypes`) and shape.
absl::Status CheckInfo(const CheckpointReader& reader, const std::string& name,
                       std::initializer_list<DType> dtypes, const Shape& shape) {
  QCAL_ASSIGN_OR_RETURN(TensorInfo info, reader.Info(name));
  bool dtype_ok = false;
  std::string names;
  for (DType d : dtypes) {
    dtype_ok = dtype_ok || info.dtype == d;
    absl::StrAppend(&names, names.empty() ? "" : " or ", DTypeName(d));
  }
  if (!dtype_ok || info.shape != shape) {
    QCAL_ASSIGN_OR_RETURN(std::string file, reader.FileOf(name));
    return absl::InvalidArgumentError(absl::StrCat(file, ": tensor \"", name, "\" is ",
                                                   DTypeName(info.dtype), ShapeString(info.shape),
                                                   ", expected ", names, ShapeString(shape)));
  }
  return absl::OkStatus();
}

// Whether linear `prefix` is stored quantized (qweight), unquantized (weight), or missing.
absl::StatusOr<bool> IsQuantized(const CheckpointReader& reader, const std::string& prefix) {
  if (reader.Has(prefix + ".qweight")) return true;
  if (reader.Has(prefix + ".weight")) return false;
  return absl::InvalidArgumentError(
      absl::StrCat(prefix, ": the checkpoint has neither qweight nor weight"));
}

// The checks of one quantized linear that need no weight data: the headers of its four GPTQ
// tensors, its g_idx (no act-order), the int32 bound of its k-groups and their count. Errors
// name the linear.
absl::Status CheckQuantizedLinear(const CheckpointReader& reader, const std::string& prefix,
                                  int64_t d_out, int64_t d_in, const kernels::AbqSpec& spec) {
  const int b = spec.weight_bits;
  const int64_t n_groups = kernels::AbqNumGroups(spec, d_in);
  const int64_t g = kernels::AbqGroupSize(spec, d_in);
  QCAL_RETURN_IF_ERROR(
      CheckInfo(reader, prefix + ".qweight", {DType::kI32}, {(d_in + 31) / 32 * b, d_out}));
  QCAL_RETURN_IF_ERROR(
      CheckInfo(reader, prefix + ".qzeros", {DType::kI32}, {n_groups, (d_out + 31) / 32 * b}));
  QCAL_RETURN_IF_ERROR(CheckInfo(reader, prefix + ".scales",
                                 {DType::kF16, DType::kBF16, DType::kF32}, {n_groups, d_out}));
  QCAL_RETURN_IF_ERROR(CheckInfo(reader, prefix + ".g_idx", {DType::kI32}, {d_in}));
  QCAL_RETURN_IF_ERROR(AtLinear(prefix, kernels::ValidateAbqShape(spec, 1, d_out, d_in)));
  if (n_groups > kernels::kAbqMaxGroups) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, ": ", n_groups,
                                                   " k-groups, the ABQ kernels take at most ",
                                                   kernels::kAbqMaxGroups));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor g_idx, reader.Get(prefix + ".g_idx"));
  const int32_t* gi = g_idx.data<int32_t>();
  for (int64_t c = 0; c < d_in; ++c) {
    if (gi[c] != c / g) {
      return absl::InvalidArgumentError(absl::StrCat(
          prefix, ": g_idx[", c, "] = ", gi[c], ", expected ", c / g, " (group size ", g,
          "): act-order checkpoints (g_idx not k / group_size) are refused by the ABQ kernels, "
          "whose k-groups are consecutive columns; use --kernels dequant"));
    }
  }
  return absl::OkStatus();
}

// The activation bits `kernel` runs for a checkpoint recording `recorded` bits and an override
// (0: none); `source` names where the bits come from. Errors say what to use instead.
absl::StatusOr<int> KernelActBits(AbqKernel kernel, int recorded, int override_bits,
                                  const std::string& config_path) {
  const int bits = override_bits != 0 ? override_bits : recorded;
  const std::string source =
      override_bits != 0 ? std::string("--act-bits")
                         : absl::StrCat(config_path, " (quantization_config.qcal.activation_bits)");
  if (kernel == AbqKernel::kWeightOnly) {
    if (bits != 16) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--abq-kernel a16 keeps activations 16-bit, but ", source, " gives activation bits ",
          bits, ": use --abq-kernel b1 or int8, or --act-bits 16"));
    }
    return bits;
  }
  if (bits == 16) {
    return absl::InvalidArgumentError(
        absl::StrCat("--abq-kernel ", AbqKernelName(kernel),
                     " quantizes activations to 4 or 8 "
                     "bits, but ",
                     source,
                     " gives 16 (A16): use --abq-kernel a16, or --act-bits "
                     "4 or 8"));
  }
  if (bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(absl::StrCat(source, " gives activation bits ", bits,
                                                   ": the ABQ kernels take 4 or 8 (or 16 with "
                                                   "--abq-kernel a16)"));
  }
  return bits;
}

}  // namespace

absl::StatusOr<AbqInferencePlan> PlanAbqInference(const std::string& dir,
                                                  const AbqInferenceOptions& options) {
  const std::string config_path = (std::filesystem::path(dir) / "config.json").string();
  QCAL_ASSIGN_OR_RETURN(CheckpointQuantization q, ReadCheckpointQuantization(dir));
  if (q.quant_method != "gptq") {
    return absl::InvalidArgumentError(absl::StrCat(
        dir, ": --kernels abq runs GPTQ v1 checkpoints, and this one is ",
        q.quant_method.empty()
            ? std::string("not quantized (no quantization_config)")
            : absl::StrCat("quant_method \"", q.quant_method,
                           "\" (dequantized fp32 weights: the cuberoot grid or 5..7 bits, which "
                           "no integer kernel runs)"),
        "; use --kernels dequant"));
  }
  AbqInferencePlan plan;
  plan.kernel = options.kernel;
  QCAL_ASSIGN_OR_RETURN(plan.act_bits, KernelActBits(options.kernel, q.activation_bits,
                                                     options.act_bits, config_path));
  plan.spec.weight_bits = q.bits;
  plan.spec.act_bits = plan.act_bits == 16 ? 8 : plan.act_bits;
  plan.spec.group_size = q.group_size;
  const absl::Status spec_ok = kernels::ValidateAbqSpec(plan.spec);
  if (!spec_ok.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(config_path, ": quantization_config (bits ", q.bits, ", group_size ",
                     q.group_size, ") cannot run on the ABQ kernels: ", spec_ok.message()));
  }
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  QCAL_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader, CheckpointReader::Open(dir));
  for (int b = 0; b < config.num_layers; ++b) {
    for (LinearKind k : kAllLinears) {
      const std::string prefix = LinearPrefix(b, k);
      QCAL_ASSIGN_OR_RETURN(bool quantized, IsQuantized(*reader, prefix));
      if (!quantized) {
        plan.dense_linears.push_back(prefix);
        continue;
      }
      const auto [d_out, d_in] = LinearShape(config, k);
      QCAL_RETURN_IF_ERROR(CheckQuantizedLinear(*reader, prefix, d_out, d_in, plan.spec));
    }
  }
  return plan;
}

absl::StatusOr<std::optional<kernels::AbqWeights>> ReadAbqLinear(const CheckpointReader& reader,
                                                                 const std::string& prefix,
                                                                 int64_t d_out, int64_t d_in,
                                                                 const kernels::AbqSpec& spec) {
  QCAL_ASSIGN_OR_RETURN(bool quantized, IsQuantized(reader, prefix));
  if (!quantized) return std::nullopt;
  QCAL_RETURN_IF_ERROR(CheckQuantizedLinear(reader, prefix, d_out, d_in, spec));
  QCAL_ASSIGN_OR_RETURN(Tensor qweight, reader.Get(prefix + ".qweight"));
  QCAL_ASSIGN_OR_RETURN(Tensor qzeros, reader.Get(prefix + ".qzeros"));
  QCAL_ASSIGN_OR_RETURN(Tensor scales_raw, reader.Get(prefix + ".scales"));
  QCAL_ASSIGN_OR_RETURN(Tensor scales, scales_raw.ToF32());
  QCAL_ASSIGN_OR_RETURN(Tensor g_idx, reader.Get(prefix + ".g_idx"));
  auto ints = [](const Tensor& t) {
    return std::span<const int32_t>(t.data<int32_t>(), static_cast<size_t>(t.numel()));
  };
  absl::StatusOr<kernels::AbqWeights> w = kernels::PackGptqV1ToAbq(
      ints(qweight), ints(qzeros),
      std::span<const float>(scales.data<float>(), static_cast<size_t>(scales.numel())),
      ints(g_idx), d_out, d_in, spec);
  if (!w.ok()) return AtLinear(prefix, w.status());
  return std::optional<kernels::AbqWeights>(*std::move(w));
}

}  // namespace qcal::engine
