// The output-adaptive statistics of one linear (DESIGN section 3, "Output-adaptive calibration"):
// the per-token known answer (‖g_t‖² = 4 gives exactly 4·Gram and GPTQ's codes unchanged), the
// sample-wise Hessian and the Fisher against double sums of the weight gradients, the combine,
// the planned sizes, and the files (round trip, corruption, wrong kind).
#include "services/engine/oac/oac_statistics.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "common/files.h"
#include "common/safetensors.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/quant_grid.h"
#include "tests/engine/oac/oac_test_util.h"
#include "tests/support/numeric.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

using testing::RelativeError;

namespace fs = std::filesystem;
using ::qcal::testing::RandomTensor;
using ::qcal::testing::TestRng;
using ::qcal::testing::Values;
using ::testing::HasSubstr;

// Σ_n (Γ_nᵀX_n)ᵀ(Γ_nᵀX_n) in double over samples of `l` rows.
std::vector<double> SampleHessianInDouble(const Tensor& x, const Tensor& dy, int64_t l) {
  const int64_t rows = x.dim(0), d_in = x.dim(1), d_out = dy.dim(1);
  std::vector<double> h(d_in * d_in, 0.0);
  for (int64_t s = 0; s * l < rows; ++s) {
    std::vector<double> g(d_out * d_in, 0.0);
    for (int64_t t = s * l; t < (s + 1) * l; ++t) {
      for (int64_t o = 0; o < d_out; ++o) {
        for (int64_t i = 0; i < d_in; ++i) {
          g[o * d_in + i] +=
              double(dy.data<float>()[t * d_out + o]) * x.data<float>()[t * d_in + i];
        }
      }
    }
    for (int64_t i = 0; i < d_in; ++i) {
      for (int64_t j = 0; j < d_in; ++j) {
        for (int64_t o = 0; o < d_out; ++o) h[i * d_in + j] += g[o * d_in + i] * g[o * d_in + j];
      }
    }
  }
  return h;
}

TEST(OacStatisticsTest, TokenHessianWithGradientNormsOfFourIsFourGramsAndKeepsGptqCodes) {
  auto be = testing::OacCpuBackend();
  TestRng rng(9);
  const int64_t rows = 53, d_in = 40, d_out = 19;
  Tensor x = RandomTensor(rng, {rows, d_in}, 1.0);
  // Every row of dy has four entries ±1 at random places: ‖g_t‖² = 4 exactly.
  Tensor dy = Tensor::Zeros(DType::kF32, {rows, d_out});
  for (int64_t t = 0; t < rows; ++t) {
    for (int64_t placed = 0; placed < 4;) {
      const int64_t c = static_cast<int64_t>(rng.Uniform() * d_out);
      float& v = dy.data<float>()[t * d_out + c];
      if (v != 0) continue;
      v = rng.Uniform() < 0.5 ? -1.0f : 1.0f;
      ++placed;
    }
  }
  Tensor h_tok = Tensor::Zeros(DType::kF32, {d_in, d_in});
  ASSERT_TRUE(AccumulateOacHessian(*be, HessianKind::kOutputAdaptiveToken, x, dy, 1, h_tok).ok());
  Tensor gram = Tensor::Zeros(DType::kF32, {d_in, d_in});
  ASSERT_TRUE(be->AccumulateGram(x, gram).ok());
  std::vector<float> four_gram = Values(gram);
  for (float& v : four_gram) v *= 4.0f;
  EXPECT_EQ(Values(h_tok), four_gram);

  // GPTQ on H and on 4·H: the damping is relative and U scales by 1/2, so the codes are the same.
  Tensor w = RandomTensor(rng, {23, d_in}, 0.1);
  kernels::QuantSpec spec;
  spec.bits = 3;
  spec.group_size = 16;
  for (const bool act_order : {false, true}) {
    kernels::GptqSolveOptions solve;
    solve.block_size = 8;
    solve.act_order = act_order;
    auto f_layer = be->GptqFactorize(gram, solve);
    auto f_tok = be->GptqFactorize(h_tok, solve);
    ASSERT_TRUE(f_layer.ok() && f_tok.ok());
    auto q_layer = be->GptqSolve(w, *f_layer, spec, solve.block_size, false);
    auto q_tok = be->GptqSolve(w, *f_tok, spec, solve.block_size, false);
    ASSERT_TRUE(q_layer.ok() && q_tok.ok());
    const uint8_t* a = q_layer->codes.data<uint8_t>();
    const uint8_t* b = q_tok->codes.data<uint8_t>();
    EXPECT_EQ(std::vector<uint8_t>(a, a + q_layer->codes.numel()),
              std::vector<uint8_t>(b, b + q_tok->codes.numel()))
        << "act_order " << act_order;
    EXPECT_EQ(Values(q_layer->scales), Values(q_tok->scales));
  }
}

// Shapes that take each order of the sample-wise product (through ΓΓᵀ, or through G = ΓᵀX).
struct SampleCase {
  int64_t l, d_in, d_out;
};

