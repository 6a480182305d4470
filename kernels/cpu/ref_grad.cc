#include "kernels/cpu/ref_grad.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/dtype.h"
#include "kernels/cpu/ref_ops.h"

namespace qcal::kernels::ref {
namespace {

// A GEMM operand, rounded to bf16 when asked (through float for T = double: bf16 is a subset).
template <typename T>
T Operand(T v, bool bf16) {
  return bf16 ? T(RoundToBf16(float(v))) : v;
}

// The cos/sin of position `pos` and frequency index i, YaRN's factor included, rounded to T the
// way ref::RopeAngle rounds them to float (for T = float these are RopeAngle's bits).
template <typename T>
void Angle(int64_t pos, int i, const RopeShape& shape, T* c, T* s) {
  const double angle = double(pos) * RopeInvFreq(i, shape);
  const double scale =
      shape.scaling.type == RopeScaling::Type::kYarn ? shape.scaling.attention_factor : 1.0;
  *c = T(std::cos(angle) * scale);
  *s = T(std::sin(angle) * scale);
}

// The keys that query i of an attention call sees: [first, last].
struct Visible {
  int first;
  int last;
};
Visible VisibleKeys(const AttentionShape& s, int i) {
  const int last = s.q_offset + i;
  const int first = s.sliding_window > 0 ? std::max(0, last - s.sliding_window + 1) : 0;
  return {first, last};
}

}  // namespace

template <typename T>
void LinearT(const T* x, const T* w, T* y, int64_t m, int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) acc += double(x[i * k + p]) * double(w[j * k + p]);
      y[i * n + j] = T(acc);
    }
  }
}

template <typename T>
void RmsNormT(const T* x, const T* weight, double eps, T* y, int64_t rows, int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    double ss = 0;
    for (int64_t c = 0; c < width; ++c) ss += double(xr[c]) * xr[c];
    const T inv = T(1.0 / std::sqrt(ss / width + eps));
    T* yr = y + r * width;
    for (int64_t c = 0; c < width; ++c) yr[c] = xr[c] * inv * weight[c];
  }
}

template <typename T>
void RopeT(T* x, int64_t rows, int64_t width, const RopeShape& shape) {
  const int half = shape.head_dim / 2;
  const int64_t heads = width / shape.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = shape.offset + r % shape.seq_len;
    for (int i = 0; i < half; ++i) {
      T c, s;
      Angle(pos, i, shape, &c, &s);
      for (int64_t h = 0; h < heads; ++h) {
        T* v = x + r * width + h * shape.head_dim;
        const T a = v[i], b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

template <typename T>
void AttentionT(const T* q, const T* k, const T* v, const AttentionShape& s, T* out) {
  const int n_rep = s.num_heads / s.num_kv_heads;
  const int64_t q_width = int64_t(s.num_heads) * s.head_dim;
  const int64_t kv_width = int64_t(s.num_kv_heads) * s.head_dim;
  const double scale = 1.0 / std::sqrt(double(s.head_dim));
  std::vector<double> p(s.kv_len);
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.num_heads; ++h) {
      const int kvh = h / n_rep;
      for (int i = 0; i < s.q_len; ++i) {
        const T* qi = q + (int64_t(b) * s.q_len + i) * q_width + h * s.head_dim;
        const auto [first, last] = VisibleKeys(s, i);
        double mx = -INFINITY;
        for (int j = first; j <= last; ++j) {
          const T* kj = k + (int64_t(b) * s.kv_len + j) * kv_width + kvh * s.head_dim;
          double dot = 0;
          for (int d = 0; d < s.head_dim; ++d) dot += double(qi[d]) * double(kj[d]);
          p[j] = dot * scale;
          mx = std::max(mx, p[j]);
        }
        double sum = 0;
        for (int j = first; j <= last; ++j) {
          p[j] = std::exp(p[j] - mx);
          sum += p[j];
        }
        T* oi = out + (int64_t(b) * s.q_len + i) * q_width + h * s.head_dim;
        for (int d = 0; d < s.head_dim; ++d) {
          double acc = 0;
          for (int j = first; j <= last; ++j) {
            const T* vj = v + (int64_t(b) * s.kv_len + j) * kv_width + kvh * s.head_dim;
            // The probability rounded to T first, as ref::Attention rounds it to float.
            acc += double(T(p[j] / sum)) * double(vj[d]);
          }
          oi[d] = T(acc);
        }
      }
    }
  }
}

template <typename T>
void SiluMulT(const T* gate, const T* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = gate[i];
    out[i] = g / (T(1) + std::exp(-g)) * up[i];
  }
}

