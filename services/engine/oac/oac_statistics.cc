#include "services/engine/oac/oac_statistics.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/status.h"

namespace qcal::engine {
namespace {

absl::Status CheckSample(const char* op, const Tensor& x, const Tensor& dy, int64_t seq_len) {
  if (x.rank() != 2 || dy.rank() != 2 || x.dim(0) != dy.dim(0) || x.dtype() != DType::kF32 ||
      dy.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": x is ", x.DebugString(), " and dy ", dy.DebugString(),
                     ", expected F32 [rows, d_in] and [rows, d_out]"));
  }
  if (seq_len < 1 || x.dim(0) % seq_len != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", x.dim(0), " rows are not whole samples of ", seq_len));
  }
  return absl::OkStatus();
}

absl::Status CheckSquare(const char* op, const Tensor& h, int64_t n) {
  if (h.shape() != Shape{n, n} || h.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": h is ", h.DebugString(), ", expected F32 [", n, ", ", n, "]"));
  }
  return absl::OkStatus();
}

// The two orders of Xᵀ(ΓΓᵀ)X for one sample (x [L, d_in], dy [L, d_out]), in multiply-adds, each
// product with a symmetric result counted at half (GemmLower): through the L × L product P = ΓΓᵀ
// (symmetric), then Z = PX (full), then XᵀZ (symmetric), or through the weight gradient
// G = ΓᵀX (full) and GᵀG (symmetric). At L = 2048, P is cheaper for every Llama-2-7B linear
// (attention: 43G against 69G; gate/up 57G against 185G; down 179G against 340G).
bool ThroughTokenProduct(int64_t l, int64_t d_in, int64_t d_out) {
  const double via_p =
      0.5 * double(l) * l * d_out + double(l) * l * d_in + 0.5 * double(l) * d_in * d_in;
  const double via_g = double(l) * d_out * d_in + 0.5 * double(d_out) * d_in * d_in;
  return via_p < via_g;
}

std::string KindMetadata(HessianKind kind) { return RecipeName(kind); }

absl::Status DataLoss(const std::string& path, const std::string& what) {
  return absl::DataLossError(absl::StrCat(path, ": ", what));
}

}  // namespace

absl::Status AccumulateOacHessian(kernels::Backend& be, HessianKind kind, const Tensor& x,
                                  const Tensor& dy, int64_t seq_len, Tensor& h, const Tensor* x_op,
                                  const Tensor* dy_op) {
  QCAL_RETURN_IF_ERROR(CheckSample("AccumulateOacHessian", x, dy, seq_len));
  if ((x_op != nullptr && x_op->shape() != x.shape()) ||
      (dy_op != nullptr && dy_op->shape() != dy.shape())) {
    return absl::InvalidArgumentError(
        "AccumulateOacHessian: the operand copies of x and dy must have their shapes");
  }
  const int64_t rows = x.dim(0), d_in = x.dim(1), d_out = dy.dim(1);
  QCAL_RETURN_IF_ERROR(CheckSquare("AccumulateOacHessian", h, d_in));
  if (rows == 0) return absl::OkStatus();
  switch (kind) {
    case HessianKind::kLayer:
      return absl::InvalidArgumentError(
          "AccumulateOacHessian: hessian kind layer has no output-adaptive statistics");
    case HessianKind::kOutputAdaptiveToken: {
      // Xᵀdiag(‖g_t‖²)X = X̃ᵀX̃ with x̃_t = ‖g_t‖·x_t, formed once in the GEMM operand dtype (the
      // values AccumulateGram would round it to); AccumulateGram writes both triangles
      // (symmetric by construction), like the layer Hessian.
      const DType operand =
          be.compute_dtype() == kernels::ComputeDType::kBF16 ? DType::kBF16 : DType::kF32;
      QCAL_ASSIGN_OR_RETURN(Tensor scaled, be.AllocUninitialized(operand, x.shape()));
      QCAL_RETURN_IF_ERROR(be.ScaleRowsByNormInto(dy, x, scaled));
      return be.AccumulateGram(scaled, h);
    }
    case HessianKind::kOutputAdaptive:
      break;
  }
  const int64_t l = seq_len, samples = rows / l;
  if (ThroughTokenProduct(l, d_in, d_out)) {
    // P_n = Γ_nΓ_nᵀ for every sample (lower triangles, then mirrored), rounded once to the operand
    // dtype; Z_n = P_n·X_n stacked like X, in the operand dtype (the next product rounds it there
    // anyway); then Σ_n X_nᵀZ_n as one product over the chunk's rows.
    const DType operand =
        be.compute_dtype() == kernels::ComputeDType::kBF16 ? DType::kBF16 : DType::kF32;
    const Tensor& xo = x_op != nullptr ? *x_op : x;
    const Tensor& go = dy_op != nullptr ? *dy_op : dy;
    const Tensor g3 = go.Reshape({samples, l, d_out});
    QCAL_ASSIGN_OR_RETURN(Tensor p, be.AllocUninitialized(DType::kF32, {samples, l, l}));
    QCAL_RETURN_IF_ERROR(be.GemmBatched(g3, false, g3, true, 1.0f, 0.0f, p, /*lower=*/true));
    QCAL_RETURN_IF_ERROR(be.MirrorLower(p));
    Tensor p_op = p;
    if (operand != DType::kF32) {
      QCAL_ASSIGN_OR_RETURN(p_op, be.AllocUninitialized(operand, p.shape()));
      QCAL_RETURN_IF_ERROR(be.Convert(p, p_op));
    }
    p = Tensor();
    QCAL_ASSIGN_OR_RETURN(Tensor z, be.AllocUninitialized(operand, {samples, l, d_in}));
    QCAL_RETURN_IF_ERROR(be.GemmBatched(p_op, false, xo.Reshape({samples, l, d_in}), false, 1.0f,
                                        0.0f, z, /*lower=*/false));
    p_op = Tensor();
    Tensor h3 = h.Reshape({1, d_in, d_in});
    QCAL_RETURN_IF_ERROR(be.GemmBatched(xo.Reshape({1, rows, d_in}), true,
                                        z.Reshape({1, rows, d_in}), false, 1.0f, 1.0f, h3,
                                        /*lower=*/true));
  } else {
    // G_n = Γ_nᵀX_n per sample, stacked [samples · d_out, d_in]: Σ_n G_nᵀG_n is one Gram.
    QCAL_ASSIGN_OR_RETURN(Tensor g, be.AllocUninitialized(DType::kF32, {rows / l * d_out, d_in}));
    for (int64_t r = 0; r < rows; r += l) {
      Tensor gs = g.Rows(r / l * d_out, (r / l + 1) * d_out);
      QCAL_RETURN_IF_ERROR(
          be.Gemm(dy.Rows(r, r + l), true, x.Rows(r, r + l), false, 1.0f, 0.0f, gs));
    }
    QCAL_RETURN_IF_ERROR(be.GemmLower(g, true, g, false, 1.0f, 1.0f, h));
  }
  // h was symmetric on entry, and the products added to its lower triangle are symmetric.
  return be.MirrorLower(h);
}

