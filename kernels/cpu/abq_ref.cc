#include "kernels/cpu/abq_ref.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <string>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/status.h"

namespace qcal::kernels {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

int32_t ActMax(const AbqSpec& spec) { return (1 << (spec.act_bits - 1)) - 1; }

absl::Status SizeError(const char* what, size_t got, int64_t want) {
  return absl::InvalidArgumentError(
      absl::StrCat("ABQ: ", what, " has ", got, " elements, expected ", want));
}

// Sets bit k of a plane row when `bit` is 1.
void SetBit(uint32_t* row, int64_t k, uint32_t bit) {
  row[k / kAbqWordBits] |= bit << (k % kAbqWordBits);
}
uint32_t GetBit(const uint32_t* row, int64_t k) {
  return (row[k / kAbqWordBits] >> (k % kAbqWordBits)) & 1u;
}

// Code k of a GPTQ v1 bit stream whose word r is stream[r * stride] (b bits, little-endian).
uint32_t StreamCode(const int32_t* stream, int64_t stride, int64_t k, int b) {
  const int64_t bit = k * b;
  const int64_t word = bit / 32;
  const int shift = static_cast<int>(bit % 32);
  uint64_t v = static_cast<uint32_t>(stream[word * stride]);
  if (shift + b > 32) v |= uint64_t{static_cast<uint32_t>(stream[(word + 1) * stride])} << 32;
  return static_cast<uint32_t>(v >> shift) & ((1u << b) - 1);
}

absl::Status CheckOperands(const AbqActivations& a, const AbqWeights& w) {
  if (a.spec.weight_bits != w.spec.weight_bits || a.spec.act_bits != w.spec.act_bits ||
      AbqGroupSize(a.spec, a.k) != AbqGroupSize(w.spec, w.k) || a.k != w.k) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ABQ: operands do not match: activations W", a.spec.weight_bits, "A", a.spec.act_bits, " g",
        a.spec.group_size, " k ", a.k, ", weights W", w.spec.weight_bits, "A", w.spec.act_bits,
        " g", w.spec.group_size, " k ", w.k));
  }
  return ValidateAbqShape(w.spec, a.m, w.n, w.k);
}

}  // namespace

const char* AbqKernelName(AbqKernel kernel) {
  switch (kernel) {
    case AbqKernel::kBinaryMma:
      return "b1";
    case AbqKernel::kInt8Mma:
      return "int8";
    case AbqKernel::kWeightOnly:
      return "a16";
  }
  return "?";
}

absl::StatusOr<AbqKernel> ParseAbqKernel(std::string_view name) {
  for (AbqKernel k : {AbqKernel::kBinaryMma, AbqKernel::kInt8Mma, AbqKernel::kWeightOnly}) {
    if (name == AbqKernelName(k)) return k;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("ABQ: unknown kernel \"", std::string(name), "\" (b1, int8 or a16)"));
}

absl::Status ValidateAbqSpec(const AbqSpec& spec) {
  const int wb = spec.weight_bits, ab = spec.act_bits;
  if (wb != 2 && wb != 3 && wb != 4 && wb != 8) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ABQ: weight bits must be 2, 3, 4 or 8 (the balanced grid uses 3 planes), got ", wb));
  }
  if (ab == 16) {
    return absl::InvalidArgumentError(
        "ABQ: activation bits 16 (A16) have no activation planes; the ABQ integer GEMM takes "
        "activation bits 4 or 8 (A16 is the weight-only path)");
  }
  if (ab != 4 && ab != 8) {
    return absl::InvalidArgumentError(
        absl::StrCat("ABQ: activation bits must be 4 or 8, got ", ab));
  }
  if (spec.group_size != -1 && (spec.group_size < 1 || spec.group_size % kAbqWordBits != 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "ABQ: group size must be -1 (per output channel) or a positive multiple of 32 (a k-group "
        "is whole 32-bit plane words), got ",
        spec.group_size));
  }
  return absl::OkStatus();
}

