#include "services/engine/export/gptq_pack.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "common/status.h"

namespace qcal::engine {
namespace {

// Dimensions are capped so that every element count fits an int64 with room to spare.
constexpr int64_t kMaxDim = int64_t{1} << 31;

uint32_t Mask(int bits) { return (uint32_t{1} << bits) - 1; }

// Value i of a stream starts at bit i·bits; for b = 3 it may continue into the next word, which
// exists because a stream is padded to whole groups of 32 values (= `bits` words).
template <typename Code>
void PackStream(const Code* src, int64_t n, int bits, int32_t* dst, int64_t dst_stride) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t v = static_cast<uint32_t>(src[i]);
    const int64_t bit = i * bits;
    const int64_t w = bit / 32;
    const int shift = static_cast<int>(bit % 32);
    uint32_t lo = static_cast<uint32_t>(dst[w * dst_stride]) | (v << shift);
    dst[w * dst_stride] = static_cast<int32_t>(lo);
    if (shift + bits > 32) {
      uint32_t hi = static_cast<uint32_t>(dst[(w + 1) * dst_stride]) | (v >> (32 - shift));
      dst[(w + 1) * dst_stride] = static_cast<int32_t>(hi);
    }
  }
}

void UnpackStream(const int32_t* src, int64_t src_stride, int64_t n, int bits, int32_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bit = i * bits;
    const int64_t w = bit / 32;
    const int shift = static_cast<int>(bit % 32);
    uint32_t v = static_cast<uint32_t>(src[w * src_stride]) >> shift;
    if (shift + bits > 32) v |= static_cast<uint32_t>(src[(w + 1) * src_stride]) << (32 - shift);
    dst[i] = static_cast<int32_t>(v & Mask(bits));
  }
}

absl::Status CheckDims(const char* fn, const char* rows_name, int64_t rows, const char* cols_name,
                       int64_t cols, int bits) {
  QCAL_RETURN_IF_ERROR(Annotate(ValidateGptqBits(bits), fn));
  if (rows < 1 || cols < 1 || rows >= kMaxDim || cols >= kMaxDim) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": ", rows_name, " = ", rows, " and ",
                                                   cols_name, " = ", cols,
                                                   " must both be in [1, 2^31)"));
  }
  return absl::OkStatus();
}

absl::Status CheckSize(const char* fn, const char* what, size_t got, int64_t rows, int64_t cols) {
  if (static_cast<int64_t>(got) != rows * cols) {
    return absl::InvalidArgumentError(absl::StrCat(fn, ": ", what, " has ", got,
                                                   " elements, expected [", rows, ", ", cols,
                                                   "] = ", rows * cols));
  }
  return absl::OkStatus();
}

template <typename Code>
absl::StatusOr<std::vector<int32_t>> PackCodes(std::span<const Code> codes, int64_t d_out,
                                               int64_t d_in, int bits) {
  QCAL_RETURN_IF_ERROR(CheckDims("PackQweight", "d_out", d_out, "d_in", d_in, bits));
  QCAL_RETURN_IF_ERROR(CheckSize("PackQweight", "codes", codes.size(), d_out, d_in));
  const int64_t max_code = Mask(bits);
  for (int64_t o = 0; o < d_out; ++o) {
    for (int64_t j = 0; j < d_in; ++j) {
      const int64_t c = codes[o * d_in + j];
      if (c < 0 || c > max_code) {
        return absl::InvalidArgumentError(absl::StrCat("PackQweight: code ", c, " at row ", o,
                                                       ", column ", j, " is outside [0, ", max_code,
                                                       "] for ", bits, "-bit weights"));
      }
    }
  }
  std::vector<int32_t> packed(PackedLength(d_in, bits) * d_out, 0);
  for (int64_t o = 0; o < d_out; ++o) {
    PackStream(codes.data() + o * d_in, d_in, bits, packed.data() + o, d_out);
  }
  return packed;
}

}  // namespace

