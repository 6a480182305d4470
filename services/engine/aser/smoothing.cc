#include "services/engine/aser/smoothing.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {
namespace {

const char* InputName(LinearInput in) {
  switch (in) {
    case LinearInput::kQkv:
      return "q/k/v input";
    case LinearInput::kO:
      return "o_proj input";
    case LinearInput::kGateUp:
      return "gate/up input";
    case LinearInput::kDown:
      return "down_proj input";
  }
  return "input";
}

absl::Status ExpectHostMatrix(const Tensor& t, const char* what) {
  if (!t.defined() || t.device() != Device::kHost || t.dtype() != DType::kF32 || t.rank() != 2) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " must be a host fp32 matrix, got ", t.DebugString()));
  }
  return absl::OkStatus();
}

// a and w clamped to the floor, in double.
absl::StatusOr<std::vector<double>> ClampedActMax(const std::vector<float>& act_max) {
  std::vector<double> a(act_max.size());
  for (size_t j = 0; j < a.size(); ++j) {
    if (!std::isfinite(act_max[j]) || act_max[j] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("activation max of channel ", j, " is ",
                                                     act_max[j], " (must be finite and >= 0)"));
    }
    a[j] = std::max<double>(act_max[j], kSmoothingFloor);
  }
  return a;
}

std::vector<double> Clamped(const std::vector<float>& w) {
  std::vector<double> out(w.size());
  for (size_t j = 0; j < w.size(); ++j) out[j] = std::max<double>(w[j], kSmoothingFloor);
  return out;
}

float Scale(double a, double w, double alpha) {
  return static_cast<float>(std::pow(a, alpha) / std::pow(w, 1.0 - alpha));
}

// Indices of the `count` largest scores, largest first; ties keep the lower index first.
std::vector<int32_t> TopIndices(const std::vector<double>& score, int64_t count) {
  std::vector<int32_t> order(score.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t x, int32_t y) { return score[x] > score[y]; });
  order.resize(static_cast<size_t>(count));
  return order;
}

absl::Status CheckScales(const std::vector<float>& m, int64_t expected, const std::string& what) {
  if (static_cast<int64_t>(m.size()) != expected) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, " has ", m.size(), " scales, expected ", expected));
  }
  for (size_t j = 0; j < m.size(); ++j) {
    if (!std::isfinite(m[j]) || m[j] <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " scale ", j, " is ", m[j], " (must be finite and > 0)"));
    }
  }
  return absl::OkStatus();
}

// w[:, j] *= m[j] for a host matrix w.
void MultiplyColumns(Tensor& w, const std::vector<float>& m) {
  const int64_t rows = w.dim(0), cols = w.dim(1);
  float* p = w.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) p[r * cols + j] *= m[j];
  }
}

// Row r of a host tensor (a matrix, or a vector as rows of one) /= m[r].
void DivideRows(Tensor& w, const std::vector<float>& m) {
  const int64_t rows = w.dim(0), cols = w.numel() / std::max<int64_t>(rows, 1);
  float* p = w.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; ++j) p[r * cols + j] /= m[r];
  }
}

