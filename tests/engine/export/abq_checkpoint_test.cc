// ABQ inference from GPTQ v1 checkpoints (services/engine/export/abq_checkpoint.h) on the CPU
// backend, whose ABQ kernels are their reference (kernels/cpu/abq_ref.h): every refusal with its
// message, checked on the host before a model is loaded; the ABQ path against the dequantizing one
// (every linear bit for bit, the same perplexity, the same greedy tokens) at W4A8 and
// W2*A8 on a synthetic Llama, on a Qwen2-style model with q/k/v biases and a LoRA adapter, and
// (with ../shared) on stories260k, whose down_proj d_in 172 is not a multiple of 32; and the
// decode benchmark on a tiny shape.
#include "services/engine/export/abq_checkpoint.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/dtype.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/bench.h"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/export/checkpoint_writer.h"
#include "services/engine/model.h"
#include "services/engine/quant/quantized_linear.h"
#include "services/engine/recipe.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/kernels/kernel_test_random.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;
using kernels::AbqKernel;
using ::testing::HasSubstr;

// Whole models, ABQ against dequantization: the same bits. The dequantizing path's
// Backend::ActQuantLinear sums codes times weights in fp64 and rounds once, as the ABQ epilogue
// does (kernels/cpu/abq_ref.h); for a checkpoint's fp16 scales both sums are exact, so every
// linear gives the same fp32 output (ExpectLinearsMatch) and the perplexities are equal. (With two
// fp32 roundings, as before 2026-12-05, the odd ulp flipped an activation code downstream, and the
// perplexities differed by up to 7e-4 relative.)

std::unique_ptr<kernels::Backend> CpuBackend() {
  kernels::BackendOptions options;
  options.threads = 2;
  auto backend = kernels::CreateBackend(options);
  EXPECT_TRUE(backend.ok()) << backend.status();
  return backend.ok() ? *std::move(backend) : nullptr;
}

Recipe RtnRecipe(int bits, int group, int act_bits, GridKind grid = GridKind::kUniform) {
  Recipe r;
  r.method = QuantMethod::kRtn;
  r.weights.bits = bits;
  r.weights.group_size = group;
  r.weights.grid = grid;
  r.activations.bits = act_bits;
  return r;
}

// Writes the RTN quantization of every block linear of `source` with `recipe` into a fresh
// directory; `mutate` may change the quantized linears first, `extras` adds adapters.
std::string Export(
    const std::string& source, const Recipe& recipe, const std::string& tag,
    const std::function<void(std::map<std::string, QuantizedLinear>&)>& mutate = nullptr,
    const CheckpointExtras& extras = {}) {
  auto config = LoadModelConfig(source);
  auto reader = CheckpointReader::Open(source);
  EXPECT_TRUE(config.ok() && reader.ok());
  std::map<std::string, QuantizedLinear> quantized;
  for (int b = 0; b < config->num_layers; ++b) {
    for (LinearKind k : kAllLinears) {
      const std::string prefix = LinearPrefix(b, k);
      auto w = (*reader)->GetF32(prefix + ".weight");
      EXPECT_TRUE(w.ok()) << w.status();
      auto q = QuantizeRtn<float>(w->data<float>(), w->dim(0), w->dim(1), SpecOf(recipe));
      EXPECT_TRUE(q.ok()) << q.status();
      quantized[prefix] = *std::move(q);
    }
  }
  if (mutate) mutate(quantized);
  const std::string dir = testing::MakeTempDir(tag);
  const absl::Status st = WriteQuantizedCheckpoint(source, dir, recipe, quantized, extras);
  EXPECT_TRUE(st.ok()) << st;
  return dir;
}

// The message of PlanAbqInference's error (empty when it accepts the checkpoint).
std::string Refusal(const std::string& dir, AbqKernel kernel, int act_bits = 0) {
  AbqInferenceOptions options;
  options.kernel = kernel;
  options.act_bits = act_bits;
  absl::StatusOr<AbqInferencePlan> plan = PlanAbqInference(dir, options);
  return plan.ok() ? std::string() : std::string(plan.status().message());
}

class AbqCheckpointTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    llama_ = new std::string(Synthesize(SynthArch::kLlama, "abq-llama"));
    qwen2_ = new std::string(Synthesize(SynthArch::kQwen2, "abq-qwen2"));
  }
  static void TearDownTestSuite() {
    for (std::string* dir : {llama_, qwen2_}) {
      fs::remove_all(fs::path(*dir).parent_path());
      delete dir;
    }
  }
  static std::string Synthesize(SynthArch arch, const std::string& tag) {
    SynthOptions o;
    o.out_dir = testing::MakeTempDir(tag) + "/model";
    o.arch = arch;
    o.threads = 2;
    o.sha256 = false;
    auto r = WriteSyntheticCheckpoint(o);
    EXPECT_TRUE(r.ok()) << r.status();
    return o.out_dir;
  }

  void TearDown() override {
    for (const std::string& d : dirs_) fs::remove_all(d);
  }
  std::string Keep(std::string dir) {
    dirs_.push_back(dir);
    return dir;
  }

  // Perplexity of the checkpoint in `dir` on `text` (L = seq_len, the first `windows` windows),
  // loaded as qcal eval loads it (streaming), through `abq` (unset: the dequantizing path).
  PerplexityResult Perplexity(const std::string& dir, const std::string& text, int seq_len,
                              int windows, std::optional<AbqKernel> abq, int act_bits = 0) {
    LoadOptions load;
    load.residency = BlockResidency::kStreaming;
    load.abq_kernel = abq;
    load.act_bits = act_bits;
    auto model = LoadCheckpoint(dir, backend_.get(), load);
    EXPECT_TRUE(model.ok()) << model.status();
    auto tokenizer = Tokenizer::Load(dir);
    auto corpus = LoadCorpusText(text);
    EXPECT_TRUE(tokenizer.ok() && corpus.ok());
    auto tokens = (*tokenizer)->Encode(*corpus);
    EXPECT_TRUE(tokens.ok());
    auto w = MakeEvalWindows(*tokens, seq_len, windows, (*tokenizer)->bos_id(), text);
    EXPECT_TRUE(w.ok()) << w.status();
    auto r = EvaluatePerplexity(**model, *w);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : PerplexityResult{};
  }

  // 24 greedy tokens from BOS with the whole model resident (as qcal generate loads it).
  std::vector<int> Greedy(const std::string& dir, std::optional<AbqKernel> abq) {
    LoadOptions load;
    load.abq_kernel = abq;
    auto model = LoadCheckpoint(dir, backend_.get(), load);
    EXPECT_TRUE(model.ok()) << model.status();
    GenerateOptions go;
    go.max_new_tokens = 24;
    auto ids = GenerateGreedy(**model, {}, go);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int>{};
  }

  // Every linear of `dir` through b1 and int8 against the dequantizing path's linear (ActQuant to
  // the checkpoint's bits, then the dense GEMM of the dequantized weights) on the same random
  // input: within (d_in + n_groups + 4)·2^-23·Σ_k |x̂_k·ŵ_k| of each other (both within fp32
  // rounding of the exact product: the GEMM's additions, the epilogue's fmas, the products).
  void ExpectLinearsMatch(const std::string& dir) {
    auto config = ReadCheckpointQuantization(dir);
    ASSERT_TRUE(config.ok());
    LoadOptions abq_load;
    abq_load.abq_kernel = AbqKernel::kBinaryMma;
    auto dense = LoadCheckpoint(dir, backend_.get());
    auto abq = LoadCheckpoint(dir, backend_.get(), abq_load);
    ASSERT_TRUE(dense.ok() && abq.ok());
    kernels::kernel_tests::Random rng(5);
    for (int b = 0; b < (*dense)->num_blocks(); ++b) {
      for (LinearKind k : kAllLinears) {
        const Linear& d = (*dense)->block(b).at(k);
        const Linear& a = (*abq)->block(b).at(k);
        ASSERT_NE(a.abq, nullptr);
        ASSERT_FALSE(a.weight.defined());  // no dense copy beside the planes
        const int64_t m = 5, n = d.d_out(), kk = d.d_in();
        const Tensor x = rng.Floats({m, kk});
        Tensor xq = Tensor::Zeros(DType::kF32, {m, kk});
        ASSERT_TRUE(backend_->ActQuant(x, config->activation_bits, xq).ok());
        Tensor want = Tensor::Zeros(DType::kF32, {m, n});
        ASSERT_TRUE(backend_->Linear(xq, d.weight, nullptr, want, false).ok());
        Tensor exact = Tensor::Zeros(DType::kF32, {m, n});
        ASSERT_TRUE(
            backend_->ActQuantLinear(x, config->activation_bits, d.weight, nullptr, exact, false)
                .ok());
        const double groups =
            static_cast<double>(a.abq->spec().group_size < 0 ? 1
                                                             : (kk + a.abq->spec().group_size - 1) /
                                                                   a.abq->spec().group_size);
        for (AbqKernel kernel : {AbqKernel::kBinaryMma, AbqKernel::kInt8Mma}) {
          Tensor got = Tensor::Zeros(DType::kF32, {m, n});
          ASSERT_TRUE(backend_->AbqLinear(*a.abq, kernel, x, nullptr, got, false).ok());
          // The same bits as the dequantizing path, and near the plain fp32 product of x̂ and ŵ.
          ASSERT_EQ(std::memcmp(got.raw(), exact.raw(), got.nbytes()), 0) << LinearPrefix(b, k);
          for (int64_t t = 0; t < m; ++t) {
            for (int64_t o = 0; o < n; ++o) {
              double magnitude = 0;
              for (int64_t c = 0; c < kk; ++c) {
                magnitude += std::fabs(double{xq.data<float>()[t * kk + c]} *
                                       d.weight.data<float>()[o * kk + c]);
              }
              const double bound = (kk + groups + 4) * std::ldexp(1.0, -23) * magnitude;
              ASSERT_LE(std::fabs(got.data<float>()[t * n + o] - want.data<float>()[t * n + o]),
                        bound)
                  << LinearPrefix(b, k) << " [" << t << "][" << o << "]";
            }
          }
        }
      }
    }
  }

  // The ABQ path (b1) against dequantization on `dir`: perplexity, greedy tokens, each linear.
  void ExpectParity(const std::string& dir, const std::string& text, int seq_len, int windows) {
    const PerplexityResult deq = Perplexity(dir, text, seq_len, windows, std::nullopt);
    const PerplexityResult abq = Perplexity(dir, text, seq_len, windows, AbqKernel::kBinaryMma);
    ASSERT_GT(deq.perplexity, 1);
    EXPECT_EQ(abq.tokens, deq.tokens);
    EXPECT_EQ(abq.nll, deq.nll) << "abq " << abq.perplexity << ", dequant " << deq.perplexity;
    ExpectLinearsMatch(dir);
    const std::vector<int> want = Greedy(dir, std::nullopt);
    EXPECT_EQ(want.size(), 24u);
    EXPECT_EQ(Greedy(dir, AbqKernel::kBinaryMma), want);
  }

  static std::string* llama_;
  static std::string* qwen2_;
  std::unique_ptr<kernels::Backend> backend_ = CpuBackend();
  std::vector<std::string> dirs_;
};
std::string* AbqCheckpointTest::llama_ = nullptr;
std::string* AbqCheckpointTest::qwen2_ = nullptr;