absl::StatusOr<AbqSpec> AbqSpecFor(const QuantSpec& weights, int act_bits) {
  if (weights.grid == GridKind::kCuberoot) {
    return absl::InvalidArgumentError(
        "ABQ: the cuberoot grid is not linear in its codes; no integer GEMM computes it");
  }
  if (weights.grid == GridKind::kBalanced && weights.bits != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("ABQ: the balanced grid has bits 2, got ", weights.bits));
  }
  AbqSpec spec;
  spec.weight_bits = CodeBits(weights);
  spec.act_bits = act_bits;
  spec.group_size = weights.group_size;
  QCAL_RETURN_IF_ERROR(ValidateAbqSpec(spec));
  return spec;
}

int64_t AbqWords(int64_t k) { return (k + kAbqWordBits - 1) / kAbqWordBits; }

int64_t AbqGroupSize(const AbqSpec& spec, int64_t k) {
  return (spec.group_size <= 0 || spec.group_size >= k) ? k : spec.group_size;
}

int64_t AbqNumGroups(const AbqSpec& spec, int64_t k) {
  const int64_t g = AbqGroupSize(spec, k);
  return (k + g - 1) / g;
}

absl::Status ValidateAbqShape(const AbqSpec& spec, int64_t m, int64_t n, int64_t k) {
  QCAL_RETURN_IF_ERROR(ValidateAbqSpec(spec));
  if (m < 1 || n < 1 || k < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("ABQ: m, n and k must be >= 1, got m ", m, ", n ", n, ", k ", k));
  }
  const int64_t g = AbqGroupSize(spec, k);
  const int64_t per_column = int64_t{ActMax(spec)} * ((int64_t{1} << (spec.weight_bits + 1)) - 1);
  if (g > kInt32Max / per_column) {
    return absl::InvalidArgumentError(
        absl::StrCat("ABQ: a k-group of ", g, " columns at W", spec.weight_bits, "A", spec.act_bits,
                     " can overflow the int32 sums (at most ", kInt32Max / per_column,
                     " columns per group); use a smaller group size"));
  }
  return absl::OkStatus();
}

absl::StatusOr<AbqWeights> PackAbqWeights(std::span<const int32_t> codes,
                                          std::span<const int32_t> zeros,
                                          std::span<const float> scales, int64_t n, int64_t k,
                                          const AbqSpec& spec) {
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(spec, 1, n, k));
  AbqWeights w;
  w.spec = spec;
  w.n = n;
  w.k = k;
  w.words = AbqWords(k);
  w.n_groups = AbqNumGroups(spec, k);
  if (static_cast<int64_t>(codes.size()) != n * k) return SizeError("codes", codes.size(), n * k);
  if (static_cast<int64_t>(zeros.size()) != w.n_groups * n) {
    return SizeError("zeros", zeros.size(), w.n_groups * n);
  }
  if (static_cast<int64_t>(scales.size()) != w.n_groups * n) {
    return SizeError("scales", scales.size(), w.n_groups * n);
  }
  const int wb = spec.weight_bits;
  const int32_t max_code = (1 << wb) - 1;
  for (int64_t i = 0; i < w.n_groups * n; ++i) {
    if (zeros[i] < 0 || zeros[i] > max_code + 1) {
      return absl::InvalidArgumentError(absl::StrCat("ABQ: zero point ", zeros[i], " at ", i,
                                                     " is outside [0, ", max_code + 1, "]"));
    }
    if (!std::isfinite(scales[i])) {
      return absl::InvalidArgumentError(absl::StrCat("ABQ: scale at ", i, " is not finite"));
    }
  }
  w.zeros.assign(zeros.begin(), zeros.end());
  w.scales.assign(scales.begin(), scales.end());
  w.planes.assign(static_cast<size_t>(n * wb * w.words), 0u);
  for (int64_t o = 0; o < n; ++o) {
    for (int64_t c = 0; c < k; ++c) {
      const int32_t q = codes[o * k + c];
      if (q < 0 || q > max_code) {
        return absl::InvalidArgumentError(absl::StrCat("ABQ: weight code ", q, " at [", o, "][", c,
                                                       "] is outside [0, ", max_code, "]"));
      }
      for (int j = 0; j < wb; ++j) {
        SetBit(&w.planes[(o * wb + j) * w.words], c, (static_cast<uint32_t>(q) >> j) & 1u);
      }
    }
  }
  return w;
}

