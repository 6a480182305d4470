// GPTQ v1 packing: exact words for hand-computed cases, round trips over odd shapes, and errors.
// Packed words are checked with ReadBit-based decoding written here, independent of the library's
// unpacker.
#include "services/engine/export/gptq_pack.h"

#include <cstdint>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/text_data.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qcal::engine {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

// Bit p of a stream whose word w sits at words[w * stride].
int ReadBit(const std::vector<int32_t>& words, int64_t first, int64_t stride, int64_t p) {
  const uint32_t word = static_cast<uint32_t>(words[first + (p / 32) * stride]);
  return static_cast<int>((word >> (p % 32)) & 1u);
}

// Value k of a b-bit stream, assembled one bit at a time: bit i of the value is stream bit k·b + i.
int32_t ReadValue(const std::vector<int32_t>& words, int64_t first, int64_t stride, int64_t k,
                  int bits) {
  int32_t v = 0;
  for (int i = 0; i < bits; ++i) v |= ReadBit(words, first, stride, k * bits + i) << i;
  return v;
}

std::vector<int32_t> RandomValues(int64_t n, int32_t lo, int32_t hi, uint64_t seed) {
  SplitMix64 rng(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = lo + static_cast<int32_t>(rng.Next() % static_cast<uint64_t>(hi - lo + 1));
  return v;
}

TEST(GptqPackTest, PackedLength) {
  EXPECT_EQ(PackedLength(1, 4), 4);
  EXPECT_EQ(PackedLength(32, 4), 4);
  EXPECT_EQ(PackedLength(33, 4), 8);
  EXPECT_EQ(PackedLength(172, 3), 18);
  EXPECT_EQ(PackedLength(4096, 2), 256);
}

TEST(GptqPackTest, FourBitCodesZeroToSevenInOneColumn) {
  // Code k at bits [4k, 4k+4): 0x76543210. Words 1..3 of the padded 32-code group are zero.
  auto packed = PackQweight(std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}, 1, 8, 4);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(0x76543210, 0, 0, 0));
}

TEST(GptqPackTest, FourBitHighCodesGiveNegativeWord) {
  auto packed = PackQweight(std::vector<int32_t>{8, 9, 10, 11, 12, 13, 14, 15}, 1, 8, 4);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_EQ((*packed)[0], static_cast<int32_t>(0xFEDCBA98u));
  EXPECT_EQ((*packed)[0], -19088744);
}

TEST(GptqPackTest, ColumnsAreTheMinorDimension) {
  // codes [2, 8]: row 0 is 0..7, row 1 is 7..0; qweight [4, 2], word r of column o at r·2 + o.
  std::vector<int32_t> codes = {0, 1, 2, 3, 4, 5, 6, 7, 7, 6, 5, 4, 3, 2, 1, 0};
  auto packed = PackQweight(codes, 2, 8, 4);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(0x76543210, 0x01234567, 0, 0, 0, 0, 0, 0));
}

TEST(GptqPackTest, TwoAndEightBitWords) {
  std::vector<int32_t> two(32);
  for (int k = 0; k < 32; ++k) two[k] = k % 4;  // every byte is 0b11'10'01'00
  auto p2 = PackQweight(two, 1, 32, 2);
  ASSERT_TRUE(p2.ok()) << p2.status();
  EXPECT_THAT(*p2,
              ElementsAre(static_cast<int32_t>(0xE4E4E4E4u), static_cast<int32_t>(0xE4E4E4E4u)));

  auto p8 = PackQweight(std::vector<int32_t>{1, 2, 3, 4, 255}, 1, 5, 8);
  ASSERT_TRUE(p8.ok()) << p8.status();
  EXPECT_THAT(*p8, ElementsAre(0x04030201, 0xFF, 0, 0, 0, 0, 0, 0));
}

TEST(GptqPackTest, ThreeBitCodeTenSpansTheWordBoundary) {
  // Code 10 occupies bits 30..32: its two low bits end word 0, its high bit starts word 1.
  std::vector<int32_t> codes(11, 0);
  codes[10] = 5;  // 0b101: bit 30 = 1, bit 31 = 0, bit 32 = 1
  auto packed = PackQweight(codes, 1, 11, 3);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(0x40000000, 1, 0));

  codes[10] = 7;
  packed = PackQweight(codes, 1, 11, 3);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(static_cast<int32_t>(0xC0000000u), 1, 0));
}