TEST_F(AbqCheckpointTest, W4A8AndBalancedW2A8MatchDequantization) {
  const std::string text = *llama_ + "/eval.txt";
  for (const Recipe& recipe :
       {RtnRecipe(4, 32, 8), RtnRecipe(2, 64, 8, GridKind::kBalanced), RtnRecipe(3, -1, 4)}) {
    SCOPED_TRACE(absl::StrCat("W", recipe.weights.bits, " g", recipe.weights.group_size, " A",
                              recipe.activations.bits));
    const std::string dir = Keep(Export(*llama_, recipe, "abq-parity"));
    ExpectParity(dir, text, 64, 6);
  }
}

// q/k/v biases and LoRA branches on q_proj (every block) and down_proj (block 1), per-channel
// weights: the bias and the low-rank branch (on the unquantized input) are added as the dense
// path adds them, and o_proj and down_proj accumulate into the residual.
TEST_F(AbqCheckpointTest, BiasesAndAdapterMatchDequantization) {
  auto reader = CheckpointReader::Open(*qwen2_);
  ASSERT_TRUE(reader.ok());
  CheckpointExtras extras;
  for (int b = 0; b < 2; ++b) {
    for (LinearKind k : {LinearKind::kQ, LinearKind::kDown}) {
      if (k == LinearKind::kDown && b == 0) continue;
      auto info = (*reader)->Info(LinearPrefix(b, k) + ".weight");
      ASSERT_TRUE(info.ok());
      const int64_t r = 4, d_out = info->shape[0], d_in = info->shape[1];
      Tensor a = Tensor::Zeros(DType::kF32, {d_out, r}), lb = Tensor::Zeros(DType::kF32, {r, d_in});
      for (int64_t i = 0; i < a.numel(); ++i) a.data<float>()[i] = 0.01f * ((i * 7 + b) % 13 - 6);
      for (int64_t i = 0; i < lb.numel(); ++i) lb.data<float>()[i] = 0.01f * ((i * 5) % 11 - 5);
      extras.adapters[LinearPrefix(b, k)] = {a, lb};
    }
  }
  const std::string dir = Keep(Export(*qwen2_, RtnRecipe(4, -1, 8), "abq-qwen2", nullptr, extras));
  ASSERT_TRUE(fs::exists(dir + "/adapter/adapter_config.json"));
  ExpectParity(dir, *qwen2_ + "/eval.txt", 64, 6);
}