absl::Status ValidateAbqWeights(const AbqWeights& w) {
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(w.spec, 1, w.n, w.k));
  const int64_t words = AbqWords(w.k), n_groups = AbqNumGroups(w.spec, w.k);
  if (w.words != words || w.n_groups != n_groups) {
    return absl::InvalidArgumentError(absl::StrCat("ABQ: weights have words ", w.words,
                                                   " and n_groups ", w.n_groups, ", expected ",
                                                   words, " and ", n_groups, " for k ", w.k));
  }
  if (n_groups > kAbqMaxGroups) {
    return absl::InvalidArgumentError(
        absl::StrCat("ABQ: ", n_groups, " k-groups, at most ", kAbqMaxGroups,
                     " are supported (the CUDA prologue keeps Σa per group in shared memory)"));
  }
  const int wb = w.spec.weight_bits;
  if (static_cast<int64_t>(w.planes.size()) != w.n * wb * words) {
    return SizeError("planes", w.planes.size(), w.n * wb * words);
  }
  if (static_cast<int64_t>(w.scales.size()) != n_groups * w.n) {
    return SizeError("scales", w.scales.size(), n_groups * w.n);
  }
  if (static_cast<int64_t>(w.zeros.size()) != n_groups * w.n) {
    return SizeError("zeros", w.zeros.size(), n_groups * w.n);
  }
  for (int64_t i = 0; i < n_groups * w.n; ++i) {
    if (w.zeros[i] < 0 || w.zeros[i] > (1 << wb)) {
      return absl::InvalidArgumentError(absl::StrCat("ABQ: zero point ", w.zeros[i], " at ", i,
                                                     " is outside [0, ", 1 << wb, "]"));
    }
    if (!std::isfinite(w.scales[i])) {
      return absl::InvalidArgumentError(absl::StrCat("ABQ: scale at ", i, " is not finite"));
    }
  }
  if (w.k % kAbqWordBits != 0) {
    const uint32_t padding = ~((1u << (w.k % kAbqWordBits)) - 1);
    for (int64_t row = 0; row < w.n * wb; ++row) {
      if ((w.planes[(row + 1) * words - 1] & padding) != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            "ABQ: plane row ", row, " has bits set past column k = ", w.k, " (padding must be 0)"));
      }
    }
  }
  return absl::OkStatus();
}

std::vector<int32_t> UnpackAbqWeightCodes(const AbqWeights& w) {
  const int wb = w.spec.weight_bits;
  std::vector<int32_t> codes(static_cast<size_t>(w.n * w.k), 0);
  for (int64_t o = 0; o < w.n; ++o) {
    for (int64_t c = 0; c < w.k; ++c) {
      int32_t q = 0;
      for (int j = 0; j < wb; ++j) {
        q |= static_cast<int32_t>(GetBit(&w.planes[(o * wb + j) * w.words], c)) << j;
      }
      codes[o * w.k + c] = q;
    }
  }
  return codes;
}

