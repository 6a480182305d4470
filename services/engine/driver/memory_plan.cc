#include "services/engine/driver/memory_plan.h"

#include <algorithm>
#include <utility>

#include "common/status.h"

namespace qcal::engine {

namespace {

// The weights of one block's seven linears (q, k, v, o, gate, up, down), in elements.
int64_t BlockLinearElements(const ModelConfig& c) {
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  return 2 * d * c.q_dim() + 2 * d * c.kv_dim() + 3 * d * f;
}

}  // namespace

int64_t WorkingSetBytes(const ModelConfig& c, int64_t chunk_rows) {
  const int64_t d = c.hidden_size, f = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t n = std::max({d, f, qd});
  const int64_t w = std::max({f * d, qd * d});
  const int64_t stats = 2 * n * n * 4;
  // The GPU solve's lazy updates split both operands of a super-block's product (1024 columns)
  // into three TF32 copies: at most d_out·3072 and 3072·d_in floats, both d_out and d_in <= n.
  const int64_t lazy_split = 2 * 3 * 1024 * n * 4;
  const int64_t solve = 3 * n * n * 4 + w * 30 + lazy_split;
  const int64_t forward = chunk_rows * (3 * d + 2 * qd + 2 * kvd + 3 * f) * 6;
  const int64_t held = BlockLinearElements(c) * 2;
  return stats + std::max(solve, forward) + held + (int64_t{1} << 30);
}

int64_t JoinedOperandBytes(const ModelConfig& c, int64_t chunk_rows, int64_t rank) {
  if (rank <= 0) return 0;
  const int64_t d = c.hidden_size, f = c.intermediate_size, qd = c.q_dim(), kvd = c.kv_dim();
  // [W | L_A] of every linear, bf16: its weight plus d_out·r more (the d_out of q, k, v, o,
  // gate, up and down summed).
  const int64_t d_out_sum = qd + 2 * kvd + 2 * d + 2 * f;
  const int64_t joined_weights = (BlockLinearElements(c) + d_out_sum * rank) * 2;
  const int64_t widest_input = std::max({d, f, qd});
  const int64_t joined_input = chunk_rows * ((widest_input + rank) * 2 + rank * 4);
  return joined_weights + joined_input;
}

int64_t CalibActivationBytes(const ModelConfig& c, int64_t rows, bool retrain) {
  return rows * c.hidden_size * int64_t{sizeof(float)} * (retrain ? 3 : 1);
}

absl::Status ParkIfShort(kernels::Backend& be, Tensor& chunk, int64_t reserve) {
  if (be.device() == Device::kHost || chunk.device() == Device::kHost) return absl::OkStatus();
  const int64_t available = be.AvailableMemory();
  if (available < 0 || available >= reserve) return absl::OkStatus();
  QCAL_ASSIGN_OR_RETURN(Tensor host, be.AllocHost(chunk.dtype(), chunk.shape()));
  QCAL_RETURN_IF_ERROR(be.Copy(chunk, host));
  chunk = std::move(host);
  return absl::OkStatus();
}

}  // namespace qcal::engine