// Column maxima given from elsewhere must be what WeightColumnMax returns: finite, >= 0.
absl::Status CheckWeightMax(const std::vector<float>& w_max) {
  if (w_max.empty()) return absl::InvalidArgumentError("smoothing: no consumer weights");
  for (size_t j = 0; j < w_max.size(); ++j) {
    if (!std::isfinite(w_max[j]) || w_max[j] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("smoothing: weight column maximum ", j, " is ", w_max[j]));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SmoothingOptions::Validate() const {
  if (method == SmoothingMethod::kNone) {
    return absl::InvalidArgumentError("smoothing.method none computes no scales");
  }
  if (!std::isfinite(alpha) || alpha < 0 || alpha > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("smoothing.alpha must be in [0, 1], got ", alpha));
  }
  if (outlier_channels < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("smoothing.outlier_channels must be >= 0, got ", outlier_channels));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> WeightColumnMax(const std::vector<Tensor>& consumers) {
  if (consumers.empty()) return absl::InvalidArgumentError("smoothing: no consumer weights");
  QCAL_RETURN_IF_ERROR(ExpectHostMatrix(consumers[0], "consumer weight"));
  const int64_t width = consumers[0].dim(1);
  std::vector<float> w(static_cast<size_t>(width), 0.0f);
  for (const Tensor& t : consumers) {
    QCAL_RETURN_IF_ERROR(ExpectHostMatrix(t, "consumer weight"));
    if (t.dim(1) != width) {
      return absl::InvalidArgumentError(absl::StrCat("smoothing: consumer weights of widths ",
                                                     width, " and ", t.dim(1), " share an input"));
    }
    const float* p = t.data<float>();
    for (int64_t r = 0; r < t.dim(0); ++r) {
      for (int64_t j = 0; j < width; ++j) {
        const float v = p[r * width + j];
        if (!std::isfinite(v)) {
          return absl::InvalidArgumentError(
              absl::StrCat("smoothing: weight[", r, ", ", j, "] is ", v, " (not finite)"));
        }
        w[j] = std::max(w[j], std::fabs(v));
      }
    }
  }
  return w;
}

absl::StatusOr<SmoothingScales> ComputeSmoothingScales(const std::vector<float>& act_max,
                                                       const std::vector<Tensor>& consumers,
                                                       const SmoothingOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_ASSIGN_OR_RETURN(std::vector<float> w_max, WeightColumnMax(consumers));
  return ComputeSmoothingScalesFromMax(act_max, w_max, options);
}

absl::StatusOr<SmoothingScales> ComputeSmoothingScalesFromMax(const std::vector<float>& act_max,
                                                              const std::vector<float>& w_max,
                                                              const SmoothingOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_RETURN_IF_ERROR(CheckWeightMax(w_max));
  const int64_t width = static_cast<int64_t>(w_max.size());
  if (static_cast<int64_t>(act_max.size()) != width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "smoothing: ", act_max.size(), " activation channels for weights of width ", width));
  }
  QCAL_ASSIGN_OR_RETURN(std::vector<double> a, ClampedActMax(act_max));
  const std::vector<double> w = Clamped(w_max);
  SmoothingScales out;
  if (options.method == SmoothingMethod::kSmoothQuant) {
    out.m.resize(static_cast<size_t>(width));
    for (int64_t j = 0; j < width; ++j) out.m[j] = Scale(a[j], w[j], options.alpha);
    return out;
  }
  if (options.outlier_channels > width) {
    return absl::InvalidArgumentError(absl::StrCat("smoothing.outlier_channels ",
                                                   options.outlier_channels,
                                                   " exceeds the input width ", width));
  }
  std::vector<double> score(static_cast<size_t>(width));
  for (int64_t j = 0; j < width; ++j) score[j] = a[j] * w[j];
  out.outliers = TopIndices(score, options.outlier_channels);
  std::sort(out.outliers.begin(), out.outliers.end());
  out.m.assign(static_cast<size_t>(width), 1.0f);
  for (int32_t j : out.outliers) out.m[j] = Scale(a[j], w[j], options.alpha);
  return out;
}

absl::StatusOr<SmoothingScales> ComputeOProjSmoothingScales(const std::vector<float>& act_max,
                                                            const Tensor& o_proj, int num_heads,
                                                            int num_kv_heads,
                                                            const SmoothingOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_ASSIGN_OR_RETURN(std::vector<float> w_max, WeightColumnMax({o_proj}));
  return ComputeOProjSmoothingScalesFromMax(act_max, w_max, num_heads, num_kv_heads, options);
}