template <typename T>
void EmbeddingT(const T* table, int64_t vocab, int64_t width, const int32_t* ids, int64_t n,
                T* out) {
  for (int64_t r = 0; r < n; ++r) {
    const T* src = table + int64_t(ids[r]) * width;
    std::copy(src, src + width, out + r * width);
  }
}

template <typename T>
void NllT(const T* logits, int64_t rows, int64_t vocab, const int32_t* targets, T* nll) {
  for (int64_t r = 0; r < rows; ++r) {
    if (targets[r] < 0) {
      nll[r] = T(0);
      continue;
    }
    const T* l = logits + r * vocab;
    double mx = -INFINITY;
    for (int64_t c = 0; c < vocab; ++c) mx = std::max(mx, double(l[c]));
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(double(l[c]) - mx);
    nll[r] = T(mx + std::log(sum) - double(l[targets[r]]));
  }
}

template <typename T>
void Gemm(const T* a, bool trans_a, const T* b, bool trans_b, int64_t m, int64_t n, int64_t k,
          T alpha, T beta, T* c, bool bf16_operands) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < k; ++p) {
        const T av = trans_a ? a[p * m + i] : a[i * k + p];
        const T bv = trans_b ? b[j * k + p] : b[p * n + j];
        acc += double(Operand(av, bf16_operands)) * double(Operand(bv, bf16_operands));
      }
      double out = double(alpha) * acc;
      if (beta != T(0)) out += double(beta) * double(c[i * n + j]);
      c[i * n + j] = T(out);
    }
  }
}

// y_c = x_c·w_c·ρ with ρ = (Σx²/W + eps)^(-1/2), so
// ∂y_c/∂x_j = w_c·ρ·δ_cj − w_c·x_c·ρ³·x_j/W and dx_j = ρ·w_j·dy_j − x_j·ρ³/W·Σ_c dy_c·w_c·x_c.
template <typename T>
void RmsNormBackward(const T* x, const T* weight, double eps, const T* dy, T* dx, int64_t rows,
                     int64_t width) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * width;
    const T* dyr = dy + r * width;
    double ss = 0, dot = 0;
    for (int64_t c = 0; c < width; ++c) {
      ss += double(xr[c]) * xr[c];
      dot += double(dyr[c]) * weight[c] * xr[c];
    }
    const double rho = 1.0 / std::sqrt(ss / width + eps);
    const double coef = rho * rho * rho * dot / width;
    // Element c reads dy[c] before writing dx[c]: dx may alias dy.
    T* dxr = dx + r * width;
    for (int64_t c = 0; c < width; ++c) {
      dxr[c] = T(rho * weight[c] * double(dyr[c]) - coef * xr[c]);
    }
  }
}

template <typename T>
void RopeBackward(T* g, int64_t rows, int64_t width, const RopeShape& shape) {
  const int half = shape.head_dim / 2;
  const int64_t heads = width / shape.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = shape.offset + r % shape.seq_len;
    for (int i = 0; i < half; ++i) {
      T c, s;
      Angle(pos, i, shape, &c, &s);
      for (int64_t h = 0; h < heads; ++h) {
        T* v = g + r * width + h * shape.head_dim;
        const T a = v[i], b = v[i + half];
        // Rᵀ of [[c, −s], [s, c]].
        v[i] = a * c + b * s;
        v[i + half] = b * c - a * s;
      }
    }
  }
}