absl::Status ValidateGptqBits(int bits) {
  if (bits == 2 || bits == 3 || bits == 4 || bits == 8) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("bits = ", bits, " cannot be stored in a GPTQ v1 checkpoint (2, 3, 4 or 8)"));
}

int64_t PackedLength(int64_t n, int bits) { return (n + 31) / 32 * bits; }

absl::StatusOr<std::vector<int32_t>> PackQweight(std::span<const int32_t> codes, int64_t d_out,
                                                 int64_t d_in, int bits) {
  return PackCodes(codes, d_out, d_in, bits);
}

absl::StatusOr<std::vector<int32_t>> PackQweight(std::span<const uint8_t> codes, int64_t d_out,
                                                 int64_t d_in, int bits) {
  return PackCodes(codes, d_out, d_in, bits);
}

absl::StatusOr<std::vector<int32_t>> UnpackQweight(std::span<const int32_t> qweight, int64_t d_out,
                                                   int64_t d_in, int bits) {
  QCAL_RETURN_IF_ERROR(CheckDims("UnpackQweight", "d_out", d_out, "d_in", d_in, bits));
  QCAL_RETURN_IF_ERROR(
      CheckSize("UnpackQweight", "qweight", qweight.size(), PackedLength(d_in, bits), d_out));
  std::vector<int32_t> codes(d_out * d_in);
  for (int64_t o = 0; o < d_out; ++o) {
    UnpackStream(qweight.data() + o, d_out, d_in, bits, codes.data() + o * d_in);
  }
  return codes;
}

absl::StatusOr<std::vector<int32_t>> PackQzeros(std::span<const int32_t> zeros, int64_t n_groups,
                                                int64_t d_out, int bits) {
  QCAL_RETURN_IF_ERROR(CheckDims("PackQzeros", "n_groups", n_groups, "d_out", d_out, bits));
  QCAL_RETURN_IF_ERROR(CheckSize("PackQzeros", "zeros", zeros.size(), n_groups, d_out));
  const int32_t max_zero = static_cast<int32_t>(Mask(bits)) + 1;
  std::vector<int32_t> stored(zeros.size());
  for (size_t i = 0; i < zeros.size(); ++i) {
    const int32_t z = zeros[i];
    if (z < 0 || z > max_zero) {
      return absl::InvalidArgumentError(
          absl::StrCat("PackQzeros: zero point ", z, " at group ", i / d_out, ", column ",
                       i % d_out, " is outside [0, ", max_zero, "] for ", bits, "-bit weights"));
    }
    stored[i] = static_cast<int32_t>(static_cast<uint32_t>(z - 1) & Mask(bits));
  }
  const int64_t width = PackedLength(d_out, bits);
  std::vector<int32_t> packed(n_groups * width, 0);
  for (int64_t g = 0; g < n_groups; ++g) {
    PackStream(stored.data() + g * d_out, d_out, bits, packed.data() + g * width, 1);
  }
  return packed;
}

absl::StatusOr<std::vector<int32_t>> UnpackQzeros(std::span<const int32_t> qzeros, int64_t n_groups,
                                                  int64_t d_out, int bits) {
  QCAL_RETURN_IF_ERROR(CheckDims("UnpackQzeros", "n_groups", n_groups, "d_out", d_out, bits));
  const int64_t width = PackedLength(d_out, bits);
  QCAL_RETURN_IF_ERROR(CheckSize("UnpackQzeros", "qzeros", qzeros.size(), n_groups, width));
  std::vector<int32_t> zeros(n_groups * d_out);
  for (int64_t g = 0; g < n_groups; ++g) {
    UnpackStream(qzeros.data() + g * width, 1, d_out, bits, zeros.data() + g * d_out);
  }
  for (int32_t& z : zeros) z += 1;
  return zeros;
}

}  // namespace qcal::engine
