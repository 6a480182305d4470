// The published model shapes `qcal bench --shape` and `qcal synth --preset` build (Llama-2 7B, 13B
// and 70B; Mixtral-8x7B and Qwen3-30B-A3B), with DESIGN section 9's GPTQ floors, and the useful
// work of a whole-model job the way the performance model counts it. Configs and arithmetic only:
// in qcal_model, so that the synthetic checkpoints do not need the benchmark.
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "common/hf_config.h"

namespace qcal::engine {

// A model shape with its floors from DESIGN section 9 (one H100, 128 x 2048); the MoE shapes have
// none (floors 0). The reference GPTQ's
// time is not built in: it depends on the GPU, so `qcal bench --reference-seconds-per-layer` takes
// it as measured (docs/BENCHMARKS.md records the H200's).
struct BenchShape {
  std::string name;
  ModelConfig config;
  // Whole-model GPTQ floors: at the measured ceilings, and with library kernels. Seconds.
  double ideal_floor_seconds = 0;
  double library_floor_seconds = 0;
  // The floors are not in DESIGN section 9 but the 7b ones scaled by the useful-FLOP ratio (13b).
  bool floors_scaled = false;
};

// "7b" (Llama-2-7B: hidden 4096, intermediate 11008, 32 heads, 32 layers), "13b" (Llama-2-13B:
// hidden 5120, intermediate 13824, 40 heads, 40 layers) or "70b" (Llama-2-70B: hidden 8192,
// intermediate 28672, 64 heads, 8 KV heads, 80 layers); vocab 32000, head_dim 128, RMSNorm eps
// 1e-5, rope theta 10000, 4096 positions, tied embeddings (the bench draws one table for both).
// The 13b floors are the 7b ones scaled by the useful-FLOP ratio (DESIGN section 9 has no 13B
// figures). `qcal synth --preset` takes its Llama-2 shapes from here.
// "mixtral-8x7b" (Mixtral-8x7B-v0.1: hidden 4096, 32 layers, 32 heads / 8 KV heads, head_dim 128,
// 8 experts of intermediate 14336, top 2, vocab 32000, no sliding window, rope theta 1e6) and
// "qwen3-30b-a3b" (Qwen3-30B-A3B: hidden 2048, 48 layers, 32 heads / 4 KV heads, head_dim 128,
// q/k norms, 128 experts of moe_intermediate 768, top 8 renormalised, vocab 151936, no shared
// expert, every block MoE); no floors. Errors: InvalidArgument naming the shape.
absl::StatusOr<BenchShape> BenchShapeNamed(const std::string& name);

// Useful floating-point work of the whole model, the way the performance model counts it: one
// forward pass of the linears (2 flops per weight and token) and of causal attention
// (4 L(L+1)/2 per head and sample), the Hessians as symmetric products (n k^2 per input of width
// k), the GPTQ solves (d_out d_in^2 for the lazy updates per linear, 2/3 k^3 per factorization of a
// width-k Hessian). In an MoE block the router is a forward linear, each token runs top_k experts,
// each expert's Hessians are over its routed tokens (which sum to top_k per token, fallbacks
// aside) and each expert has its own solves and factorizations.
struct BenchFlops {
  double forward = 0;
  double hessian = 0;
  double solve = 0;
  double total() const { return forward + hessian + solve; }
};
BenchFlops CountFlops(const ModelConfig& config, int samples, int seq_len);

}  // namespace qcal::engine