// Per query i (scores z_j = scale·q_i·k_j, P = softmax(z) over the visible keys, out_i = Σ_j P_j
// v_j): dv_j += P_j·dout_i; dP_j = dout_i·v_j; dz_j = P_j·(dP_j − Σ_j' P_j' dP_j'); dq_i =
// scale·Σ_j dz_j k_j; dk_j += scale·dz_j·q_i. Everything past the operands is in double, and dk, dv
// sum over queries and over the n_rep query heads of a KV head in that order. With bf16_operands q,
// k, v and dout are rounded to bf16 (the probabilities are not).
template <typename T>
void AttentionBackward(const T* q, const T* k, const T* v, const T* dout, const AttentionShape& s,
                       T* dq, T* dk, T* dv, bool bf16_operands) {
  const int n_rep = s.num_heads / s.num_kv_heads;
  const int hd = s.head_dim;
  const int64_t q_width = int64_t(s.num_heads) * hd;
  const int64_t kv_width = int64_t(s.num_kv_heads) * hd;
  const double scale = 1.0 / std::sqrt(double(hd));
  const auto op = [&](T x) { return double(Operand(x, bf16_operands)); };
  std::vector<double> p(s.kv_len), dp(s.kv_len), dq_i(hd);
  std::vector<double> dk_acc(size_t(s.kv_len) * hd), dv_acc(size_t(s.kv_len) * hd);
  for (int b = 0; b < s.batch; ++b) {
    for (int kvh = 0; kvh < s.num_kv_heads; ++kvh) {
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0);
      const auto key = [&](int j) { return k + (int64_t(b) * s.kv_len + j) * kv_width + kvh * hd; };
      const auto value = [&](int j) {
        return v + (int64_t(b) * s.kv_len + j) * kv_width + kvh * hd;
      };
      for (int h = kvh * n_rep; h < (kvh + 1) * n_rep; ++h) {
        for (int i = 0; i < s.q_len; ++i) {
          const int64_t qi_offset = (int64_t(b) * s.q_len + i) * q_width + h * hd;
          const T* qi = q + qi_offset;
          const T* doi = dout + qi_offset;
          const auto [first, last] = VisibleKeys(s, i);
          double mx = -INFINITY;
          for (int j = first; j <= last; ++j) {
            double dot = 0;
            for (int d = 0; d < hd; ++d) dot += op(qi[d]) * op(key(j)[d]);
            p[j] = dot * scale;
            mx = std::max(mx, p[j]);
          }
          double sum = 0;
          for (int j = first; j <= last; ++j) {
            p[j] = std::exp(p[j] - mx);
            sum += p[j];
          }
          double p_dp = 0;
          for (int j = first; j <= last; ++j) {
            p[j] /= sum;
            double dot = 0;
            for (int d = 0; d < hd; ++d) dot += op(doi[d]) * op(value(j)[d]);
            dp[j] = dot;
            p_dp += p[j] * dot;
          }
          std::fill(dq_i.begin(), dq_i.end(), 0.0);
          for (int j = first; j <= last; ++j) {
            const double dz = p[j] * (dp[j] - p_dp) * scale;
            for (int d = 0; d < hd; ++d) {
              dq_i[d] += dz * op(key(j)[d]);
              dk_acc[size_t(j) * hd + d] += dz * op(qi[d]);
              dv_acc[size_t(j) * hd + d] += p[j] * op(doi[d]);
            }
          }
          for (int d = 0; d < hd; ++d) dq[qi_offset + d] = T(dq_i[d]);
        }
      }
      for (int j = 0; j < s.kv_len; ++j) {
        const int64_t off = (int64_t(b) * s.kv_len + j) * kv_width + kvh * hd;
        for (int d = 0; d < hd; ++d) {
          dk[off + d] = T(dk_acc[size_t(j) * hd + d]);
          dv[off + d] = T(dv_acc[size_t(j) * hd + d]);
        }
      }
    }
  }
}

// silu(g) = g·σ(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g))).
template <typename T>
void SiluMulBackward(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double g = gate[i];
    const double sig = 1.0 / (1.0 + std::exp(-g));
    const double d = dout[i];
    const double u = up[i];
    dgate[i] = T(d * u * sig * (1.0 + g * (1.0 - sig)));
    dup[i] = T(d * g * sig);
  }
}

