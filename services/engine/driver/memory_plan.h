// Device memory planning of the sequential driver: how many bytes a block's working set needs on
// the device, and parking calibration chunks in pinned host memory when the device runs short
// (device backends only; a host backend plans no memory).
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "common/hf_config.h"
#include "common/tensor.h"
#include "kernels/backend.h"

namespace qcal::engine {

// Device bytes one block needs besides its weights and the calibration activations: the largest
// statistics (a Gram sum and a per-chunk partial) plus the larger of the solver's scratch (the
// factorization, U, working copies of the weight, codes, the split errors, the lazy updates' split
// TF32 operands) and the per-chunk forward temporaries (with their bf16 operand copies), the bf16
// operands of the block's weights held for a pass over the chunks (Model::HoldWeightOperands: all
// seven linears at most), and 1 GiB for library workspaces. A planning estimate for what to keep on
// the device, not a bound. chunk_rows: batch·seq_len of one calibration chunk.
int64_t WorkingSetBytes(const ModelConfig& c, int64_t chunk_rows);

// What error reconstruction's joined products add to WorkingSetBytes at rank r (0: none): the
// joined weights [W | L_A] held for a pass (bf16, every linear of the block at most) and one
// input's joined operand [x | t] (bf16) with its t (fp32) for a chunk.
int64_t JoinedOperandBytes(const ModelConfig& c, int64_t chunk_rows, int64_t rank);

// Bytes of the calibration activations a rank holds for `rows` tokens (its chunks' batch·seq_len
// summed), fp32: one copy (the quantized path), or three while a recipe that retrains runs a block
// (the quantized path, its copy at the block input, and the full-precision path; block_runner.h).
// The training rank of a gang also gathers the other ranks' inputs and targets (two copies of
// theirs).
int64_t CalibActivationBytes(const ModelConfig& c, int64_t rows, bool retrain);

// Moves a device chunk of activations to pinned host memory when the device has less than
// `reserve` bytes available (device backends only; host backends plan no memory).
absl::Status ParkIfShort(kernels::Backend& be, Tensor& chunk, int64_t reserve);

}  // namespace qcal::engine