TEST(GptqPackTest, ThreeBitCodeTwentyOneSpansTheSecondBoundary) {
  // Code 21 occupies bits 63..65; 6 = 0b110 puts 0 in bit 63 and ones in bits 64 and 65.
  std::vector<int32_t> codes(32, 0);
  codes[21] = 6;
  codes[31] = 7;  // bits 93..95, the top of word 2
  auto packed = PackQweight(codes, 1, 32, 3);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(0, 0, static_cast<int32_t>(0xE0000003u)));

  std::vector<int32_t> sevens(32, 7);  // all 96 bits set
  packed = PackQweight(sevens, 1, 32, 3);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(-1, -1, -1));
}

TEST(GptqPackTest, QzerosStoreZMinusOne) {
  // z = 1..8 stores 0..7 along d_out: 0x76543210.
  auto packed = PackQzeros(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}, 1, 8, 4);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(0x76543210, 0, 0, 0));
  // Groups are rows: [2, 8] packs into [2, 4].
  packed =
      PackQzeros(std::vector<int32_t>{8, 8, 8, 8, 8, 8, 8, 8, 1, 1, 1, 1, 1, 1, 1, 2}, 2, 8, 4);
  ASSERT_TRUE(packed.ok()) << packed.status();
  EXPECT_THAT(*packed, ElementsAre(0x77777777, 0, 0, 0, 0x10000000, 0, 0, 0));
}

TEST(GptqPackTest, ZeroPointZeroWrapsOnWriteAndReadsBackAsTwoToTheB) {
  for (int bits : {2, 3, 4, 8}) {
    const int32_t mask = (1 << bits) - 1;
    auto packed = PackQzeros(std::vector<int32_t>{0, 1}, 1, 2, bits);
    ASSERT_TRUE(packed.ok()) << packed.status();
    EXPECT_EQ(ReadValue(*packed, 0, 1, 0, bits), mask) << bits << " bits";
    EXPECT_EQ(ReadValue(*packed, 0, 1, 1, bits), 0) << bits << " bits";
    auto zeros = UnpackQzeros(*packed, 1, 2, bits);
    ASSERT_TRUE(zeros.ok()) << zeros.status();
    EXPECT_THAT(*zeros, ElementsAre(mask + 1, 1)) << bits << " bits";
    // What the reader returns packs back to the same words.
    auto repacked = PackQzeros(*zeros, 1, 2, bits);
    ASSERT_TRUE(repacked.ok()) << repacked.status();
    EXPECT_EQ(*repacked, *packed);
  }
}

class GptqRoundTripTest : public ::testing::TestWithParam<int> {};

TEST_P(GptqRoundTripTest, QweightOverOddShapes) {
  const int bits = GetParam();
  const int32_t max_code = (1 << bits) - 1;
  for (int64_t d_out : {1, 31, 32, 33, 64, 172, 200}) {
    for (int64_t d_in : {1, 31, 32, 33, 64, 172, 200}) {
      SCOPED_TRACE(testing::Message() << bits << " bits, d_out " << d_out << ", d_in " << d_in);
      const auto codes = RandomValues(d_out * d_in, 0, max_code, 1000 * d_out + d_in + bits);
      auto packed = PackQweight(codes, d_out, d_in, bits);
      ASSERT_TRUE(packed.ok()) << packed.status();
      const int64_t rows = (d_in + 31) / 32 * bits;
      ASSERT_EQ(static_cast<int64_t>(packed->size()), rows * d_out);
      const int64_t padded = rows * 32 / bits;
      for (int64_t o = 0; o < d_out; ++o) {
        for (int64_t j = 0; j < padded; ++j) {
          const int32_t want = j < d_in ? codes[o * d_in + j] : 0;
          ASSERT_EQ(ReadValue(*packed, o, d_out, j, bits), want) << "row " << o << " col " << j;
        }
      }
      auto unpacked = UnpackQweight(*packed, d_out, d_in, bits);
      ASSERT_TRUE(unpacked.ok()) << unpacked.status();
      ASSERT_EQ(*unpacked, codes);
    }
  }
}