absl::StatusOr<AbqWeights> PackGptqV1ToAbq(std::span<const int32_t> qweight,
                                           std::span<const int32_t> qzeros,
                                           std::span<const float> scales,
                                           std::span<const int32_t> g_idx, int64_t d_out,
                                           int64_t d_in, const AbqSpec& spec) {
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(spec, 1, d_out, d_in));
  const int b = spec.weight_bits;
  const int64_t g = AbqGroupSize(spec, d_in);
  const int64_t n_groups = AbqNumGroups(spec, d_in);
  const int64_t in_words = (d_in + 31) / 32 * b;
  const int64_t out_words = (d_out + 31) / 32 * b;
  if (static_cast<int64_t>(qweight.size()) != in_words * d_out) {
    return SizeError("qweight", qweight.size(), in_words * d_out);
  }
  if (static_cast<int64_t>(qzeros.size()) != n_groups * out_words) {
    return SizeError("qzeros", qzeros.size(), n_groups * out_words);
  }
  if (static_cast<int64_t>(scales.size()) != n_groups * d_out) {
    return SizeError("scales", scales.size(), n_groups * d_out);
  }
  if (static_cast<int64_t>(g_idx.size()) != d_in) return SizeError("g_idx", g_idx.size(), d_in);
  for (int64_t c = 0; c < d_in; ++c) {
    if (g_idx[c] != c / g) {
      return absl::InvalidArgumentError(absl::StrCat(
          "ABQ: g_idx[", c, "] = ", g_idx[c], ", expected ", c / g, " (group size ", g,
          "): act-order checkpoints (g_idx not k / group_size) are not supported by the ABQ "
          "layout, whose k-groups are consecutive columns"));
    }
  }
  std::vector<int32_t> codes(static_cast<size_t>(d_out * d_in));
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t c = 0; c < d_in; ++c) {
      codes[o * d_in + c] = static_cast<int32_t>(StreamCode(qweight.data() + o, d_out, c, b));
    }
  }
  std::vector<int32_t> zeros(static_cast<size_t>(n_groups * d_out));
  for (int64_t gr = 0; gr < n_groups; ++gr) {
    for (int64_t o = 0; o < d_out; ++o) {
      zeros[gr * d_out + o] =
          static_cast<int32_t>(StreamCode(qzeros.data() + gr * out_words, 1, o, b)) + 1;
    }
  }
  return PackAbqWeights(codes, zeros, scales, d_out, d_in, spec);
}

absl::StatusOr<AbqActivations> PackAbqActivationCodes(std::span<const int32_t> codes,
                                                      std::span<const float> scales, int64_t m,
                                                      int64_t k, const AbqSpec& spec) {
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(spec, m, 1, k));
  if (static_cast<int64_t>(codes.size()) != m * k) return SizeError("codes", codes.size(), m * k);
  if (static_cast<int64_t>(scales.size()) != m) return SizeError("scales", scales.size(), m);
  AbqActivations a;
  a.spec = spec;
  a.m = m;
  a.k = k;
  a.words = AbqWords(k);
  a.n_groups = AbqNumGroups(spec, k);
  a.scales.assign(scales.begin(), scales.end());
  a.sums.assign(static_cast<size_t>(m * a.n_groups), 0);
  a.planes.assign(static_cast<size_t>(m * spec.act_bits * a.words), 0u);
  const int ab = spec.act_bits;
  const int32_t amax = ActMax(spec);
  const int64_t g = AbqGroupSize(spec, k);
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t c = 0; c < k; ++c) {
      const int32_t v = codes[t * k + c];
      if (v < -amax || v > amax) {
        return absl::InvalidArgumentError(absl::StrCat("ABQ: activation code ", v, " at [", t, "][",
                                                       c, "] is outside [", -amax, ", ", amax,
                                                       "]"));
      }
      a.sums[t * a.n_groups + c / g] += v;
      const uint32_t twos = static_cast<uint32_t>(v) & ((1u << ab) - 1);  // ab-bit two's complement
      for (int i = 0; i < ab; ++i) {
        SetBit(&a.planes[(t * ab + i) * a.words], c, (twos >> i) & 1u);
      }
    }
  }
  return a;
}

