#include "kernels/cpu/ref_ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "kernels/quant_grid.h"

namespace qcal::kernels::ref {
namespace {

inline float Op(float v, bool bf16) { return bf16 ? RoundToBf16(v) : v; }

}  // namespace

void Linear(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n,
            int64_t k, bool accumulate, bool bf16_operands) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        acc += double(Op(x[i * k + p], bf16_operands)) * double(Op(w[j * k + p], bf16_operands));
      }
      if (bias) acc += bias[j];
      y[i * n + j] = accumulate ? float(y[i * n + j] + acc) : float(acc);
    }
  }
}

void RmsNorm(const float* x, const float* weight, float eps, float* y, int64_t rows,
             int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    double ss = 0;
    for (int64_t c = 0; c < width; ++c) ss += double(xr[c]) * xr[c];
    const float inv = float(1.0 / std::sqrt(ss / width + eps));
    float* yr = y + r * width;
    for (int64_t c = 0; c < width; ++c) yr[c] = xr[c] * inv * weight[c];
  }
}

double RopeInvFreq(int i, const RopeShape& shape) {
  const RopeScaling& r = shape.scaling;
  const int dim = shape.head_dim;
  const double inv_freq = std::pow(shape.theta, -2.0 * i / dim);
  switch (r.type) {
    case RopeScaling::Type::kDefault:
      return inv_freq;
    case RopeScaling::Type::kLinear:
      return inv_freq / r.factor;
    case RopeScaling::Type::kLlama3: {
      const double old_context = r.original_max_position_embeddings;
      const double low_freq_wavelen = old_context / r.low_freq_factor;
      const double high_freq_wavelen = old_context / r.high_freq_factor;
      const double wavelen = 2 * M_PI / inv_freq;
      if (wavelen < high_freq_wavelen) return inv_freq;
      if (wavelen > low_freq_wavelen) return inv_freq / r.factor;
      const double smooth =
          (old_context / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
      return (1 - smooth) * inv_freq / r.factor + smooth * inv_freq;
    }
    case RopeScaling::Type::kYarn: {
      const double base = shape.theta;
      auto correction_dim = [&](double rotations) {
        return dim * std::log(r.original_max_position_embeddings / (rotations * 2 * M_PI)) /
               (2 * std::log(base));
      };
      double low = correction_dim(r.beta_fast), high = correction_dim(r.beta_slow);
      if (r.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, double(dim - 1));
      if (low == high) high += 0.001;  // transformers' guard against a zero-width ramp
      const double ramp = std::clamp((i - low) / (high - low), 0.0, 1.0);
      const double extrapolation = 1 - ramp;
      const double interpolation = inv_freq / r.factor;
      return interpolation * (1 - extrapolation) + inv_freq * extrapolation;
    }
  }
  return inv_freq;
}

void RopeAngle(int64_t pos, int i, const RopeShape& shape, float* cos_out, float* sin_out) {
  const double angle = double(pos) * RopeInvFreq(i, shape);
  const double scale =
      shape.scaling.type == RopeScaling::Type::kYarn ? shape.scaling.attention_factor : 1.0;
  *cos_out = float(std::cos(angle) * scale);
  *sin_out = float(std::sin(angle) * scale);
}

void Rope(float* x, int64_t rows, int64_t width, const RopeShape& shape) {
  const int half = shape.head_dim / 2;
  const int64_t heads = width / shape.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = shape.offset + r % shape.seq_len;
    for (int i = 0; i < half; ++i) {
      float c, s;
      RopeAngle(pos, i, shape, &c, &s);
      for (int64_t h = 0; h < heads; ++h) {
        float* v = x + r * width + h * shape.head_dim;
        const float a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

namespace {

// Keys a tile of the bf16 path's online softmax (the CUDA kernel's kTcBk).
constexpr int kAttentionTile = 64;

// The bf16 path of Attention for one query row: one pass over tiles of kAttentionTile keys at
// absolute multiples of it, against the running maximum. Per tile: scores s = float(q·k)·scale
// (operands rounded to bf16), m' = max(m, the tile's scores), l and o scaled by α = e^(m − m')
// (fp32), p = e^(s − m') (fp32) added to l unrounded and rounded to bf16 for P·V; out = o / l.
void AttentionRowBf16(const float* qi, const float* k, const float* v, int64_t kv_width, int kvh,
                      int head_dim, int first, int last, float* oi) {
  const float scale = 1.0f / std::sqrt(float(head_dim));
  float m = -INFINITY;
  double l = 0;
  std::vector<double> o(head_dim, 0.0);
  float sc[kAttentionTile];
  for (int t0 = first / kAttentionTile * kAttentionTile; t0 <= last; t0 += kAttentionTile) {
    const int j0 = std::max(first, t0), j1 = std::min(last, t0 + kAttentionTile - 1);
    float mx = -INFINITY;
    for (int j = j0; j <= j1; ++j) {
      const float* kj = k + int64_t(j) * kv_width + kvh * head_dim;
      double dot = 0;
      for (int d = 0; d < head_dim; ++d) dot += double(Op(qi[d], true)) * double(Op(kj[d], true));
      sc[j - j0] = float(dot) * scale;
      mx = std::max(mx, sc[j - j0]);
    }
    const float m_new = std::max(m, mx);
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = std::exp(m - base);
    l *= alpha;
    for (double& x : o) x *= alpha;
    m = m_new;
    for (int j = j0; j <= j1; ++j) {
      const float p = std::exp(sc[j - j0] - base);
      l += p;
      const double pb = Op(p, true);
      const float* vj = v + int64_t(j) * kv_width + kvh * head_dim;
      for (int d = 0; d < head_dim; ++d) o[d] += pb * double(Op(vj[d], true));
    }
  }
  for (int d = 0; d < head_dim; ++d) oi[d] = l > 0 ? float(o[d] / l) : 0.0f;
}

}  // namespace

void Attention(const float* q, const float* k, const float* v, const AttentionShape& s, float* out,
               bool bf16_operands) {
  const int n_rep = s.num_heads / s.num_kv_heads;
  const int64_t q_width = int64_t(s.num_heads) * s.head_dim;
  const int64_t kv_width = int64_t(s.num_kv_heads) * s.head_dim;
  const double scale = 1.0 / std::sqrt(double(s.head_dim));
  std::vector<double> p(s.kv_len);
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.num_heads; ++h) {
      const int kvh = h / n_rep;
      for (int i = 0; i < s.q_len; ++i) {
        const float* qi = q + (int64_t(b) * s.q_len + i) * q_width + h * s.head_dim;
        const int last = s.q_offset + i;
        const int first = s.sliding_window > 0 ? std::max(0, last - s.sliding_window + 1) : 0;
        if (bf16_operands) {
          AttentionRowBf16(qi, k + int64_t(b) * s.kv_len * kv_width,
                           v + int64_t(b) * s.kv_len * kv_width, kv_width, kvh, s.head_dim, first,
                           last, out + (int64_t(b) * s.q_len + i) * q_width + h * s.head_dim);
          continue;
        }
        double mx = -INFINITY;
        for (int j = first; j <= last; ++j) {
          const float* kj = k + (int64_t(b) * s.kv_len + j) * kv_width + kvh * s.head_dim;
          double dot = 0;
          for (int d = 0; d < s.head_dim; ++d) {
            dot += double(Op(qi[d], bf16_operands)) * double(Op(kj[d], bf16_operands));
          }
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int j = first; j <= last; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        float* oi = out + (int64_t(b) * s.q_len + i) * q_width + h * s.head_dim;
        for (int d = 0; d < s.head_dim; ++d) {
          double acc = 0;
          for (int j = first; j <= last; ++j) {
            const float* vj = v + (int64_t(b) * s.kv_len + j) * kv_width + kvh * s.head_dim;
            acc += double(Op(float(p[j] / sum), bf16_operands)) * double(Op(vj[d], bf16_operands));
          }
          oi[d] = float(acc);
        }
      }
    }
  }
}

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void Add(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void Embedding(const float* table, int64_t vocab, int64_t width, const int32_t* ids, int64_t n,
               float* out) {
  for (int64_t r = 0; r < n; ++r) {
    const float* src = table + int64_t(ids[r]) * width;
    for (int64_t c = 0; c < width; ++c) out[r * width + c] = src[c];
  }
}

void Nll(const float* logits, int64_t rows, int64_t vocab, const int32_t* targets, float* nll) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* l = logits + r * vocab;
    double mx = -INFINITY;
    for (int64_t c = 0; c < vocab; ++c) mx = std::max(mx, double(l[c]));
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(double(l[c]) - mx);
    nll[r] = float(mx + std::log(sum) - double(l[targets[r]]));
  }
}

void AccumulateGram(const float* x, int64_t n, int64_t k, float* h, bool bf16_operands) {
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b) {
      double acc = 0;
      for (int64_t t = 0; t < n; ++t) {
        acc += double(Op(x[t * k + a], bf16_operands)) * double(Op(x[t * k + b], bf16_operands));
      }
      h[a * k + b] += float(acc);
    }
  }
}