// The weight-only kernel rounds activations to bf16 where the dequantizing path keeps fp32: close,
// not equal. --act-bits 16 lets a16 run a checkpoint that records activation bits.
TEST_F(AbqCheckpointTest, WeightOnlyKernelIsCloseToDequantization) {
  const std::string dir = Keep(Export(*llama_, RtnRecipe(4, 128, 16), "abq-a16"));
  const std::string text = *llama_ + "/eval.txt";
  const PerplexityResult deq = Perplexity(dir, text, 64, 4, std::nullopt);
  const PerplexityResult a16 = Perplexity(dir, text, 64, 4, AbqKernel::kWeightOnly);
  EXPECT_NEAR(a16.perplexity / deq.perplexity, 1.0, 1e-2);
  const std::string a8 = Keep(Export(*llama_, RtnRecipe(4, 128, 8), "abq-a16-override"));
  EXPECT_EQ(Refusal(a8, AbqKernel::kWeightOnly, 16), "");
  const PerplexityResult forced = Perplexity(a8, text, 64, 4, AbqKernel::kWeightOnly, 16);
  EXPECT_EQ(forced.nll, a16.nll);  // the same codes: activation bits are not in the weights
}

TEST_F(AbqCheckpointTest, RefusesWhatTheKernelsCannotRun) {
  // Not GPTQ: an unquantized checkpoint, a qcal_fake one (5 bits).
  EXPECT_THAT(Refusal(*llama_, AbqKernel::kBinaryMma), HasSubstr("not quantized"));
  const std::string fake = Keep(Export(*llama_, RtnRecipe(5, 128, 8), "abq-fake"));
  EXPECT_THAT(Refusal(fake, AbqKernel::kBinaryMma), HasSubstr("quant_method \"qcal_fake\""));
  // A16 checkpoints with the integer kernels; activation bits with a16; 5..7 bits.
  const std::string a16 = Keep(Export(*llama_, RtnRecipe(4, 128, 16), "abq-a16-refuse"));
  EXPECT_THAT(Refusal(a16, AbqKernel::kBinaryMma),
              HasSubstr("--abq-kernel b1 quantizes activations to 4 or 8 bits, but " + a16 +
                        "/config.json (quantization_config.qcal.activation_bits) gives 16 (A16)"));
  EXPECT_THAT(Refusal(a16, AbqKernel::kInt8Mma), HasSubstr("--abq-kernel int8"));
  EXPECT_EQ(Refusal(a16, AbqKernel::kInt8Mma, 4), "");
  const std::string a8 = Keep(Export(*llama_, RtnRecipe(4, 128, 8), "abq-a8-refuse"));
  EXPECT_THAT(Refusal(a8, AbqKernel::kWeightOnly),
              HasSubstr("--abq-kernel a16 keeps activations 16-bit"));
  EXPECT_THAT(Refusal(a8, AbqKernel::kBinaryMma, 6),
              HasSubstr("--act-bits gives activation bits 6: the ABQ kernels take 4 or 8"));
  // A group of 16 columns is half a plane word.
  const std::string g16 = Keep(Export(*llama_, RtnRecipe(4, 16, 8), "abq-g16"));
  EXPECT_THAT(Refusal(g16, AbqKernel::kBinaryMma),
              HasSubstr("group size must be -1 (per output channel) or a positive multiple of 32"));
  // Act-order: g_idx that is not k / group_size (two columns of o_proj in block 1 trade groups).
  const std::string act_order = Keep(Export(
      *llama_, RtnRecipe(4, 32, 8), "abq-act-order", [](std::map<std::string, QuantizedLinear>& q) {
        QuantizedLinear& o = q.at(LinearPrefix(1, LinearKind::kO));
        std::swap(o.g_idx[3], o.g_idx[40]);
      }));
  EXPECT_THAT(Refusal(act_order, AbqKernel::kBinaryMma),
              HasSubstr("model.layers.1.self_attn.o_proj: g_idx[3] = 1, expected 0 (group size "
                        "32): act-order checkpoints"));
  // LoadCheckpoint runs the same checks before it places anything on the backend; the
  // dequantizing path still loads the checkpoint.
  LoadOptions load;
  load.abq_kernel = AbqKernel::kBinaryMma;
  EXPECT_THAT(std::string(LoadCheckpoint(act_order, backend_.get(), load).status().message()),
              HasSubstr("act-order"));
  EXPECT_TRUE(LoadCheckpoint(act_order, backend_.get()).ok());
}