absl::StatusOr<SmoothingScales> ComputeOProjSmoothingScalesFromMax(
    const std::vector<float>& act_max, const std::vector<float>& w_max, int num_heads,
    int num_kv_heads, const SmoothingOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  QCAL_RETURN_IF_ERROR(CheckWeightMax(w_max));
  const int64_t width = static_cast<int64_t>(w_max.size());
  if (num_heads < 1 || num_kv_heads < 1 || num_heads % num_kv_heads != 0 ||
      width % num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("smoothing: o_proj width ", width,
                                                   " does not split into ", num_heads,
                                                   " heads over ", num_kv_heads, " KV heads"));
  }
  if (static_cast<int64_t>(act_max.size()) != width) {
    return absl::InvalidArgumentError(absl::StrCat(
        "smoothing: ", act_max.size(), " activation channels for o_proj of width ", width));
  }
  QCAL_ASSIGN_OR_RETURN(std::vector<double> a, ClampedActMax(act_max));
  const std::vector<double> w = Clamped(w_max);
  const int64_t head_dim = width / num_heads;
  const int n_rep = num_heads / num_kv_heads;
  const int64_t kv_dim = int64_t{num_kv_heads} * head_dim;
  auto v_row = [&](int64_t c) { return (c / head_dim) / n_rep * head_dim + c % head_dim; };

  // Per v row: max a, max w and max a·w over its tied o_proj channels.
  std::vector<double> a_tied(static_cast<size_t>(kv_dim), 0.0), w_tied(a_tied), score(a_tied);
  for (int64_t c = 0; c < width; ++c) {
    const int64_t k = v_row(c);
    a_tied[k] = std::max(a_tied[k], a[c]);
    w_tied[k] = std::max(w_tied[k], w[c]);
    score[k] = std::max(score[k], a[c] * w[c]);
  }
  SmoothingScales out;
  if (options.method == SmoothingMethod::kSmoothQuant) {
    out.v_rows.resize(static_cast<size_t>(kv_dim));
    for (int64_t k = 0; k < kv_dim; ++k) out.v_rows[k] = Scale(a_tied[k], w_tied[k], options.alpha);
  } else {
    if (options.outlier_channels > width) {
      return absl::InvalidArgumentError(absl::StrCat("smoothing.outlier_channels ",
                                                     options.outlier_channels,
                                                     " exceeds the o_proj input width ", width));
    }
    out.v_rows.assign(static_cast<size_t>(kv_dim), 1.0f);
    for (int32_t k : TopIndices(score, options.outlier_channels / n_rep)) {
      out.v_rows[k] = Scale(a_tied[k], w_tied[k], options.alpha);
      for (int64_t h = k / head_dim * n_rep; h < (k / head_dim + 1) * n_rep; ++h) {
        out.outliers.push_back(static_cast<int32_t>(h * head_dim + k % head_dim));
      }
    }
    std::sort(out.outliers.begin(), out.outliers.end());
  }
  out.m.resize(static_cast<size_t>(width));
  for (int64_t c = 0; c < width; ++c) out.m[c] = out.v_rows[v_row(c)];
  return out;
}

bool SmoothingOnDevice(kernels::Backend& backend) {
  return backend.device() != Device::kHost &&
         backend.SupportsSolverOp(kernels::SolverOp::kSmoothing);
}

namespace {

// WeightColumnMax of the consumers of `in`, on the device when SmoothingOnDevice (the same values:
// a maximum is exact in any order).
absl::StatusOr<std::vector<float>> ColumnMax(kernels::Backend& backend, const BlockWeights& block,
                                             LinearInput in) {
  std::vector<Tensor> consumers;
  if (!SmoothingOnDevice(backend)) {
    for (LinearKind k : ConsumersOf(in)) {
      QCAL_ASSIGN_OR_RETURN(Tensor w, backend.ToHost(block.at(k).weight));
      consumers.push_back(std::move(w));
    }
    return WeightColumnMax(consumers);
  }
  std::vector<float> w_max;
  for (LinearKind k : ConsumersOf(in)) {
    QCAL_ASSIGN_OR_RETURN(kernels::ChannelStats c,
                          backend.ChannelAbsStats(block.at(k).weight, /*seq_len=*/0));
    if (c.first_bad_column >= 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "smoothing: weight column ", c.first_bad_column, " holds a value that is not finite"));
    }
    if (w_max.empty()) w_max.assign(c.max_abs.size(), 0.0f);
    if (c.max_abs.size() != w_max.size()) {
      return absl::InvalidArgumentError(absl::StrCat("smoothing: consumer weights of widths ",
                                                     w_max.size(), " and ", c.max_abs.size(),
                                                     " share an input"));
    }
    for (size_t j = 0; j < w_max.size(); ++j) w_max[j] = std::max(w_max[j], c.max_abs[j]);
  }
  return w_max;
}

}  // namespace