void ActQuantCodes(const float* x, int64_t rows, int64_t width, int bits, float* codes,
                   float* scales) {
  const float qmax = static_cast<float>((1 << (bits - 1)) - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    float* cr = codes + r * width;
    float amax = 0.0f;
    for (int64_t c = 0; c < width; ++c) amax = std::max(amax, std::fabs(xr[c]));
    const float s = amax / qmax;
    scales[r] = s;
    for (int64_t c = 0; c < width; ++c) {
      // Subnormal s can push |x / s| past qmax: the clamp keeps the code on the grid.
      cr[c] = s == 0.0f ? 0.0f : std::clamp(RoundHalfEven(xr[c] / s), -qmax, qmax);
    }
  }
}

void ActQuant(const float* x, int64_t rows, int64_t width, int bits, float* out) {
  std::vector<float> codes(static_cast<size_t>(width));
  for (int64_t r = 0; r < rows; ++r) {
    float s = 0.0f;
    ActQuantCodes(x + r * width, 1, width, bits, codes.data(), &s);
    float* yr = out + r * width;
    for (int64_t c = 0; c < width; ++c) yr[c] = s * codes[c];
  }
}

void ActQuantLinear(const float* x, int64_t m, int64_t k, int bits, const float* w, int64_t n,
                    const float* bias, float* y, bool accumulate) {
  std::vector<float> codes(static_cast<size_t>(k));
  for (int64_t t = 0; t < m; ++t) {
    float s = 0.0f;
    ActQuantCodes(x + t * k, 1, k, bits, codes.data(), &s);
    for (int64_t o = 0; o < n; ++o) {
      double sum = 0;
      for (int64_t c = 0; c < k; ++c) sum += double{codes[c]} * double{w[o * k + c]};
      float v = static_cast<float>(double{s} * sum);
      if (bias) v += bias[o];
      y[t * n + o] = accumulate ? y[t * n + o] + v : v;
    }
  }
}

ChannelStats ChannelAbsStats(const float* x, int64_t rows, int64_t width, int64_t seq_len) {
  ChannelStats out;
  out.max_abs.assign(static_cast<size_t>(width), 0.0f);
  out.sum_abs.assign(static_cast<size_t>(width), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    for (int64_t j = 0; j < width; ++j) {
      if (!std::isfinite(xr[j]) && (out.first_bad_column < 0 || j < out.first_bad_column)) {
        out.first_bad_column = j;
      }
    }
    if (seq_len > 0 && r % seq_len == 0) {
      ++out.skipped;
      continue;
    }
    for (int64_t j = 0; j < width; ++j) {
      const float v = std::fabs(xr[j]);
      out.max_abs[j] = std::max(out.max_abs[j], v);
      out.sum_abs[j] += v;
    }
    ++out.tokens;
  }
  return out;
}

void ScaleColumns(float* w, int64_t rows, int64_t width, const float* m) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) w[r * width + j] *= m[j];
  }
}

void DivideRows(float* w, int64_t rows, int64_t width, const float* m) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) w[r * width + j] /= m[r];
  }
}

}  // namespace qcal::kernels::ref
