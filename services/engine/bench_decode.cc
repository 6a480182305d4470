// `qcal bench --decode` (bench.h, RunDecodeBench): greedy decoding tokens/s of a synthetic model,
// dense bf16 against the quantized kernels.
#include <algorithm>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/dtype.h"
#include "common/memory_usage.h"
#include "common/parallel.h"
#include "common/status.h"
#include "kernels/cpu/abq_ref.h"
#include "kernels/hash_random.h"
#include "services/engine/bench.h"
#include "services/engine/bench_internal.h"
#include "services/engine/evaluate.h"

namespace qcal::engine {
namespace {

using bench_internal::Clock;
using bench_internal::DrawNorms;
using bench_internal::LinearDraw;
using bench_internal::LinearDrawOf;
using bench_internal::Since;
using bench_internal::StreamSeed;
using bench_internal::Uniform;

// A [d_out, d_in] linear drawn as LinearDrawOf says, on the host (every thread), in `dtype` (F32
// or BF16, rounded to nearest even), then placed on the backend: the values Uniform draws.
absl::StatusOr<Tensor> DenseLinear(kernels::Backend& be, const LinearDraw& d, DType dtype) {
  Tensor host = Tensor::Zeros(dtype, {d.d_out, d.d_in});
  const bool bf16 = dtype == DType::kBF16;
  ParallelFor(host.numel(), 8, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float v = kernels::HashUniform(d.seed, static_cast<uint64_t>(i), -d.a, d.a);
      if (bf16) {
        host.data<uint16_t>()[i] = FloatToBf16(v);
      } else {
        host.data<float>()[i] = v;
      }
    }
  });
  return be.ToDevice(host);
}

// PackAbqWeights over ranges of rows on every thread: the same result as one call, in a fraction
// of the time (the reference packs bit by bit).
absl::StatusOr<kernels::AbqWeights> PackRows(const std::vector<int32_t>& codes,
                                             const std::vector<int32_t>& zeros,
                                             const std::vector<float>& scales, int64_t n, int64_t k,
                                             const kernels::AbqSpec& spec) {
  kernels::AbqWeights w;
  w.spec = spec;
  w.n = n;
  w.k = k;
  w.words = kernels::AbqWords(k);
  w.n_groups = kernels::AbqNumGroups(spec, k);
  w.zeros = zeros;
  w.scales = scales;
  const int64_t row_words = spec.weight_bits * w.words;
  w.planes.assign(static_cast<size_t>(n * row_words), 0u);
  absl::Mutex mu;
  absl::Status status;
  ParallelFor(n, k * spec.weight_bits, [&](int64_t r0, int64_t r1) {
    const int64_t rows = r1 - r0;
    std::vector<int32_t> z(static_cast<size_t>(w.n_groups * rows));
    std::vector<float> sc(z.size());
    for (int64_t g = 0; g < w.n_groups; ++g) {
      for (int64_t r = 0; r < rows; ++r) {
        z[g * rows + r] = zeros[g * n + r0 + r];
        sc[g * rows + r] = scales[g * n + r0 + r];
      }
    }
    absl::StatusOr<kernels::AbqWeights> part = kernels::PackAbqWeights(
        std::span<const int32_t>(codes.data() + r0 * k, static_cast<size_t>(rows * k)), z, sc, rows,
        k, spec);
    if (!part.ok()) {
      absl::MutexLock lock(&mu);
      status.Update(part.status());
      return;
    }
    std::copy(part->planes.begin(), part->planes.end(), w.planes.begin() + r0 * row_words);
  });
  QCAL_RETURN_IF_ERROR(status);
  return w;
}

// The linear drawn as LinearDrawOf says, RTN-quantized with `weights` on the backend, packed for
// the ABQ kernels and placed with PrepareAbqLinear; the dense copy is freed before returning.
absl::StatusOr<std::shared_ptr<const kernels::PreparedAbqLinear>> PackedLinear(
    kernels::Backend& be, const LinearDraw& d, const QuantSpec& weights,
    const kernels::AbqSpec& spec, int64_t* bytes) {
  std::vector<int32_t> codes, zeros;
  std::vector<float> scales;
  {
    QCAL_ASSIGN_OR_RETURN(Tensor w, Uniform(be, {d.d_out, d.d_in}, d.seed, -d.a, d.a));
    QCAL_ASSIGN_OR_RETURN(kernels::QuantizedTensors q, be.QuantizeRtn(w, weights));
    QCAL_ASSIGN_OR_RETURN(Tensor c, be.ToHost(q.codes));
    QCAL_ASSIGN_OR_RETURN(Tensor z, be.ToHost(q.zeros));
    QCAL_ASSIGN_OR_RETURN(Tensor s, be.ToHost(q.scales));
    codes.assign(c.data<uint8_t>(), c.data<uint8_t>() + c.numel());
    zeros.assign(z.data<int32_t>(), z.data<int32_t>() + z.numel());
    scales.assign(s.data<float>(), s.data<float>() + s.numel());
  }
  QCAL_ASSIGN_OR_RETURN(kernels::AbqWeights packed,
                        PackRows(codes, zeros, scales, d.d_out, d.d_in, spec));
  *bytes += static_cast<int64_t>(packed.planes.size() * sizeof(uint32_t) +
                                 packed.scales.size() * sizeof(float) +
                                 packed.zeros.size() * sizeof(int32_t));
  return be.PrepareAbqLinear(packed);
}

