// What the benchmarks behind `qcal bench` share (bench.h): synthetic weights drawn on the device
// from hashed streams (the same values on every backend and run), and a stopwatch. Internal to
// bench.cc (whole-model GPTQ), bench_er.cc (error reconstruction) and bench_decode.cc (decoding).
#pragma once

#include <chrono>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/tensor.h"
#include "kernels/backend.h"
#include "services/engine/model.h"

namespace qcal::engine::bench_internal {

using Clock = std::chrono::steady_clock;

inline double Since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// Independent streams for every tensor: seed, block and tensor index hashed together.
uint64_t StreamSeed(uint64_t seed, int block, int tensor);

// A tensor uniform in [lo, hi), drawn on `be` from stream `seed`.
absl::StatusOr<Tensor> Uniform(kernels::Backend& be, const Shape& shape, uint64_t seed, float lo,
                               float hi);

// Block b's norms, uniform in [0.8, 1.2), into w.
absl::Status DrawNorms(kernels::Backend& be, const ModelConfig& c, uint64_t seed, int b,
                       BlockWeights& w);

// Linear k of block b: uniform in [-a, a) with a = sqrt(3 / d_in) (standard deviation
// 1/sqrt(d_in): activations keep their scale through the block), element i of its stream.
struct LinearDraw {
  int64_t d_out = 0, d_in = 0;
  uint64_t seed = 0;
  float a = 0;
};
LinearDraw LinearDrawOf(const ModelConfig& c, uint64_t seed, int b, LinearKind k);

// Block b's weights: norms (DrawNorms) and linears (LinearDrawOf) drawn on the device. An MoE
// block's router is drawn as a linear too (so its logits have about unit variance and, with i.i.d.
// rows, no expert is favoured), and expert unit u's (NumExpertUnits) linear k from stream u * 3 + k
// of the block's expert seed (a block may have more experts than StreamSeed has tensor slots); a
// shared expert's gate like a linear.
absl::StatusOr<BlockWeights> DrawBlock(kernels::Backend& be, const ModelConfig& c, uint64_t seed,
                                       int b);

}  // namespace qcal::engine::bench_internal