TEST(OacStatisticsTest, SampleHessianAndFisherMatchWeightGradientsInDouble) {
  auto be = testing::OacCpuBackend();
  for (const SampleCase& c : {SampleCase{6, 21, 31}, SampleCase{41, 13, 7}, SampleCase{1, 5, 3}}) {
    SCOPED_TRACE(::testing::Message() << "L " << c.l << " d_in " << c.d_in << " d_out " << c.d_out);
    TestRng rng(c.l * 100 + c.d_in);
    const int samples = 3;
    Tensor x = RandomTensor(rng, {samples * c.l, c.d_in}, 1.0);
    Tensor dy = RandomTensor(rng, {samples * c.l, c.d_out}, 0.3);
    // Accumulated onto a non-zero symmetric h: the op adds.
    Tensor h = RandomTensor(rng, {c.d_in, c.d_in}, 1.0);
    for (int64_t i = 0; i < c.d_in; ++i) {
      for (int64_t j = 0; j < i; ++j)
        h.data<float>()[i * c.d_in + j] = h.data<float>()[j * c.d_in + i];
    }
    const std::vector<float> h0 = Values(h);
    Tensor f = Tensor::Zeros(DType::kF32, {c.d_out, c.d_in});
    ASSERT_TRUE(AccumulateOacHessian(*be, HessianKind::kOutputAdaptive, x, dy, c.l, h).ok());
    ASSERT_TRUE(AccumulateFisher(*be, x, dy, c.l, f).ok());
    // Symmetric bit for bit: the lower triangle mirrored.
    for (int64_t i = 0; i < c.d_in; ++i) {
      for (int64_t j = 0; j < i; ++j) {
        ASSERT_EQ(h.data<float>()[i * c.d_in + j], h.data<float>()[j * c.d_in + i]);
      }
    }
    std::vector<double> want = SampleHessianInDouble(x, dy, c.l);
    for (size_t i = 0; i < want.size(); ++i) want[i] += h0[i];
    EXPECT_LT(RelativeError(Values(h), want), 1e-5);
    // F_oi = Σ_n G_n[o, i]²; its total equals trace(H_oac) = Σ_n ‖G_n‖²_F.
    std::vector<double> fisher(c.d_out * c.d_in, 0.0);
    for (int s = 0; s < samples; ++s) {
      for (int64_t o = 0; o < c.d_out; ++o) {
        for (int64_t i = 0; i < c.d_in; ++i) {
          double g = 0;
          for (int64_t t = s * c.l; t < (s + 1) * c.l; ++t) {
            g += double(dy.data<float>()[t * c.d_out + o]) * x.data<float>()[t * c.d_in + i];
          }
          fisher[o * c.d_in + i] += g * g;
        }
      }
    }
    EXPECT_LT(RelativeError(Values(f), fisher), 1e-5);
  }
}

TEST(OacStatisticsTest, RefusesLayerKindAndBadShapes) {
  auto be = testing::OacCpuBackend();
  Tensor x = Tensor::Zeros(DType::kF32, {4, 3}), dy = Tensor::Zeros(DType::kF32, {4, 2});
  Tensor h = Tensor::Zeros(DType::kF32, {3, 3}), bad_h = Tensor::Zeros(DType::kF32, {2, 2});
  EXPECT_EQ(AccumulateOacHessian(*be, HessianKind::kLayer, x, dy, 4, h).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AccumulateOacHessian(*be, HessianKind::kOutputAdaptive, x, dy, 4, bad_h).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AccumulateOacHessian(*be, HessianKind::kOutputAdaptive, x,
                                 Tensor::Zeros(DType::kF32, {3, 2}), 4, h)
                .code(),
            absl::StatusCode::kInvalidArgument);
  // Rows that are not whole samples.
  EXPECT_EQ(AccumulateOacHessian(*be, HessianKind::kOutputAdaptive, x, dy, 3, h).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(AccumulateFisher(*be, x, dy, 4, h).code(), absl::StatusCode::kInvalidArgument);
}

TEST(OacStatisticsTest, CombineAddsTheRightPartialIntoTheLeft) {
  auto be = testing::OacCpuBackend();
  LinearOac left{Tensor::FromVector({1, 2, 2, 5}, {2, 2}), Tensor::FromVector({1, 1}, {1, 2})};
  LinearOac right{Tensor::FromVector({0.5, 1, 1, 3}, {2, 2}), Tensor::FromVector({2, 4}, {1, 2})};
  ASSERT_TRUE(LinearOacCombine(*be)(left, right).ok());
  EXPECT_EQ(Values(left.hessian), (std::vector<float>{1.5, 3, 3, 8}));
  EXPECT_EQ(Values(left.fisher), (std::vector<float>{3, 5}));
  LinearOac no_fisher{Tensor::FromVector({1, 2, 2, 5}, {2, 2}), Tensor()};
  EXPECT_FALSE(LinearOacCombine(*be)(no_fisher, right).ok());
}

TEST(OacStatisticsTest, SizesAreThePackedTrianglesAndTheFisher) {
  EXPECT_EQ(LinearOacBytes(7, 5, false), 15 * 4);
  EXPECT_EQ(LinearOacBytes(7, 5, true), (15 + 35) * 4);
  // Llama-2-7B: six 4096-wide inputs and one 11008-wide, ≈ 0.45 GB a block (DESIGN section 2).
  ModelConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 11008;
  c.num_heads = c.num_kv_heads = 32;
  c.head_dim = 128;
  c.num_layers = 32;
  const int64_t block = 6 * (4096LL * 4097 / 2) * 4 + (11008LL * 11009 / 2) * 4;
  EXPECT_EQ(ModelOacBytes(c, false), 32 * block);
  EXPECT_NEAR(block / 1e9, 0.45, 0.01);
  EXPECT_EQ(ModelOacBytes(c, true) - ModelOacBytes(c, false),
            32LL * 4 * (3 * 4096 * 4096 + 4096LL * 4096 + 3 * 11008LL * 4096));
}

class OacFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("oac_file");
    TestRng rng(2);
    Tensor a = RandomTensor(rng, {9, n_}, 1.0);
    oac_.hessian = Tensor::Zeros(DType::kF32, {n_, n_});
    auto be = testing::OacCpuBackend();
    QCAL_CHECK(be->AccumulateGram(a, oac_.hessian).ok());
    oac_.fisher = RandomTensor(rng, {d_out_, n_}, 1.0);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  // The file's bytes with `edit` applied.
  void Rewrite(const std::string& path, const std::function<void(std::string&)>& edit) {
    std::string bytes = ReadFileToString(path).value();
    edit(bytes);
    QCAL_CHECK(WriteStringToFile(path, bytes).ok());
  }

  std::string dir_;
  const int64_t n_ = 11, d_out_ = 6;
  LinearOac oac_;
};