// One configuration's weights: dense in `dense_dtype`, or packed from RTN codes of `weights`
// (activation bits 8 for the integer kernels).
struct DecodeWeights {
  std::string config;  // "bf16", or the weights' name ("W4"), completed by the kernel's A16/A8
  std::optional<QuantSpec> weights;  // unset: dense
  std::vector<kernels::AbqKernel> run;
};

}  // namespace

absl::Status DecodeBenchOptions::Validate() const {
  if (config.num_layers < 1 || config.num_heads < 1 || config.num_kv_heads < 1 ||
      config.hidden_size < 1 || config.vocab_size < 2) {
    return absl::InvalidArgumentError(
        "decode bench: the model needs layers, heads, a hidden size and a vocabulary");
  }
  if (config.moe()) {
    return absl::InvalidArgumentError(absl::StrCat("decode bench: ", config.model_type,
                                                   " is a mixture-of-experts model, which it does "
                                                   "not draw (dense shapes only)"));
  }
  if (prompt < 1) return absl::InvalidArgumentError("decode bench: prompt must be >= 1");
  if (tokens < 1) return absl::InvalidArgumentError("decode bench: tokens must be >= 1");
  return kernels::ValidateAbqSpec(kernels::AbqSpec{4, 8, group_size});
}

absl::StatusOr<DecodeBenchResult> RunDecodeBench(kernels::Backend& be,
                                                 const DecodeBenchOptions& options,
                                                 const BenchLogFn& log) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  if (!be.SupportsOp(kernels::Op::kAbqLinear) ||
      !be.SupportsSolverOp(kernels::SolverOp::kQuantizeRtn)) {
    return absl::UnimplementedError(absl::StrCat(
        "decode bench: the ", be.name(), " backend lacks the ABQ kernels or RTN quantization"));
  }
  const ModelConfig& c = options.config;
  DecodeBenchResult r;
  r.device_kind = be.DeviceKind();
  // bf16 weights where the backend reads them (the CUDA backend's Linear; DESIGN section 3).
  const DType dense =
      be.device() == Device::kCuda && be.compute_dtype() == kernels::ComputeDType::kBF16
          ? DType::kBF16
          : DType::kF32;
  r.dense_dtype = dense == DType::kBF16 ? "bf16" : "f32";
  // The dense configuration is the largest: refuse a model that cannot fit before drawing it.
  int64_t params = static_cast<int64_t>(c.vocab_size) * c.hidden_size;
  for (LinearKind k : kAllLinears) {
    const auto [d_out, d_in] = LinearShape(c, k);
    params += c.num_layers * d_out * d_in;
  }
  // The linears and lm_head in the dense dtype, and the fp32 embedding table.
  const int64_t needed = params * static_cast<int64_t>(DTypeSize(dense)) +
                         static_cast<int64_t>(c.vocab_size) * c.hidden_size * 4;
  const int64_t available =
      be.device() == Device::kHost ? AvailableHostMemoryBytes() : be.AvailableMemory();
  if (available >= 0 && needed > available) {
    return absl::ResourceExhaustedError(absl::StrCat("decode bench: the dense model needs ", needed,
                                                     " bytes of ", be.name(), " memory, ",
                                                     available, " are available"));
  }
  QCAL_ASSIGN_OR_RETURN(Tensor embed, Uniform(be, {c.vocab_size, c.hidden_size},
                                              StreamSeed(options.seed, -1, 0), -1.0f, 1.0f));
  QCAL_ASSIGN_OR_RETURN(Tensor final_norm,
                        Uniform(be, {c.hidden_size}, StreamSeed(options.seed, -1, 1), 0.8f, 1.2f));
  // lm_head is the embedding table (tied, as RunBench), in the dense dtype.
  LinearDraw head{c.vocab_size, c.hidden_size, StreamSeed(options.seed, -1, 0), 1.0f};
  QCAL_ASSIGN_OR_RETURN(Tensor lm_head, DenseLinear(be, head, dense));
  std::vector<int> prompt(static_cast<size_t>(options.prompt));
  for (int i = 0; i < options.prompt; ++i) {
    prompt[i] = static_cast<int>(kernels::HashBits(StreamSeed(options.seed, -1, 2), i) %
                                 static_cast<uint64_t>(c.vocab_size));
  }
  GenerateOptions go;
  go.bos_id = -1;     // the prompt alone
  go.eos_ids = {-1};  // never stops early
  const QuantSpec w4{4, options.group_size, false, GridKind::kUniform};
  const QuantSpec w2_star{2, options.group_size, false, GridKind::kBalanced};
  using kernels::AbqKernel;
  // W4's planes serve the a16 kernel (W4A16) and the integer ones (W4A8) alike.
  const std::vector<DecodeWeights> configs = {
      {"bf16", std::nullopt, {}},
      {"W4", w4, {AbqKernel::kWeightOnly, AbqKernel::kBinaryMma, AbqKernel::kInt8Mma}},
      {"W2*", w2_star, {AbqKernel::kBinaryMma, AbqKernel::kInt8Mma}}};
  for (const DecodeWeights& cw : configs) {
    const auto t0 = Clock::now();
    std::vector<BlockWeights> blocks(c.num_layers);
    int64_t weight_bytes = 0;
    std::optional<kernels::AbqSpec> spec;
    if (cw.weights) {
      QCAL_ASSIGN_OR_RETURN(spec, kernels::AbqSpecFor(*cw.weights, 8));
    }
    for (int b = 0; b < c.num_layers; ++b) {
      QCAL_RETURN_IF_ERROR(DrawNorms(be, c, options.seed, b, blocks[b]));
      for (LinearKind k : kAllLinears) {
        const LinearDraw d = LinearDrawOf(c, options.seed, b, k);
        Linear& l = blocks[b].at(k);
        if (spec) {
          QCAL_ASSIGN_OR_RETURN(l.abq, PackedLinear(be, d, *cw.weights, *spec, &weight_bytes));
        } else {
          QCAL_ASSIGN_OR_RETURN(l.weight, DenseLinear(be, d, dense));
          weight_bytes += l.weight.nbytes();
        }
      }
    }
    std::unique_ptr<Model> model =
        Model::FromWeights(c, &be, embed, final_norm, lm_head, std::move(blocks));
    QCAL_RETURN_IF_ERROR(be.Synchronize());
    const int64_t device_bytes = be.MemoryInUse();
    if (log) {
      log(absl::StrCat(cw.config, ": weights ", weight_bytes, " bytes, built in ", Since(t0),
                       " s"));
    }
    // The dense configuration runs once (its linears have no kernel to choose).
    const std::vector<AbqKernel> to_run =
        spec ? cw.run : std::vector<AbqKernel>{AbqKernel::kBinaryMma};
    for (const AbqKernel kernel : to_run) {
      for (int b = 0; b < c.num_layers; ++b) {
        for (LinearKind k : kAllLinears) model->block(b).at(k).abq_kernel = kernel;
      }
      auto run = [&](int n) -> absl::StatusOr<std::pair<double, std::vector<int>>> {
        go.max_new_tokens = n;
        const auto start = Clock::now();
        QCAL_ASSIGN_OR_RETURN(std::vector<int> ids, GenerateGreedy(*model, prompt, go));
        return std::make_pair(Since(start), std::move(ids));
      };
      QCAL_RETURN_IF_ERROR(run(2).status());  // warm-up
      QCAL_ASSIGN_OR_RETURN(auto first, run(1));
      QCAL_ASSIGN_OR_RETURN(auto all, run(options.tokens + 1));
      DecodeBenchRow row;
      row.config =
          !spec ? cw.config : cw.config + (kernel == AbqKernel::kWeightOnly ? "A16" : "A8");
      row.kernel = spec ? kernels::AbqKernelName(kernel) : "dense";
      row.seconds = std::max(all.first - first.first, 1e-9);
      row.tokens_per_second = options.tokens / row.seconds;
      row.weight_bytes = weight_bytes;
      row.device_bytes = device_bytes;
      row.generated = std::move(all.second);
      if (log) {
        log(absl::StrCat(row.config, " ", row.kernel, ": ", row.tokens_per_second, " tokens/s"));
      }
      r.rows.push_back(std::move(row));
    }
  }
  return r;
}

}  // namespace qcal::engine