absl::StatusOr<BlockSmoothing> ComputeBlockSmoothing(
    kernels::Backend& backend, const BlockWeights& block, const ModelConfig& config,
    const std::array<const ActivationStats*, kNumLinearInputs>& stats,
    const SmoothingOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  BlockSmoothing out;
  for (int i = 0; i < kNumLinearInputs; ++i) {
    const auto in = static_cast<LinearInput>(i);
    if (stats[i] == nullptr) continue;
    QCAL_ASSIGN_OR_RETURN(std::vector<float> w_max, ColumnMax(backend, block, in));
    absl::StatusOr<SmoothingScales> scales =
        in == LinearInput::kO
            ? ComputeOProjSmoothingScalesFromMax(stats[i]->max_abs(), w_max, config.num_heads,
                                                 config.num_kv_heads, options)
            : ComputeSmoothingScalesFromMax(stats[i]->max_abs(), w_max, options);
    if (!scales.ok()) return Annotate(scales.status(), InputName(in));
    out.at(in) = std::move(scales).value();
  }
  return out;
}

absl::Status FoldBlockSmoothing(kernels::Backend& backend, const ModelConfig& config,
                                const BlockSmoothing& smoothing, BlockWeights& block) {
  // Host copies of every tensor that changes, keyed by where it goes back.
  Tensor input_norm, post_norm;
  std::array<Tensor, kNumLinears> weights, biases;
  // Weights and biases are copied and scaled on the device when SmoothingOnDevice, else on the
  // host; norm weights (one vector each) always on the host.
  const bool on_device = SmoothingOnDevice(backend);
  auto fetch = [&](const Tensor& t) -> absl::StatusOr<Tensor> {
    if (!on_device) return backend.ToHost(t);
    QCAL_ASSIGN_OR_RETURN(Tensor copy, backend.Alloc(DType::kF32, t.shape()));
    QCAL_RETURN_IF_ERROR(backend.Copy(t, copy));
    return copy;
  };
  auto upload = [&](const std::vector<float>& m) {
    return backend.ToDevice(Tensor::FromVector(m, {static_cast<int64_t>(m.size())}));
  };
  auto divide_rows = [&](Tensor& t, const std::vector<float>& m) -> absl::Status {
    if (t.device() == Device::kHost) {
      DivideRows(t, m);
      return absl::OkStatus();
    }
    QCAL_ASSIGN_OR_RETURN(Tensor dm, upload(m));
    return backend.DivideRows(t, dm);
  };
  auto multiply_columns = [&](Tensor& t, const std::vector<float>& m) -> absl::Status {
    if (t.device() == Device::kHost) {
      MultiplyColumns(t, m);
      return absl::OkStatus();
    }
    QCAL_ASSIGN_OR_RETURN(Tensor dm, upload(m));
    return backend.ScaleColumns(t, dm);
  };
  auto weight = [&](LinearKind k) -> absl::StatusOr<Tensor*> {
    Tensor& t = weights[static_cast<int>(k)];
    if (!t.defined()) {
      QCAL_ASSIGN_OR_RETURN(t, fetch(block.at(k).weight));
    }
    return &t;
  };
  auto bias = [&](LinearKind k) -> absl::StatusOr<Tensor*> {
    Tensor& t = biases[static_cast<int>(k)];
    if (!t.defined() && block.at(k).bias.defined()) {
      QCAL_ASSIGN_OR_RETURN(t, fetch(block.at(k).bias));
    }
    return &t;
  };

  for (int i = 0; i < kNumLinearInputs; ++i) {
    const auto in = static_cast<LinearInput>(i);
    const SmoothingScales& s = smoothing.at(in);
    if (s.m.empty()) continue;
    const std::vector<LinearKind> consumers = ConsumersOf(in);
    const int64_t width = block.at(consumers[0]).weight.dim(1);
    QCAL_RETURN_IF_ERROR(CheckScales(s.m, width, InputName(in)));
    switch (in) {
      case LinearInput::kQkv:
      case LinearInput::kGateUp: {
        Tensor& norm = in == LinearInput::kQkv ? input_norm : post_norm;
        if (!norm.defined()) {
          QCAL_ASSIGN_OR_RETURN(
              norm, backend.ToHost(in == LinearInput::kQkv ? block.input_norm
                                                           : block.post_attention_norm));
        }
        if (norm.numel() != width) {
          return absl::InvalidArgumentError(absl::StrCat(InputName(in), ": norm weight ",
                                                         norm.DebugString(), " for width ", width));
        }
        DivideRows(norm, s.m);
        break;
      }
      case LinearInput::kO: {
        const int64_t head_dim = config.head_dim, n_rep = config.n_rep();
        QCAL_RETURN_IF_ERROR(CheckScales(s.v_rows, config.kv_dim(), "o_proj input's v_proj rows"));
        if (width != int64_t{config.num_heads} * head_dim) {
          return absl::InvalidArgumentError(
              absl::StrCat("o_proj width ", width, " does not match the model's heads"));
        }
        for (int64_t c = 0; c < width; ++c) {
          const int64_t k = (c / head_dim) / n_rep * head_dim + c % head_dim;
          if (s.m[c] != s.v_rows[k]) {
            return absl::InvalidArgumentError(
                absl::StrCat("o_proj input scale ", c, " is not the scale of its v_proj row ", k));
          }
        }
        QCAL_ASSIGN_OR_RETURN(Tensor * v, weight(LinearKind::kV));
        QCAL_ASSIGN_OR_RETURN(Tensor * vb, bias(LinearKind::kV));
        if (v->dim(0) != config.kv_dim()) {
          return absl::InvalidArgumentError(
              absl::StrCat("v_proj ", v->DebugString(), " does not have kv_dim rows"));
        }
        QCAL_RETURN_IF_ERROR(divide_rows(*v, s.v_rows));
        if (vb->defined()) QCAL_RETURN_IF_ERROR(divide_rows(*vb, s.v_rows));
        break;
      }
      case LinearInput::kDown: {
        QCAL_ASSIGN_OR_RETURN(Tensor * up, weight(LinearKind::kUp));
        QCAL_ASSIGN_OR_RETURN(Tensor * ub, bias(LinearKind::kUp));
        if (up->dim(0) != width) {
          return absl::InvalidArgumentError(absl::StrCat(
              "up_proj ", up->DebugString(), " does not match down_proj width ", width));
        }
        QCAL_RETURN_IF_ERROR(divide_rows(*up, s.m));
        if (ub->defined()) QCAL_RETURN_IF_ERROR(divide_rows(*ub, s.m));
        break;
      }
    }
    for (LinearKind k : consumers) {
      QCAL_ASSIGN_OR_RETURN(Tensor * w, weight(k));
      QCAL_RETURN_IF_ERROR(multiply_columns(*w, s.m));
    }
  }

  // Everything is computed: copy to the device (host-computed tensors), then install, so a failed
  // copy changes nothing.
  BlockWeights updated = block;
  if (input_norm.defined()) {
    QCAL_ASSIGN_OR_RETURN(updated.input_norm, backend.ToDevice(input_norm));
  }
  if (post_norm.defined()) {
    QCAL_ASSIGN_OR_RETURN(updated.post_attention_norm, backend.ToDevice(post_norm));
  }
  for (LinearKind k : kAllLinears) {
    const int i = static_cast<int>(k);
    if (weights[i].defined()) {
      if (on_device) {
        updated.at(k).weight = weights[i];
      } else {
        QCAL_ASSIGN_OR_RETURN(updated.at(k).weight, backend.ToDevice(weights[i]));
      }
    }
    if (biases[i].defined()) {
      if (on_device) {
        updated.at(k).bias = biases[i];
      } else {
        QCAL_ASSIGN_OR_RETURN(updated.at(k).bias, backend.ToDevice(biases[i]));
      }
    }
  }
  block = std::move(updated);
  return absl::OkStatus();
}

}  // namespace qcal::engine
