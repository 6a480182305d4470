#include <cstdio>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "services/engine/export/abq_checkpoint.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {

CLI::Validator NonNegativeInteger() {
  return CLI::Validator(
      [](const std::string& v) {
        const bool digits = !v.empty() && v.find_first_not_of("0123456789") == std::string::npos;
        return digits ? std::string() : absl::StrCat("must be a non-negative integer, got ", v);
      },
      "UINT");
}

void DeviceFlags::Add(CLI::App& app) {
  app.add_option("--device", device,
                 "cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)");
  app.add_option("--compute-dtype", compute_dtype,
                 absl::StrCat("GEMM operand precision: f32, or bf16 (bf16 operands, fp32 "
                              "accumulation; the GPU fast path) (default: ",
                              compute_dtype, ")"))
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--threads", threads, "CPU threads (default: number of cores)")
      ->check(CLI::NonNegativeNumber);
}

absl::StatusOr<kernels::BackendOptions> DeviceFlags::ToOptions() const {
  kernels::BackendOptions o;
  o.device = device == "auto" ? (kernels::CudaAvailable() ? "cuda" : "cpu") : device;
  o.threads = threads;
  o.compute_dtype =
      compute_dtype == "bf16" ? kernels::ComputeDType::kBF16 : kernels::ComputeDType::kF32;
  QCAL_RETURN_IF_ERROR(o.Validate());
  return o;
}

void KernelFlags::Add(CLI::App& app) {
  app.add_option("--kernels", mode,
                 "How quantized linears run: dequant (dequantized at load, dense GEMMs: the "
                 "reference) or abq (GPTQ v1 checkpoints repacked into bit planes at load and run "
                 "by the ABQ kernels; what they refuse: README, \"Quantized inference with the ABQ "
                 "kernels\")")
      ->check(CLI::IsMember({"dequant", "abq"}));
  abq_kernel_option =
      app.add_option("--abq-kernel", abq_kernel,
                     "With --kernels abq: b1 (AND + popcount tensor cores, the default), int8 "
                     "(the same planes on int8 tensor cores) or a16 (weight-only, 16-bit "
                     "activations)")
          ->check(CLI::IsMember({"b1", "int8", "a16"}));
}

absl::StatusOr<std::optional<kernels::AbqKernel>> KernelFlags::Check(const std::string& model_dir,
                                                                     int act_bits) const {
  if (mode != "abq") {
    if (abq_kernel_option != nullptr && abq_kernel_option->count() > 0) {
      return absl::InvalidArgumentError("--abq-kernel needs --kernels abq");
    }
    return std::nullopt;
  }
  engine::AbqInferenceOptions options;
  QCAL_ASSIGN_OR_RETURN(options.kernel, kernels::ParseAbqKernel(abq_kernel));
  options.act_bits = act_bits;
  QCAL_ASSIGN_OR_RETURN(engine::AbqInferencePlan plan,
                        engine::PlanAbqInference(model_dir, options));
  spdlog::info("ABQ kernel {}: W{}A{} group {} ({} linears kept unquantized by the checkpoint)",
               kernels::AbqKernelName(plan.kernel), plan.spec.weight_bits, plan.act_bits,
               plan.spec.group_size, plan.dense_linears.size());
  return plan.kernel;
}

int ReportError(const absl::Status& status) {
  std::string msg(status.message());
  for (char& c : msg) {
    if (c == '\n') c = ' ';
  }
  std::fprintf(stderr, "qcal: error: %s\n", msg.c_str());
  return 1;
}

}  // namespace qcal::cli