absl::StatusOr<AbqActivations> AbqQuantizeActivations(std::span<const float> x, int64_t m,
                                                      int64_t k, const AbqSpec& spec) {
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(spec, m, 1, k));
  if (static_cast<int64_t>(x.size()) != m * k) return SizeError("x", x.size(), m * k);
  // The arithmetic of ref::ActQuant, so that s_a * a is its output bit for bit.
  const float qmax = static_cast<float>(ActMax(spec));
  std::vector<int32_t> codes(static_cast<size_t>(m * k), 0);
  std::vector<float> scales(static_cast<size_t>(m), 0.0f);
  for (int64_t t = 0; t < m; ++t) {
    const float* xr = x.data() + t * k;
    float amax = 0.0f;
    for (int64_t c = 0; c < k; ++c) amax = std::max(amax, std::fabs(xr[c]));
    const float s = amax / qmax;
    scales[t] = s;
    if (s == 0.0f) continue;
    for (int64_t c = 0; c < k; ++c) {
      // Subnormal s can push |x / s| past qmax; the clamp keeps the code on the grid, and
      // !(q >= -qmax) also maps NaN to -qmax rather than to an undefined conversion.
      float q = RoundHalfEven(xr[c] / s);
      if (!(q >= -qmax)) q = -qmax;
      if (q > qmax) q = qmax;
      codes[t * k + c] = static_cast<int32_t>(q);
    }
  }
  return PackAbqActivationCodes(codes, scales, m, k, spec);
}

std::vector<int32_t> UnpackAbqActivationCodes(const AbqActivations& a) {
  const int ab = a.spec.act_bits;
  std::vector<int32_t> codes(static_cast<size_t>(a.m * a.k), 0);
  for (int64_t t = 0; t < a.m; ++t) {
    for (int64_t c = 0; c < a.k; ++c) {
      int32_t v = 0;
      for (int i = 0; i < ab; ++i) {
        const int32_t bit = static_cast<int32_t>(GetBit(&a.planes[(t * ab + i) * a.words], c));
        v += i == ab - 1 ? -(bit << i) : (bit << i);
      }
      codes[t * a.k + c] = v;
    }
  }
  return codes;
}

absl::StatusOr<std::vector<int32_t>> AbqIntegerGemm(const AbqActivations& a, const AbqWeights& w) {
  QCAL_RETURN_IF_ERROR(CheckOperands(a, w));
  const int ab = a.spec.act_bits, wb = w.spec.weight_bits;
  const int64_t words = w.words, n_groups = w.n_groups;
  const int64_t group_words = AbqGroupSize(w.spec, w.k) / kAbqWordBits;  // per-channel: unused
  std::vector<int32_t> dot(static_cast<size_t>(a.m * w.n * n_groups), 0);
  for (int64_t t = 0; t < a.m; ++t) {
    for (int64_t o = 0; o < w.n; ++o) {
      for (int64_t gr = 0; gr < n_groups; ++gr) {
        const int64_t w0 = n_groups == 1 ? 0 : gr * group_words;
        const int64_t w1 = n_groups == 1 ? words : std::min(words, (gr + 1) * group_words);
        // int64 here; ValidateAbqShape guarantees the result fits in int32.
        int64_t sum = 0;
        for (int i = 0; i < ab; ++i) {
          const uint32_t* ai = &a.planes[(t * ab + i) * words];
          for (int j = 0; j < wb; ++j) {
            const uint32_t* wj = &w.planes[(o * wb + j) * words];
            int64_t pop = 0;
            for (int64_t x = w0; x < w1; ++x) pop += std::popcount(ai[x] & wj[x]);
            const int64_t term = pop << (i + j);
            sum += i == ab - 1 ? -term : term;
          }
        }
        dot[(t * w.n + o) * n_groups + gr] = static_cast<int32_t>(sum);
      }
    }
  }
  return dot;
}

absl::StatusOr<std::vector<float>> AbqEpilogue(std::span<const int32_t> dot,
                                               const AbqActivations& a, const AbqWeights& w) {
  QCAL_RETURN_IF_ERROR(CheckOperands(a, w));
  const int64_t n_groups = w.n_groups;
  if (static_cast<int64_t>(dot.size()) != a.m * w.n * n_groups) {
    return SizeError("dot", dot.size(), a.m * w.n * n_groups);
  }
  std::vector<float> y(static_cast<size_t>(a.m * w.n));
  for (int64_t t = 0; t < a.m; ++t) {
    for (int64_t o = 0; o < w.n; ++o) {
      double acc = 0.0;
      for (int64_t gr = 0; gr < n_groups; ++gr) {
        // Exact in int32 by ValidateAbqShape's bound; the product is exact in fp64.
        const int32_t c =
            dot[(t * w.n + o) * n_groups + gr] - w.zeros[gr * w.n + o] * a.sums[t * n_groups + gr];
        acc += static_cast<double>(c) * double{w.scales[gr * w.n + o]};
      }
      y[t * w.n + o] = static_cast<float>(double{a.scales[t]} * acc);
    }
  }
  return y;
}

