#include "services/engine/driver/install.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {
namespace {

// The block tensor a folded-tensor name refers to: an RMSNorm weight or a linear's bias of block
// b. NotFound for any other name.
absl::StatusOr<Tensor*> FoldedTarget(Model& model, int b, const std::string& name) {
  BlockWeights& bw = model.block(b);
  const std::string p = absl::StrCat("model.layers.", b, ".");
  if (name == p + "input_layernorm.weight") return &bw.input_norm;
  if (name == p + "post_attention_layernorm.weight") return &bw.post_attention_norm;
  for (LinearKind k : kAllLinears) {
    if (name == LinearPrefix(b, k) + ".bias" && bw.at(k).bias.defined()) return &bw.at(k).bias;
  }
  return absl::NotFoundError(
      absl::StrCat("folded tensor ", name, " is not a norm or bias of block ", b));
}

}  // namespace

absl::Status InstallWeight(Model& model, int b, LinearId id, const QuantizedLinear& q) {
  Linear& lin = model.block(b).at(id);
  if (lin.weight.dim(0) != q.d_out || lin.weight.dim(1) != q.d_in) {
    return absl::InvalidArgumentError(absl::StrCat(LinearPrefix(model.config(), b, id),
                                                   ": quantized shape [", q.d_out, ", ", q.d_in,
                                                   "] does not match the model"));
  }
  Tensor host = Tensor::FromVector(q.Dequantized(), {q.d_out, q.d_in});
  QCAL_ASSIGN_OR_RETURN(lin.weight, model.backend().ToDevice(host));
  return absl::OkStatus();
}

absl::Status InstallExtras(Model& model, int b, LinearId id, const LayerResult& r) {
  Linear& lin = model.block(b).at(id);
  kernels::Backend& be = model.backend();
  const int64_t rank = r.report.rank;
  if (rank > 0) {
    const int64_t d_out = lin.weight.dim(0), d_in = lin.weight.dim(1);
    if (static_cast<int64_t>(r.lora_a.size()) != d_out * rank ||
        static_cast<int64_t>(r.lora_b.size()) != rank * d_in) {
      return absl::InvalidArgumentError(absl::StrCat(
          LinearPrefix(model.config(), b, id), ": low-rank factors do not match rank ", rank));
    }
    QCAL_ASSIGN_OR_RETURN(lin.lora_a, be.ToDevice(Tensor::FromVector(r.lora_a, {d_out, rank})));
    QCAL_ASSIGN_OR_RETURN(lin.lora_b, be.ToDevice(Tensor::FromVector(r.lora_b, {rank, d_in})));
  } else {
    lin.lora_a = lin.lora_b = Tensor();
  }
  lin.act_bits = r.act_bits;
  for (const auto& [name, host] : r.folded) {
    QCAL_ASSIGN_OR_RETURN(Tensor * target, FoldedTarget(model, b, name));
    if (host.shape() != target->shape()) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": folded tensor has shape ", ShapeString(host.shape())));
    }
    QCAL_ASSIGN_OR_RETURN(*target, be.ToDevice(host));
  }
  return absl::OkStatus();
}

absl::Status InstallBlock(Model& model, int b, const std::vector<LayerResult>& linears) {
  const std::vector<LinearId> ids =
      b >= 0 && b < model.num_blocks() ? BlockLinears(model.config(), b) : std::vector<LinearId>();
  if (ids.empty() || linears.size() != ids.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("InstallBlock: block ", b, " with ", linears.size(), " linears"));
  }
  for (size_t i = 0; i < linears.size(); ++i) {
    QCAL_RETURN_IF_ERROR(InstallWeight(model, b, ids[i], linears[i].quantized));
    QCAL_RETURN_IF_ERROR(InstallExtras(model, b, ids[i], linears[i]));
  }
  return absl::OkStatus();
}

}  // namespace qcal::engine