absl::Status AccumulateFisher(kernels::Backend& be, const Tensor& x, const Tensor& dy,
                              int64_t seq_len, Tensor& f) {
  QCAL_RETURN_IF_ERROR(CheckSample("AccumulateFisher", x, dy, seq_len));
  const int64_t rows = x.dim(0), d_in = x.dim(1), d_out = dy.dim(1);
  if (f.shape() != Shape{d_out, d_in} || f.dtype() != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat("AccumulateFisher: f is ", f.DebugString(),
                                                   ", expected F32 [", d_out, ", ", d_in, "]"));
  }
  if (rows == 0) return absl::OkStatus();
  QCAL_ASSIGN_OR_RETURN(Tensor g, be.Alloc(DType::kF32, {d_out, d_in}));
  for (int64_t r = 0; r < rows; r += seq_len) {
    QCAL_RETURN_IF_ERROR(
        be.Gemm(dy.Rows(r, r + seq_len), true, x.Rows(r, r + seq_len), false, 1.0f, 0.0f, g));
    QCAL_RETURN_IF_ERROR(be.AccumulateSquares(g, f));
  }
  return absl::OkStatus();
}

Combine<LinearOac> LinearOacCombine(kernels::Backend& be) {
  return [&be](LinearOac& left, const LinearOac& right) -> absl::Status {
    if (left.hessian.shape() != right.hessian.shape() ||
        left.fisher.defined() != right.fisher.defined() ||
        (left.fisher.defined() && left.fisher.shape() != right.fisher.shape())) {
      return absl::InvalidArgumentError(
          absl::StrCat("LinearOacCombine: partials of different shapes (hessian ",
                       left.hessian.DebugString(), " and ", right.hessian.DebugString(), ")"));
    }
    QCAL_RETURN_IF_ERROR(be.Add(right.hessian, left.hessian));
    if (left.fisher.defined()) QCAL_RETURN_IF_ERROR(be.Add(right.fisher, left.fisher));
    return absl::OkStatus();
  };
}

int64_t LinearOacBytes(int64_t d_out, int64_t d_in, bool fisher) {
  return (d_in * (d_in + 1) / 2 + (fisher ? d_out * d_in : 0)) * int64_t{sizeof(float)};
}

int64_t ModelOacBytes(const ModelConfig& config, bool fisher) {
  const int64_t d = config.hidden_size, q = config.q_dim(), kv = config.kv_dim(),
                inter = config.intermediate_size;
  const int64_t block = LinearOacBytes(q, d, fisher) + 2 * LinearOacBytes(kv, d, fisher) +
                        LinearOacBytes(d, q, fisher) + 2 * LinearOacBytes(inter, d, fisher) +
                        LinearOacBytes(d, inter, fisher);
  return block * config.num_layers;
}