// A hand-written one-block GPTQ v1 checkpoint (zero codes) of hidden 32 and the given
// intermediate size, for the shape limits: every tensor of the seven linears and config.json.
std::string WriteRawGptq(int64_t intermediate, int bits, int group, int act_bits,
                         const std::string& tag, int64_t bad_qzeros_rows = -1) {
  const std::string dir = testing::MakeTempDir(tag);
  nlohmann::ordered_json config = {{"architectures", {"LlamaForCausalLM"}},
                                   {"model_type", "llama"},
                                   {"hidden_size", 32},
                                   {"intermediate_size", intermediate},
                                   {"num_hidden_layers", 1},
                                   {"num_attention_heads", 1},
                                   {"num_key_value_heads", 1},
                                   {"vocab_size", 32},
                                   {"max_position_embeddings", 64},
                                   {"rms_norm_eps", 1e-5},
                                   {"tie_word_embeddings", true},
                                   {"quantization_config",
                                    {{"quant_method", "gptq"},
                                     {"bits", bits},
                                     {"group_size", group},
                                     {"checkpoint_format", "gptq"},
                                     {"qcal", {{"activation_bits", act_bits}}}}}};
  EXPECT_TRUE(WriteStringToFile(dir + "/config.json", config.dump()).ok());
  auto config_read = LoadModelConfig(dir);
  EXPECT_TRUE(config_read.ok()) << config_read.status();
  std::map<std::string, Tensor> tensors;
  for (LinearKind k : kAllLinears) {
    const auto [d_out, d_in] = LinearShape(*config_read, k);
    const int64_t g = group < 0 ? d_in : group;
    const int64_t n_groups = (d_in + g - 1) / g;
    const std::string p = LinearPrefix(0, k);
    tensors[p + ".qweight"] = Tensor::Zeros(DType::kI32, {(d_in + 31) / 32 * bits, d_out});
    const int64_t zero_rows =
        k == LinearKind::kDown && bad_qzeros_rows >= 0 ? bad_qzeros_rows : n_groups;
    tensors[p + ".qzeros"] = Tensor::Zeros(DType::kI32, {zero_rows, (d_out + 31) / 32 * bits});
    Tensor scales = Tensor::Zeros(DType::kF16, {n_groups, d_out});
    for (int64_t i = 0; i < scales.numel(); ++i) scales.data<uint16_t>()[i] = FloatToHalf(0.01f);
    tensors[p + ".scales"] = scales;
    Tensor g_idx = Tensor::Zeros(DType::kI32, {d_in});
    for (int64_t c = 0; c < d_in; ++c) g_idx.data<int32_t>()[c] = static_cast<int32_t>(c / g);
    tensors[p + ".g_idx"] = g_idx;
  }
  EXPECT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
  return dir;
}

