// Bit packing of GPTQ v1 checkpoints (DESIGN section 5): `qweight` and `qzeros`, both directions.
//
// Both tensors are int32 matrices in which a stream of b-bit values is packed least significant
// bits first: value k of a stream sits at bits [k·b, k·b + b) of the stream read as one
// little-endian bit string over consecutive words. For b = 2, 4, 8 a value never straddles two
// words (word r holds values r·(32/b) .. r·(32/b) + 32/b − 1); for b = 3 every three consecutive
// words hold 32 values as one 96-bit stream, so values 10 and 21 straddle a word boundary (value
// 10 occupies bits 30..32). A stream of n values takes PackedLength(n, b) = ceil(n/32)·b words;
// streams whose length is not a multiple of 32 are padded with zero values.
//
//   qweight int32 [PackedLength(d_in, b), d_out]: column o is the stream of codes W[o, 0..d_in).
//   qzeros  int32 [n_groups, PackedLength(d_out, b)]: row g is the stream of (z[g, o] − 1) & mask
//           for o = 0..d_out, where mask = 2^b − 1.
//
// The zero-point edge. GPTQ v1 stores z − 1 and every reader computes z = stored + 1 with no wrap,
// so a zero point of 0 cannot be represented: PackQzeros writes it as (0 − 1) & mask = 2^b − 1,
// and UnpackQzeros (the reader rule) reads that back as 2^b, not 0. The quantizer therefore never
// emits z = 0 for asymmetric grids (DESIGN section 3). PackQzeros accepts z in [0, 2^b] so that
// what UnpackQzeros returns (always in [1, 2^b]) packs back to the same words.
//
// All functions are pure, deterministic and thread-compatible. Inputs and outputs are row-major.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcal::engine {

// Whether `bits` is a width GPTQ v1 can hold: 2, 3, 4 or 8. The error names the value.
absl::Status ValidateGptqBits(int bits);

// Words taken by a stream of `n` b-bit values: ceil(n/32)·b. n >= 0.
int64_t PackedLength(int64_t n, int bits);

// Packs codes [d_out, d_in] (each in [0, 2^b − 1]) into qweight [PackedLength(d_in, b), d_out].
// Errors: bits not in {2, 3, 4, 8}; d_out or d_in outside [1, 2^31); codes.size() != d_out·d_in;
// a code out of range (the error names its row, column and value). Codes as int32 (a loader's
// unpacked codes) or as bytes (QuantizedLinear::codes).
absl::StatusOr<std::vector<int32_t>> PackQweight(std::span<const int32_t> codes, int64_t d_out,
                                                 int64_t d_in, int bits);
absl::StatusOr<std::vector<int32_t>> PackQweight(std::span<const uint8_t> codes, int64_t d_out,
                                                 int64_t d_in, int bits);

// The inverse of PackQweight: codes [d_out, d_in] from qweight [PackedLength(d_in, b), d_out].
// Padding bits beyond d_in are ignored. Errors: bits, dimensions, or qweight.size() not matching
// the shape implied by d_out, d_in and bits.
absl::StatusOr<std::vector<int32_t>> UnpackQweight(std::span<const int32_t> qweight, int64_t d_out,
                                                   int64_t d_in, int bits);

// Packs zero points [n_groups, d_out] (each in [0, 2^b]; see the zero-point edge above) into
// qzeros [n_groups, PackedLength(d_out, b)], storing (z − 1) & (2^b − 1). Errors as PackQweight.
absl::StatusOr<std::vector<int32_t>> PackQzeros(std::span<const int32_t> zeros, int64_t n_groups,
                                                int64_t d_out, int bits);

// The reader side: zero points [n_groups, d_out] from qzeros [n_groups, PackedLength(d_out, b)],
// z = ((qzeros >> shift) & mask) + 1 with no wrap, so every result is in [1, 2^b]. Padding bits
// beyond d_out are ignored. Errors: bits, dimensions, or qzeros.size() not matching the shape.
absl::StatusOr<std::vector<int32_t>> UnpackQzeros(std::span<const int32_t> qzeros, int64_t n_groups,
                                                  int64_t d_out, int bits);

}  // namespace qcal::engine
