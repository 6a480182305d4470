// The per-GEMM benchmark of the ABQ kernels (qcal bench --abq; DESIGN.md section 3, "Arbitrary-bit
// inference kernels"): each shape and token count through cuBLAS bf16 and int8, the weight-only
// A16 kernel and both ABQ integer kernels (b1 and int8 IMMA), every one timed as a whole layer
// (the ABQ prologue's launch included) on random device-resident weights that come from memory,
// not L2 (AbqTiming). Needs a CUDA build and a GPU; elsewhere RunAbqBench fails with
// FailedPrecondition.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcal::kernels {

// How a GEMM is timed (qcal bench --abq-timing):
//   kAlone     each call alone between its own CUDA events, after a read of twice the L2 size has
//              evicted the weights: the call's whole latency, launch and event overheads included
//              (the `null` row is that floor).
//   kSequence  many calls back to back in one CUDA graph, cycling through copies of the weights
//              that together pass twice the L2 size (each call finds its weights evicted), every
//              one reading the same x: the mean time per call, what a decode step's chain of
//              layers sees (launches queued while the previous layer runs, as in a serving
//              engine's CUDA graph). The ABQ layer's prologue is one of its two launches.
enum class AbqTiming { kAlone, kSequence };

struct AbqBenchOptions {
  // (d_out, d_in) of each GEMM. Default: LLaMA-7B's square, up and down projections and
  // LLaMA-70B's down projection.
  std::vector<std::pair<int64_t, int64_t>> shapes = {
      {4096, 4096}, {11008, 4096}, {4096, 11008}, {8192, 28672}};
  // Token counts m. Default: decode 1, 4, 8, 16 and a small prefill 64.
  std::vector<int64_t> tokens = {1, 4, 8, 16, 64};
  // Weight group size of the quantized configurations (-1 or a multiple of 32). Default: 128.
  int group_size = 128;
  // Timed runs per measurement, after 3 warm-up runs. Default: 20.
  int iters = 20;
  // How each call is timed. Default: kAlone.
  AbqTiming timing = AbqTiming::kAlone;
  // CUDA device index. Default: 0.
  int device = 0;
  // Seed of the random weights. Default: 0.
  uint64_t seed = 0;

  absl::Status Validate() const;
};

// One timed GEMM.
struct AbqBenchRow {
  int64_t d_out = 0, d_in = 0, m = 0;
  std::string config;  // "bf16", "W8A8" (cuBLAS int8), "W4A16", "W2*A16", "W2A8", "W2*A8", ...
  // "cublas", "cublas-int8", "a16", "b1", "int8", at m <= kAbqDecodeTokens "b1-decode" and
  // "b1-tiled" (the b1 decode and tiled kernels, where "b1" runs the GEMV kernel for m <= 4),
  // "b1-fused" where the one-launch layer applies (m = 1, K a multiple of 128), "dp4a" where the
  // dp4a layer does (m = 1, K a multiple of 64: not b1; its activation kernel and GEMV), and at m
  // <= kAbqGemvTokens "prologue" and "b1-gemm" (the b1 layer's two launches timed apart); "null"
  // (config "-") is a near-empty kernel timed the same way: the harness's floor; "read" (beside
  // each "dp4a" row) one launch that only streams that row's bytes (LaunchReadFloor): the floor of
  // a one-launch layer.
  std::string kernel;
  double seconds = 0;  // mean per whole-layer call
  double bytes = 0;    // the least the call must move through device memory (see abq_bench.cc)
};

// Runs every (shape, m, configuration, kernel); `log` gets a line per shape.
absl::StatusOr<std::vector<AbqBenchRow>> RunAbqBench(
    const AbqBenchOptions& options, const std::function<void(const std::string&)>& log);

}  // namespace qcal::kernels
