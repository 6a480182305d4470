#include <cstdio>

#include "common/status.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {

void DeviceFlags::Add(CLI::App& app) {
  app.add_option("--device", device,
                 "cpu, cuda or cuda:N (default: cuda when a GPU is present, else cpu)");
  app.add_option("--compute-dtype", compute_dtype,
                 "GEMM operand precision: f32, or bf16 (bf16 operands, fp32 accumulation; the GPU "
                 "fast path)")
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

int ReportError(const absl::Status& status) {
  std::string msg(status.message());
  for (char& c : msg) {
    if (c == '\n') c = ' ';
  }
  std::fprintf(stderr, "qcal: error: %s\n", msg.c_str());
  return 1;
}

}  // namespace qcal::cli