TEST_F(OacFileTest, RoundTripIsBitIdentical) {
  for (const bool fisher : {true, false}) {
    LinearOac oac = oac_;
    if (!fisher) oac.fisher = Tensor();
    const std::string path = Path(fisher ? "with_fisher.safetensors" : "plain.safetensors");
    auto sha = WriteLinearOac(path, HessianKind::kOutputAdaptive, oac);
    ASSERT_TRUE(sha.ok()) << sha.status();
    EXPECT_EQ(*sha, Sha256File(path).value());
    EXPECT_FALSE(fs::exists(path + ".tmp"));
    auto back = ReadLinearOac(path, HessianKind::kOutputAdaptive, d_out_, n_, *sha);
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(Values(back->hessian), Values(oac.hessian));
    EXPECT_EQ(back->fisher.defined(), fisher);
    if (fisher) {
      EXPECT_EQ(Values(back->fisher), Values(oac.fisher));
    }
    // The same statistics give the same bytes.
    EXPECT_EQ(*WriteLinearOac(path, HessianKind::kOutputAdaptive, oac), *sha);
  }
}

TEST_F(OacFileTest, DamagedOrForeignFilesAreDataLossNamingTheFile) {
  const std::string path = Path("q.safetensors");
  auto sha = WriteLinearOac(path, HessianKind::kOutputAdaptiveToken, oac_);
  ASSERT_TRUE(sha.ok());
  const std::string good = ReadFileToString(path).value();
  auto expect_data_loss = [&](const absl::Status& s, const std::string& what) {
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << what << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr(path)) << what;
  };
  // Another kind, another width, another d_out.
  expect_data_loss(ReadLinearOac(path, HessianKind::kOutputAdaptive, d_out_, n_).status(), "kind");
  expect_data_loss(ReadLinearOac(path, HessianKind::kOutputAdaptiveToken, d_out_, n_ + 1).status(),
                   "d_in");
  expect_data_loss(ReadLinearOac(path, HessianKind::kOutputAdaptiveToken, d_out_ + 1, n_).status(),
                   "d_out");
  // Truncated.
  Rewrite(path, [](std::string& b) { b.resize(b.size() - 7); });
  expect_data_loss(ReadLinearOac(path, HessianKind::kOutputAdaptiveToken, d_out_, n_).status(),
                   "truncated");
  // A flipped data byte: only the hash can tell.
  Rewrite(path, [&](std::string& b) {
    b = good;
    b[b.size() - 3] ^= 0x40;
  });
  ASSERT_TRUE(ReadLinearOac(path, HessianKind::kOutputAdaptiveToken, d_out_, n_).ok());
  expect_data_loss(
      ReadLinearOac(path, HessianKind::kOutputAdaptiveToken, d_out_, n_, *sha).status(), "sha256");
  // A garbled header.
  Rewrite(path, [&](std::string& b) {
    b = good;
    b[12] = '#';
  });
  expect_data_loss(ReadLinearOac(path, HessianKind::kOutputAdaptiveToken, d_out_, n_).status(),
                   "header");
  // Not an OAC file at all.
  ASSERT_TRUE(
      WriteSafetensors(path, {{"hessian_upper", Tensor::Zeros(DType::kF32, {n_ * (n_ + 1) / 2})}})
          .ok());
  expect_data_loss(ReadLinearOac(path, HessianKind::kOutputAdaptiveToken, d_out_, n_).status(),
                   "foreign");
}

}  // namespace
}  // namespace qcal::engine