TEST_F(AbqCheckpointTest, RefusesShapesTheKernelsCannotTake) {
  // Per-channel W8A8 keeps the int32 sums exact up to d_in 33,090: down_proj's 33,120 is past it.
  const std::string wide = Keep(WriteRawGptq(33120, 8, -1, 8, "abq-wide"));
  EXPECT_THAT(Refusal(wide, AbqKernel::kBinaryMma),
              HasSubstr("model.layers.0.mlp.down_proj: ABQ: a k-group of 33120 columns at W8A8 "
                        "can overflow the int32 sums"));
  EXPECT_EQ(Refusal(wide, AbqKernel::kBinaryMma, 4), "");  // A4 halves the bound's factor
  // 12,290 groups of 32 columns: more than the prologue keeps in shared memory.
  const std::string deep = Keep(WriteRawGptq(393280, 2, 32, 8, "abq-deep"));
  EXPECT_THAT(Refusal(deep, AbqKernel::kBinaryMma),
              HasSubstr("model.layers.0.mlp.down_proj: 12290 k-groups, the ABQ kernels take at "
                        "most 12288"));
  // A tensor whose shape does not follow from config.json and the group size.
  const std::string bad = Keep(WriteRawGptq(64, 4, 32, 8, "abq-bad", 1));
  EXPECT_THAT(Refusal(bad, AbqKernel::kBinaryMma),
              HasSubstr("tensor \"model.layers.0.mlp.down_proj.qzeros\" is I32[1, 4], expected "
                        "I32[2, 4]"));
  EXPECT_EQ(Refusal(Keep(WriteRawGptq(64, 4, 32, 8, "abq-good")), AbqKernel::kBinaryMma), "");
}

// stories260k: down_proj's d_in is 172 (the planes end in padding), group 32 leaves a last group
// of 12 columns.
TEST_F(AbqCheckpointTest, StoriesMatchesDequantization) {
  QCAL_REQUIRE_SHARED();
  const std::string shared = testing::SharedDir();
  const std::string dir =
      Keep(Export(shared + "/models/stories260k", RtnRecipe(4, 32, 8), "abq-stories"));
  ExpectParity(dir, shared + "/data/tinystories-eval.txt", 256, 4);
}

// The decode benchmark on a tiny shape: every configuration and kernel, the packed weights'
// sizes, and b1 and int8 generating the same tokens.
TEST_F(AbqCheckpointTest, DecodeBenchRunsEveryConfiguration) {
  auto config = LoadModelConfig(*llama_);
  ASSERT_TRUE(config.ok());
  DecodeBenchOptions o;
  o.config = *config;
  o.prompt = 3;
  o.tokens = 5;
  o.group_size = 32;
  auto r = RunDecodeBench(*backend_, o);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->dense_dtype, "f32");
  std::vector<std::string> rows;
  for (const DecodeBenchRow& row : r->rows) {
    rows.push_back(row.config + " " + row.kernel);
    EXPECT_GT(row.tokens_per_second, 0) << rows.back();
    EXPECT_EQ(row.generated.size(), 6u) << rows.back();
  }
  EXPECT_THAT(rows, ::testing::ElementsAre("bf16 dense", "W4A16 a16", "W4A8 b1", "W4A8 int8",
                                           "W2*A8 b1", "W2*A8 int8"));
  // Dense fp32 weights, then planes + s_w + z per linear: wb·ceil(d_in/32) words per row and
  // ceil(d_in/32) groups (every d_in of the tiny shape is a multiple of 32).
  int64_t params = 0, w4 = 0, w2 = 0;
  for (LinearKind k : kAllLinears) {
    const auto [d_out, d_in] = LinearShape(*config, k);
    params += d_out * d_in;
    w4 += d_out * (4 * d_in / 32) * 4 + 2 * (d_in / 32) * d_out * 4;
    w2 += d_out * (3 * d_in / 32) * 4 + 2 * (d_in / 32) * d_out * 4;
  }
  EXPECT_EQ(r->rows[0].weight_bytes, config->num_layers * params * 4);
  EXPECT_EQ(r->rows[1].weight_bytes, config->num_layers * w4);
  EXPECT_EQ(r->rows[4].weight_bytes, config->num_layers * w2);
  EXPECT_EQ(r->rows[2].generated, r->rows[3].generated);
  EXPECT_EQ(r->rows[4].generated, r->rows[5].generated);
}

}  // namespace
}  // namespace qcal::engine