absl::StatusOr<std::string> WriteLinearOac(const std::string& path, HessianKind kind,
                                           const LinearOac& oac) {
  const Tensor& h = oac.hessian;
  if (kind == HessianKind::kLayer || h.device() != Device::kHost || h.dtype() != DType::kF32 ||
      h.rank() != 2 || h.dim(0) != h.dim(1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("WriteLinearOac: ", path,
                     ": needs an output-adaptive kind and a square F32 host Hessian, "
                     "got kind ",
                     RecipeName(kind), " and ", h.DebugString()));
  }
  const int64_t n = h.dim(0);
  std::map<std::string, Tensor> tensors;
  Tensor upper = Tensor::Zeros(DType::kF32, {n * (n + 1) / 2});
  float* u = upper.data<float>();
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(u, h.data<float>() + i * n + i, (n - i) * sizeof(float));
    u += n - i;
  }
  tensors["hessian_upper"] = upper;
  if (oac.fisher.defined()) {
    const Tensor& f = oac.fisher;
    if (f.device() != Device::kHost || f.dtype() != DType::kF32 || f.rank() != 2 || f.dim(1) != n) {
      return absl::InvalidArgumentError(absl::StrCat("WriteLinearOac: ", path,
                                                     ": the Fisher must be F32 [d_out, ", n,
                                                     "] on the host, got ", f.DebugString()));
    }
    tensors["fisher"] = f;
  }
  QCAL_ASSIGN_OR_RETURN(
      std::string bytes,
      SerializeSafetensors(
          tensors, {{"qcal_oac", "1"}, {"kind", KindMetadata(kind)}, {"n", absl::StrCat(n)}}));
  const std::string tmp = path + ".tmp";
  QCAL_RETURN_IF_ERROR(WriteStringToFile(tmp, bytes));
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    return absl::UnavailableError(
        absl::StrCat(path, ": rename from ", tmp, " failed: ", std::strerror(err)));
  }
  // The rename is durable once the directory is synced.
  const std::string dir = std::filesystem::path(path).parent_path().string();
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0 || ::fsync(fd) != 0) {
    const int err = errno;
    if (fd >= 0) ::close(fd);
    return absl::UnavailableError(
        absl::StrCat(path, ": syncing its directory failed: ", std::strerror(err)));
  }
  ::close(fd);
  return Sha256Hex(bytes);
}

absl::StatusOr<LinearOac> ReadLinearOac(const std::string& path, HessianKind kind, int64_t d_out,
                                        int64_t d_in, const std::string& expected_sha256) {
  QCAL_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(path));
  if (!expected_sha256.empty()) {
    const std::string actual = Sha256Hex(bytes);
    if (actual != expected_sha256) {
      return DataLoss(
          path, absl::StrCat("sha256 ", actual, " does not match the recorded ", expected_sha256));
    }
  }
  absl::StatusOr<std::unique_ptr<SafetensorsFile>> file = SafetensorsFile::FromBytes(bytes, path);
  if (!file.ok()) {
    return DataLoss(path,
                    absl::StrCat("not a readable safetensors file: ", file.status().message()));
  }
  const std::map<std::string, std::string>& meta = (*file)->metadata();
  auto meta_is = [&](const std::string& key, const std::string& value) {
    auto it = meta.find(key);
    return it != meta.end() && it->second == value;
  };
  if (!meta_is("qcal_oac", "1")) return DataLoss(path, "not an OAC statistics file (qcal_oac)");
  if (!meta_is("kind", KindMetadata(kind))) {
    auto it = meta.find("kind");
    return DataLoss(path, absl::StrCat("holds hessian kind \"", it == meta.end() ? "" : it->second,
                                       "\", expected \"", KindMetadata(kind), "\""));
  }
  if (!meta_is("n", absl::StrCat(d_in))) {
    return DataLoss(path, absl::StrCat("is not for d_in ", d_in, " (metadata n)"));
  }
  const int64_t packed = d_in * (d_in + 1) / 2;
  auto get = [&](const std::string& name, const Shape& shape) -> absl::StatusOr<Tensor> {
    absl::StatusOr<Tensor> t = (*file)->Get(name);
    if (!t.ok())
      return DataLoss(path, absl::StrCat("tensor \"", name, "\": ", t.status().message()));
    if (t->dtype() != DType::kF32 || t->shape() != shape) {
      return DataLoss(path, absl::StrCat("tensor \"", name, "\" is ", t->DebugString(),
                                         ", expected F32 ", ShapeString(shape)));
    }
    return t;
  };
  QCAL_ASSIGN_OR_RETURN(Tensor upper, get("hessian_upper", {packed}));
  LinearOac out;
  out.hessian = Tensor::Zeros(DType::kF32, {d_in, d_in});
  float* h = out.hessian.data<float>();
  const float* u = upper.data<float>();
  for (int64_t i = 0; i < d_in; ++i) {
    for (int64_t j = i; j < d_in; ++j, ++u) h[i * d_in + j] = h[j * d_in + i] = *u;
  }
  if ((*file)->Has("fisher")) {
    QCAL_ASSIGN_OR_RETURN(Tensor f, get("fisher", {d_out, d_in}));
    out.fisher = f.Clone();
  }
  if ((*file)->tensors().size() != ((*file)->Has("fisher") ? 2u : 1u)) {
    return DataLoss(path, "holds tensors other than hessian_upper and fisher");
  }
  return out;
}

}  // namespace qcal::engine
