#include "kernels/abq_bench.h"

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status.h"
#include "kernels/cpu/abq_ref.h"
#if QCAL_HAVE_CUDA
#include "kernels/cuda/cuda_abq.h"
#endif

namespace qcal::kernels {

absl::Status AbqBenchOptions::Validate() const {
  if (shapes.empty() || tokens.empty()) {
    return absl::InvalidArgumentError("ABQ bench: no shapes or no token counts");
  }
  for (const auto& [d_out, d_in] : shapes) {
    if (d_out < 1 || d_in < 1) {
      return absl::InvalidArgumentError(absl::StrCat("ABQ bench: bad shape ", d_out, " x ", d_in));
    }
  }
  for (int64_t m : tokens) {
    if (m < 1) return absl::InvalidArgumentError(absl::StrCat("ABQ bench: bad m ", m));
  }
  if (iters < 1) return absl::InvalidArgumentError(absl::StrCat("ABQ bench: bad iters ", iters));
  return ValidateAbqSpec(AbqSpec{4, 8, group_size});
}

#if QCAL_HAVE_CUDA
namespace {

struct Config {
  const char* name;
  int weight_bits;  // planes (3 for the balanced grid)
  int act_bits;     // 16: weight-only
};

// The configurations of DESIGN section 3's benchmark; W2* is the balanced grid (3 planes).
constexpr Config kConfigs[] = {{"W4A16", 4, 16}, {"W2*A16", 3, 16}, {"W2A8", 2, 8}, {"W2*A8", 3, 8},
                               {"W4A8", 4, 8},   {"W4A4", 4, 4},    {"W8A8", 8, 8}};

uint64_t SplitMix(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Random packed weights without going through codes (every bit pattern of the planes is a valid
// code; d_in multiple of 32 keeps the padding bits zero, otherwise they are cleared).
AbqWeights RandomPackedWeights(const AbqSpec& spec, int64_t n, int64_t k, uint64_t seed) {
  AbqWeights w;
  w.spec = spec;
  w.n = n;
  w.k = k;
  w.words = AbqWords(k);
  w.n_groups = AbqNumGroups(spec, k);
  uint64_t state = seed;
  w.planes.resize(static_cast<size_t>(n * spec.weight_bits * w.words));
  for (size_t i = 0; i < w.planes.size(); i += 2) {
    const uint64_t r = SplitMix(state);
    w.planes[i] = static_cast<uint32_t>(r);
    if (i + 1 < w.planes.size()) w.planes[i + 1] = static_cast<uint32_t>(r >> 32);
  }
  if (k % kAbqWordBits != 0) {
    const uint32_t mask = (1u << (k % kAbqWordBits)) - 1;
    for (size_t row = 0; row < w.planes.size() / w.words; ++row) {
      w.planes[(row + 1) * w.words - 1] &= mask;
    }
  }
  // An fp16 value, as a GPTQ checkpoint's scales are.
  w.scales.assign(static_cast<size_t>(w.n_groups * n), RoundToHalf(0.01f));
  w.zeros.assign(static_cast<size_t>(w.n_groups * n), 1 << (spec.weight_bits - 1));
  return w;
}

}  // namespace

absl::StatusOr<std::vector<AbqBenchRow>> RunAbqBench(
    const AbqBenchOptions& options, const std::function<void(const std::string&)>& log) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  std::vector<AbqBenchRow> rows;
  for (const auto& [n, k] : options.shapes) {
    log(absl::StrCat(n, " x ", k, ": cuBLAS"));
    {
      QCAL_ASSIGN_OR_RETURN(double s,
                            TimeNullLaunch(options.device, options.iters, options.timing));
      rows.push_back({n, k, 1, "-", "null", s, 0});
    }
    for (int64_t m : options.tokens) {
      for (bool int8 : {false, true}) {
        QCAL_ASSIGN_OR_RETURN(
            double s, TimeCublasGemm(int8, m, n, k, options.device, options.iters, options.timing));
        const double in = int8 ? 1 : 2, out = int8 ? 4 : 2;
        rows.push_back({n, k, m, int8 ? "W8A8" : "bf16", int8 ? "cublas-int8" : "cublas", s,
                        in * (n * k + m * k) + out * m * n});
      }
    }
    for (const Config& c : kConfigs) {
      log(absl::StrCat(n, " x ", k, ": ", c.name));
      const bool a16 = c.act_bits == 16;
      const AbqSpec spec{c.weight_bits, a16 ? 8 : c.act_bits, options.group_size};
      const AbqWeights w = RandomPackedWeights(spec, n, k, options.seed + c.weight_bits);
      QCAL_ASSIGN_OR_RETURN(auto linear, CudaAbqLinear::Create(w, options.device));
      // Weights, scales and zeros, x (fp32) in and y (fp32) out; the ABQ kernels also write and
      // read the activation planes once.
      const double weight_bytes =
          4.0 * static_cast<double>(w.planes.size()) + 8.0 * static_cast<double>(w.scales.size());
      for (int64_t m : options.tokens) {
        const double io = 4.0 * (m * k + m * n);
        const double planes = 2 * 4.0 * m * spec.act_bits * w.words;
        const std::vector<AbqKernel> kernels =
            a16 ? std::vector<AbqKernel>{AbqKernel::kWeightOnly}
                : std::vector<AbqKernel>{AbqKernel::kBinaryMma, AbqKernel::kInt8Mma};
        for (AbqKernel kernel : kernels) {
          QCAL_ASSIGN_OR_RETURN(
              double s, linear->TimeForward(m, kernel, options.iters, CudaAbqLinear::Part::kWhole,
                                            options.timing));
          rows.push_back({n, k, m, c.name, AbqKernelName(kernel), s,
                          weight_bytes + io + (a16 ? 0.0 : planes)});
        }
        // Where b1 runs the GEMV kernel (m <= 4), its two launches apart: the prologue and the
        // GEMM alone (their sum exceeds the whole layer by what programmatic launch overlaps).
        if (!a16 && m <= kAbqGemvTokens) {
          using Part = CudaAbqLinear::Part;
          for (const auto& [part, name] :
               {std::pair{Part::kPrologue, "prologue"}, std::pair{Part::kGemm, "b1-gemm"}}) {
            QCAL_ASSIGN_OR_RETURN(
                double s,
                linear->TimeForward(m, AbqKernel::kBinaryMma, options.iters, part, options.timing));
            rows.push_back({n, k, m, c.name, name, s,
                            part == Part::kPrologue ? io - 4.0 * m * n + planes / 2
                                                    : weight_bytes + 4.0 * m * n + planes / 2});
          }
        }
        // At decode sizes b1 runs the GEMV kernel (m <= 4) or the decode kernel where they
        // apply; the decode and tiled kernels beside it, and the fused one-launch layer where it
        // applies (m = 1).
        if (!a16 && m <= kAbqDecodeTokens) {
          using B1 = CudaAbqLinear::B1Kernel;
          std::vector<std::pair<B1, const char*>> variants = {{B1::kDecode, "b1-decode"},
                                                              {B1::kTiled, "b1-tiled"}};
          if (linear->FusedApplies(m)) variants.emplace_back(B1::kFused, "b1-fused");
          for (const auto& [b1, name] : variants) {
            QCAL_RETURN_IF_ERROR(linear->set_b1_kernel(b1));
            auto s = linear->TimeForward(m, AbqKernel::kBinaryMma, options.iters,
                                         CudaAbqLinear::Part::kWhole, options.timing);
            QCAL_RETURN_IF_ERROR(linear->set_b1_kernel(B1::kDispatch));
            if (!s.ok()) return s.status();
            // The fused layer keeps the activation planes in shared memory, and reads s_w and z
            // as one word each where the scales are fp16 values.
            const double bytes =
                b1 != B1::kFused ? weight_bytes + io + planes
                : linear->HasCompactMeta()
                    ? 4.0 * static_cast<double>(w.planes.size() + w.scales.size()) + io
                    : weight_bytes + io;
            rows.push_back({n, k, m, c.name, name, *s, bytes});
          }
          // The one-token layer on the CUDA cores (2-bit digits and dp4a; not b1), where it
          // applies: its digits (2 bits a weight a digit), one word of s_w and z, x and y.
          QCAL_RETURN_IF_ERROR(linear->set_b1_kernel(B1::kDp4a));
          if (linear->Dp4aApplies(m)) {
            auto s = linear->TimeForward(m, AbqKernel::kBinaryMma, options.iters,
                                         CudaAbqLinear::Part::kWhole, options.timing);
            QCAL_RETURN_IF_ERROR(linear->set_b1_kernel(B1::kDispatch));
            if (!s.ok()) return s.status();
            const double digit_bytes =
                static_cast<double>(n) * ((spec.weight_bits + 1) / 2) * static_cast<double>(k) / 4;
            const double meta_bytes =
                (linear->HasCompactMeta() ? 4.0 : 8.0) * static_cast<double>(w.scales.size());
            rows.push_back({n, k, m, c.name, "dp4a", *s, digit_bytes + meta_bytes + io});
            // The floor under it: one launch that only streams the same bytes.
            QCAL_ASSIGN_OR_RETURN(const double floor,
                                  TimeReadFloor(digit_bytes + meta_bytes + io, options.device,
                                                options.iters, options.timing));
            rows.push_back({n, k, m, c.name, "read", floor, digit_bytes + meta_bytes + io});
          }
          QCAL_RETURN_IF_ERROR(linear->set_b1_kernel(B1::kDispatch));
        }
      }
    }
  }
  return rows;
}
#else
absl::StatusOr<std::vector<AbqBenchRow>> RunAbqBench(
    const AbqBenchOptions& options, const std::function<void(const std::string&)>& log) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  return absl::FailedPreconditionError(
      "qcal bench --abq needs the CUDA kernels, but qcal was built without CUDA");
}
#endif

}  // namespace qcal::kernels