absl::StatusOr<std::vector<float>> AbqGemm(const AbqActivations& a, const AbqWeights& w) {
  QCAL_ASSIGN_OR_RETURN(std::vector<int32_t> dot, AbqIntegerGemm(a, w));
  return AbqEpilogue(dot, a, w);
}

double AbqEpilogueErrorBound(std::span<const int32_t> dot, const AbqActivations& a,
                             const AbqWeights& w, int64_t t, int64_t o) {
  const int64_t n_groups = w.n_groups;
  double total = 0;
  for (int64_t gr = 0; gr < n_groups; ++gr) {
    const int64_t c = int64_t{dot[(t * w.n + o) * n_groups + gr]} -
                      int64_t{w.zeros[gr * w.n + o]} * a.sums[t * n_groups + gr];
    total += std::fabs(static_cast<double>(w.scales[gr * w.n + o]) * static_cast<double>(c));
  }
  // One fp32 rounding of the result (2^-24 relative), and the fp64 sum and product (n_groups + 1
  // roundings of 2^-53) together below another 2^-24 for any n_groups < 2^28.
  return std::ldexp(1.0, -23) * std::fabs(static_cast<double>(a.scales[t])) * total;
}

absl::StatusOr<std::vector<double>> AbqWeightOnlyReference(std::span<const float> x, int64_t m,
                                                           const AbqWeights& w) {
  QCAL_RETURN_IF_ERROR(ValidateAbqShape(w.spec, m, w.n, w.k));
  if (static_cast<int64_t>(x.size()) != m * w.k) return SizeError("x", x.size(), m * w.k);
  const std::vector<int32_t> codes = UnpackAbqWeightCodes(w);
  const int64_t g = AbqGroupSize(w.spec, w.k);
  std::vector<double> y(static_cast<size_t>(m * w.n), 0.0);
  for (int64_t t = 0; t < m; ++t) {
    for (int64_t o = 0; o < w.n; ++o) {
      double total = 0;
      for (int64_t gr = 0; gr < w.n_groups; ++gr) {
        const int32_t z = w.zeros[gr * w.n + o];
        double sum = 0;
        for (int64_t c = gr * g; c < std::min(w.k, (gr + 1) * g); ++c) {
          sum += double{RoundToBf16(x[t * w.k + c])} * (codes[o * w.k + c] - z);
        }
        total += double{w.scales[gr * w.n + o]} * sum;
      }
      y[t * w.n + o] = total;
    }
  }
  return y;
}

double AbqWeightOnlyErrorBound(std::span<const float> x, const AbqWeights& w, int64_t t,
                               int64_t o) {
  const int wb = w.spec.weight_bits;
  const int64_t g = AbqGroupSize(w.spec, w.k);
  double total = 0;
  for (int64_t gr = 0; gr < w.n_groups; ++gr) {
    const int32_t z = w.zeros[gr * w.n + o];
    double sum = 0;
    for (int64_t c = gr * g; c < std::min(w.k, (gr + 1) * g); ++c) {
      int32_t q = 0;
      for (int j = 0; j < wb; ++j)
        q |= static_cast<int32_t>(GetBit(&w.planes[(o * wb + j) * w.words], c)) << j;
      sum += std::fabs(double{RoundToBf16(x[t * w.k + c])} * (q - z));
    }
    total += std::fabs(double{w.scales[gr * w.n + o]}) * sum;
  }
  return static_cast<double>(g + w.n_groups + 2) * std::ldexp(1.0, -22) * total;
}

}  // namespace qcal::kernels