TEST_P(GptqRoundTripTest, QzerosOverOddShapes) {
  const int bits = GetParam();
  const int32_t two_b = 1 << bits;
  for (int64_t n_groups : {1, 3, 33}) {
    for (int64_t d_out : {1, 31, 32, 33, 64, 172, 200}) {
      SCOPED_TRACE(testing::Message()
                   << bits << " bits, groups " << n_groups << ", d_out " << d_out);
      // z in [1, 2^b] round-trips exactly; z = 0 is covered by the wrap test.
      const auto zeros = RandomValues(n_groups * d_out, 1, two_b, 7 * d_out + n_groups + bits);
      auto packed = PackQzeros(zeros, n_groups, d_out, bits);
      ASSERT_TRUE(packed.ok()) << packed.status();
      const int64_t width = (d_out + 31) / 32 * bits;
      ASSERT_EQ(static_cast<int64_t>(packed->size()), n_groups * width);
      for (int64_t g = 0; g < n_groups; ++g) {
        for (int64_t o = 0; o < width * 32 / bits; ++o) {
          const int32_t want = o < d_out ? (zeros[g * d_out + o] - 1) & (two_b - 1) : 0;
          ASSERT_EQ(ReadValue(*packed, g * width, 1, o, bits), want)
              << "group " << g << " col " << o;
        }
      }
      auto unpacked = UnpackQzeros(*packed, n_groups, d_out, bits);
      ASSERT_TRUE(unpacked.ok()) << unpacked.status();
      ASSERT_EQ(*unpacked, zeros);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Bits, GptqRoundTripTest, ::testing::Values(2, 3, 4, 8));

TEST(GptqPackTest, RejectsBitWidthsGptqV1CannotHold) {
  for (int bits : {0, 1, 5, 6, 7, 16}) {
    auto packed = PackQweight(std::vector<int32_t>{0}, 1, 1, bits);
    ASSERT_FALSE(packed.ok()) << bits;
    EXPECT_EQ(packed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(packed.status().message(), HasSubstr(absl::StrCat("bits = ", bits)));
    EXPECT_FALSE(UnpackQzeros(std::vector<int32_t>(16, 0), 1, 1, bits).ok()) << bits;
  }
}

TEST(GptqPackTest, RejectsOutOfRangeCodesAndZeros) {
  std::vector<int32_t> codes(6, 0);
  codes[5] = 16;  // row 1, column 2 of [2, 3]
  auto packed = PackQweight(codes, 2, 3, 4);
  ASSERT_FALSE(packed.ok());
  EXPECT_THAT(packed.status().message(), HasSubstr("code 16 at row 1, column 2"));
  codes[5] = -1;
  EXPECT_THAT(PackQweight(codes, 2, 3, 4).status().message(), HasSubstr("code -1 at row 1"));
  codes[5] = 15;
  EXPECT_TRUE(PackQweight(codes, 2, 3, 4).ok());
  codes[5] = 8;
  EXPECT_FALSE(PackQweight(codes, 2, 3, 3).ok());

  EXPECT_THAT(PackQzeros(std::vector<int32_t>{1, 17}, 1, 2, 4).status().message(),
              HasSubstr("zero point 17 at group 0, column 1"));
  EXPECT_FALSE(PackQzeros(std::vector<int32_t>{-1, 1}, 1, 2, 4).ok());
  EXPECT_TRUE(PackQzeros(std::vector<int32_t>{16, 1}, 1, 2, 4).ok());
}

TEST(GptqPackTest, RejectsShapeMismatches) {
  auto packed = PackQweight(std::vector<int32_t>(5, 0), 2, 3, 4);
  ASSERT_FALSE(packed.ok());
  EXPECT_THAT(packed.status().message(), HasSubstr("5 elements, expected [2, 3] = 6"));
  EXPECT_FALSE(PackQweight(std::vector<int32_t>{}, 0, 3, 4).ok());
  EXPECT_FALSE(PackQzeros(std::vector<int32_t>(3, 1), 1, 4, 4).ok());

  // qweight for d_in = 33 at 4 bits is [8, d_out]; [4, d_out] is the size for d_in <= 32.
  auto unpacked = UnpackQweight(std::vector<int32_t>(4 * 2, 0), 2, 33, 4);
  ASSERT_FALSE(unpacked.ok());
  EXPECT_THAT(unpacked.status().message(), HasSubstr("qweight has 8 elements, expected [8, 2]"));
  EXPECT_TRUE(UnpackQweight(std::vector<int32_t>(8 * 2, 0), 2, 33, 4).ok());
  EXPECT_FALSE(UnpackQweight(std::vector<int32_t>(8, 0), 2, -1, 4).ok());

  auto zeros = UnpackQzeros(std::vector<int32_t>(3, 0), 2, 32, 3);
  ASSERT_FALSE(zeros.ok());
  EXPECT_THAT(zeros.status().message(), HasSubstr("qzeros has 3 elements, expected [2, 3]"));
}

}  // namespace
}  // namespace qcal::engine