template <typename T>
void EmbeddingBackward(const int32_t* ids, int64_t n, const T* dout, int64_t width, T* dtable) {
  for (int64_t r = 0; r < n; ++r) {
    T* row = dtable + int64_t(ids[r]) * width;
    for (int64_t c = 0; c < width; ++c) row[c] += dout[r * width + c];
  }
}

template <typename T>
void NllBackward(const T* logits, int64_t rows, int64_t vocab, const int32_t* targets, T scale,
                 T* dlogits) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* l = logits + r * vocab;
    T* dl = dlogits + r * vocab;
    if (targets[r] < 0) {
      std::fill(dl, dl + vocab, T(0));
      continue;
    }
    double mx = -INFINITY;
    for (int64_t c = 0; c < vocab; ++c) mx = std::max(mx, double(l[c]));
    double sum = 0;
    for (int64_t c = 0; c < vocab; ++c) sum += std::exp(double(l[c]) - mx);
    // Element c reads logits[c] before writing dlogits[c]: dlogits may alias logits.
    for (int64_t c = 0; c < vocab; ++c) {
      const double softmax = std::exp(double(l[c]) - mx) / sum;
      dl[c] = T(double(scale) * (softmax - (c == targets[r] ? 1.0 : 0.0)));
    }
  }
}

template <typename T>
void ScaleRowsByNorm(const T* g, int64_t rows, int64_t width_g, T* x, int64_t width_x) {
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t c = 0; c < width_g; ++c) ss += double(g[r * width_g + c]) * g[r * width_g + c];
    const T norm = T(std::sqrt(ss));
    for (int64_t c = 0; c < width_x; ++c) x[r * width_x + c] *= norm;
  }
}

template <typename T>
void AccumulateSquares(const T* g, int64_t n, T* f) {
  for (int64_t i = 0; i < n; ++i) f[i] += g[i] * g[i];
}

#define QCAL_REF_GRAD_INSTANTIATE(T)                                                            \
  template void LinearT<T>(const T*, const T*, T*, int64_t, int64_t, int64_t);                  \
  template void RmsNormT<T>(const T*, const T*, double, T*, int64_t, int64_t);                  \
  template void RopeT<T>(T*, int64_t, int64_t, const RopeShape&);                               \
  template void AttentionT<T>(const T*, const T*, const T*, const AttentionShape&, T*);         \
  template void SiluMulT<T>(const T*, const T*, T*, int64_t);                                   \
  template void EmbeddingT<T>(const T*, int64_t, int64_t, const int32_t*, int64_t, T*);         \
  template void NllT<T>(const T*, int64_t, int64_t, const int32_t*, T*);                        \
  template void Gemm<T>(const T*, bool, const T*, bool, int64_t, int64_t, int64_t, T, T, T*,    \
                        bool);                                                                  \
  template void RmsNormBackward<T>(const T*, const T*, double, const T*, T*, int64_t, int64_t); \
  template void RopeBackward<T>(T*, int64_t, int64_t, const RopeShape&);                        \
  template void AttentionBackward<T>(const T*, const T*, const T*, const T*,                    \
                                     const AttentionShape&, T*, T*, T*, bool);                  \
  template void SiluMulBackward<T>(const T*, const T*, const T*, T*, T*, int64_t);              \
  template void EmbeddingBackward<T>(const int32_t*, int64_t, const T*, int64_t, T*);           \
  template void NllBackward<T>(const T*, int64_t, int64_t, const int32_t*, T, T*);              \
  template void ScaleRowsByNorm<T>(const T*, int64_t, int64_t, T*, int64_t);                    \
  template void AccumulateSquares<T>(const T*, int64_t, T*);

QCAL_REF_GRAD_INSTANTIATE(float)
QCAL_REF_GRAD_INSTANTIATE(double)
#undef QCAL_REF_GRAD_INSTANTIATE

}  // namespace qcal::kernels::ref
