// The streaming, sharded export (DESIGN section 5, "Shards"): shard layout and index, tensor order,
// the block callback contract, equivalence of sharded and single-file checkpoints (tensors, loaded
// weights, perplexity), foreign sharded GPTQ checkpoints, copied files, ParseByteSize.
//
// Models: a synthetic tiny checkpoint (always), a hand-made 11-block checkpoint (block order is not
// name order past block 9) and, when ../shared is present, stories260k and sotu-llama-16m.
#include "services/engine/export/checkpoint_writer.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "common/dtype.h"
#include "common/files.h"
#include "common/safetensors.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/export/gptq_pack.h"
#include "services/engine/model.h"
#include "services/engine/quantize.h"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

Recipe MakeRecipe(int bits, int group, const std::string& grid = "uniform") {
  Recipe r;
  r.method = QuantMethod::kRtn;
  r.weights.bits = bits;
  r.weights.group_size = group;
  r.weights.grid = *ParseGrid(grid);
  return r;
}

int NumBlocks(const std::string& dir) {
  auto config = LoadModelConfig(dir);
  EXPECT_TRUE(config.ok()) << config.status();
  return config.ok() ? config->num_layers : 0;
}

// RTN quantization of every block linear of the checkpoint in `dir`.
std::map<std::string, QuantizedLinear> QuantizeAll(const std::string& dir, const Recipe& recipe) {
  auto reader = CheckpointReader::Open(dir);
  EXPECT_TRUE(reader.ok()) << reader.status();
  std::map<std::string, QuantizedLinear> out;
  if (!reader.ok()) return out;
  for (int b = 0; b < NumBlocks(dir); ++b) {
    for (LinearKind k : kAllLinears) {
      const std::string prefix = LinearPrefix(b, k);
      auto w = (*reader)->GetF32(prefix + ".weight");
      EXPECT_TRUE(w.ok()) << w.status();
      auto q = QuantizeRtn<float>(w->data<float>(), w->dim(0), w->dim(1), SpecOf(recipe));
      EXPECT_TRUE(q.ok()) << q.status();
      if (q.ok()) out[prefix] = *std::move(q);
    }
  }
  return out;
}

Tensor Filled(Shape shape, float scale, uint64_t seed) {
  Tensor t = Tensor::Zeros(DType::kF32, std::move(shape));
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    p[i] = scale * static_cast<float>(static_cast<int64_t>((i * 2654435761u + seed) % 61) - 30);
  }
  return t;
}

// Stand-ins for a job's extras: every block's post_attention_layernorm doubled (exact in every
// float dtype), q_proj adapters of rank 4 in every block and a down_proj adapter of rank 2 in
// block 1 (so adapter_config.json has a rank_pattern).
CheckpointExtras MakeExtras(const std::string& dir) {
  auto reader = CheckpointReader::Open(dir);
  EXPECT_TRUE(reader.ok()) << reader.status();
  CheckpointExtras e;
  if (!reader.ok()) return e;
  for (int b = 0; b < NumBlocks(dir); ++b) {
    const std::string norm = absl::StrCat("model.layers.", b, ".post_attention_layernorm.weight");
    auto t = (*reader)->GetF32(norm);
    EXPECT_TRUE(t.ok()) << t.status();
    for (int64_t i = 0; i < t->numel(); ++i) t->data<float>()[i] *= 2.0f;
    e.replaced[norm] = *t;
    std::vector<LinearKind> kinds = {LinearKind::kQ};
    if (b == 1) kinds.push_back(LinearKind::kDown);
    for (LinearKind k : kinds) {
      const std::string prefix = LinearPrefix(b, k);
      auto info = (*reader)->Info(prefix + ".weight");
      EXPECT_TRUE(info.ok());
      const int64_t r = k == LinearKind::kQ ? 4 : 2;
      e.adapters[prefix] = {Filled({info->shape[0], r}, 1e-3f, b),
                            Filled({r, info->shape[1]}, 2e-3f, b)};
    }
  }
  return e;
}

std::map<std::string, int64_t> RanksOf(const CheckpointExtras& e) {
  std::map<std::string, int64_t> ranks;
  for (const auto& [name, ad] : e.adapters) ranks[name] = ad.a.dim(1);
  return ranks;
}

std::string Export(const std::string& source, const Recipe& recipe,
                   const std::map<std::string, QuantizedLinear>& quantized,
                   const CheckpointExtras& extras, int64_t shard_size, const std::string& tag) {
  const std::string dir = testing::MakeTempDir(tag);
  ExportOptions options;
  options.shard_size = shard_size;
  const absl::Status st = WriteQuantizedCheckpoint(source, dir, recipe, quantized, extras, options);
  EXPECT_TRUE(st.ok()) << st;
  return dir;
}

absl::StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  return nlohmann::json::parse(text);
}

// The safetensors files of a checkpoint: model.safetensors, or the files its index lists.
std::vector<std::string> ShardFiles(const std::string& dir) {
  const std::string index = dir + "/model.safetensors.index.json";
  if (!fs::exists(index)) return {"model.safetensors"};
  auto j = ReadJson(index);
  EXPECT_TRUE(j.ok()) << j.status();
  std::set<std::string> files;
  for (const auto& [name, file] : (*j)["weight_map"].items()) files.insert(file.get<std::string>());
  return {files.begin(), files.end()};
}

// Every tensor of the safetensors `files` (in that order) in data order.
std::vector<std::string> DataOrder(const std::string& dir, const std::vector<std::string>& files) {
  std::vector<std::string> order;
  for (const std::string& f : files) {
    auto file = SafetensorsFile::Open(dir + "/" + f);
    EXPECT_TRUE(file.ok()) << file.status();
    if (!file.ok()) continue;
    std::map<uint64_t, std::string> by_offset;
    for (const auto& [name, info] : (*file)->tensors()) by_offset[info.begin] = name;
    for (const auto& [offset, name] : by_offset) order.push_back(name);
  }
  return order;
}

// The documented order of `names`: the embeddings, then each block's tensors sorted by name,
// blocks in order, then everything else sorted by name.
std::vector<std::string> DocumentedOrder(const std::set<std::string>& names, int num_blocks) {
  const std::regex block_re(R"(^(?:base_model\.model\.)?model\.layers\.(\d+)\..*)");
  std::vector<std::string> head, tail;
  std::vector<std::vector<std::string>> blocks(num_blocks);
  for (const std::string& name : names) {
    std::smatch m;
    if (name == "model.embed_tokens.weight") {
      head.push_back(name);
    } else if (std::regex_match(name, m, block_re) && std::stoi(m[1]) < num_blocks) {
      blocks[std::stoi(m[1])].push_back(name);
    } else {
      tail.push_back(name);
    }
  }
  for (auto& b : blocks) head.insert(head.end(), b.begin(), b.end());
  head.insert(head.end(), tail.begin(), tail.end());
  return head;
}

// Both checkpoints hold the same tensors with the same dtypes, shapes and bytes.
void ExpectSameTensors(const std::string& a_dir, const std::string& b_dir) {
  auto a = CheckpointReader::Open(a_dir);
  auto b = CheckpointReader::Open(b_dir);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ((*a)->Names(), (*b)->Names());
  for (const std::string& name : (*a)->Names()) {
    auto ta = (*a)->Get(name);
    auto tb = (*b)->Get(name);
    ASSERT_TRUE(ta.ok() && tb.ok()) << name;
    ASSERT_EQ(ta->dtype(), tb->dtype()) << name;
    ASSERT_EQ(ta->shape(), tb->shape()) << name;
    EXPECT_EQ(0, std::memcmp(ta->raw(), tb->raw(), ta->nbytes())) << name;
  }
}

std::unique_ptr<kernels::Backend> MakeBackend() {
  kernels::BackendOptions bo;
  bo.threads = 2;
  auto be = kernels::CreateBackend(bo);
  EXPECT_TRUE(be.ok()) << be.status();
  return be.ok() ? *std::move(be) : nullptr;
}

// Every block linear (weight, bias, low-rank factors) of `a` and `b` is bit-identical.
void ExpectSameLinears(Model& a, Model& b) {
  ASSERT_EQ(a.num_blocks(), b.num_blocks());
  auto same = [](const Tensor& x, const Tensor& y, const std::string& what) {
    ASSERT_EQ(x.defined(), y.defined()) << what;
    if (!x.defined()) return;
    ASSERT_EQ(x.shape(), y.shape()) << what;
    EXPECT_EQ(0, std::memcmp(x.raw(), y.raw(), x.nbytes())) << what;
  };
  for (int blk = 0; blk < a.num_blocks(); ++blk) {
    for (LinearKind k : kAllLinears) {
      const Linear& x = a.block(blk).at(k);
      const Linear& y = b.block(blk).at(k);
      same(x.weight, y.weight, LinearPrefix(blk, k) + " weight");
      same(x.bias, y.bias, LinearPrefix(blk, k) + " bias");
      same(x.lora_a, y.lora_a, LinearPrefix(blk, k) + " lora_a");
      same(x.lora_b, y.lora_b, LinearPrefix(blk, k) + " lora_b");
    }
  }
}

TokenWindows EvalWindows(const std::string& tokenizer_dir, const std::string& text_path,
                         int bos_id) {
  auto tok = Tokenizer::Load(tokenizer_dir);
  EXPECT_TRUE(tok.ok()) << tok.status();
  auto text = LoadCorpusText(text_path);
  EXPECT_TRUE(text.ok()) << text.status();
  auto tokens = (*tok)->Encode(*text);
  EXPECT_TRUE(tokens.ok());
  auto windows = MakeEvalWindows(*tokens, 128, 4, bos_id, text_path);
  EXPECT_TRUE(windows.ok()) << windows.status();
  return *windows;
}

// Loads both checkpoints and expects bit-identical linears and the same perplexity; returns it.
double ExpectSameModels(const std::string& a_dir, const std::string& b_dir,
                        const TokenWindows& windows) {
  auto backend = MakeBackend();
  auto a = LoadCheckpoint(a_dir, backend.get());
  auto b = LoadCheckpoint(b_dir, backend.get());
  EXPECT_TRUE(a.ok()) << a.status();
  EXPECT_TRUE(b.ok()) << b.status();
  if (!a.ok() || !b.ok()) return 0;
  ExpectSameLinears(**a, **b);
  auto pa = EvaluatePerplexity(**a, windows);
  auto pb = EvaluatePerplexity(**b, windows);
  EXPECT_TRUE(pa.ok() && pb.ok());
  EXPECT_EQ(pa->perplexity, pb->perplexity);
  EXPECT_TRUE(std::isfinite(pa->perplexity) && pa->perplexity > 1.0) << pa->perplexity;
  return pa->perplexity;
}

std::map<std::string, std::string> ReadDir(const std::string& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (!e.is_regular_file()) continue;
    auto bytes = ReadFileToString(e.path().string());
    files[fs::relative(e.path(), dir).string()] = bytes.ok() ? *bytes : "<unreadable>";
  }
  return files;
}

// ---------------------------------------------------------------------------------------------
// ParseByteSize and ExportOptions.

TEST(ParseByteSizeTest, AcceptsByteCountsAndUnits) {
  const std::vector<std::pair<std::string, int64_t>> cases = {
      {"1", 1},
      {"1048576", 1048576},
      {"4GiB", 4ll << 30},
      {"500MB", 500'000'000},
      {"500 mb", 500'000'000},
      {" 7 B ", 7},
      {"2kb", 2000},
      {"3KiB", 3072},
      {"1.5KiB", 1536},
      {"0.5GB", 500'000'000},
      {"1.0000000001KB", 1000},  // fractions of a byte round down
      {"2TiB", 2ll << 40},
      {"5TB", 5'000'000'000'000},
      {"9223372036854775807", 9223372036854775807ll},
  };
  for (const auto& [text, bytes] : cases) {
    auto got = ParseByteSize(text);
    ASSERT_TRUE(got.ok()) << text << ": " << got.status();
    EXPECT_EQ(*got, bytes) << text;
  }
}

TEST(ParseByteSizeTest, RejectsMalformedSizesNamingThem) {
  for (const std::string text :
       {"", "GiB", "4XB", "-1", "0", "0B", "0.1B", "1.5", "1.", ".5GB", "1e9", "4 GiB extra", "4G",
        "9223372036854775808", "8388608TiB", "12345678901234567890"}) {
    auto got = ParseByteSize(text);
    ASSERT_FALSE(got.ok()) << "\"" << text << "\" gave " << *got;
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument) << text;
    EXPECT_THAT(std::string(got.status().message()), HasSubstr("\"" + text + "\"")) << text;
  }
}

// The balanced grid is exported as GPTQ v1 with 3-bit codes and says so in qcal.grid; the
// recipe's own bits (2) stay in the recipe and its hash.
TEST(QuantizationConfigTest, BalancedGridIsThreeBitGptqWithItsGrid) {
  const Recipe balanced = MakeRecipe(2, 32, "balanced");
  EXPECT_TRUE(IsGptqExportable(balanced));
  const nlohmann::ordered_json q = QuantizationConfig(balanced);
  EXPECT_EQ(q["quant_method"], "gptq");
  EXPECT_EQ(q["checkpoint_format"], "gptq");
  EXPECT_EQ(q["bits"], 3);
  EXPECT_EQ(q["qcal"]["grid"], "balanced");
  EXPECT_EQ(q["qcal"]["recipe_sha256"], balanced.Sha256());
  const nlohmann::ordered_json u = QuantizationConfig(MakeRecipe(2, 32));
  EXPECT_EQ(u["bits"], 2);
  EXPECT_EQ(u["qcal"]["grid"], "uniform");
}

// The loader reads qcal.grid and refuses grids a GPTQ v1 checkpoint cannot hold.
TEST(ReadCheckpointQuantizationTest, ReadsAndChecksTheGrid) {
  const std::string dir = testing::MakeTempDir("qgrid");
  auto read = [&](const std::string& qc) {
    EXPECT_TRUE(
        WriteStringToFile(dir + "/config.json", "{\"quantization_config\": " + qc + "}").ok());
    return ReadCheckpointQuantization(dir);
  };
  auto q = read(R"({"quant_method": "gptq", "bits": 3, "qcal": {"grid": "balanced"}})");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->grid, "balanced");
  EXPECT_EQ(q->bits, 3);
  q = read(R"({"quant_method": "gptq", "bits": 4})");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_EQ(q->grid, "uniform");
  q = read(R"({"quant_method": "gptq", "bits": 2, "qcal": {"grid": "balanced"}})");
  ASSERT_FALSE(q.ok());
  EXPECT_THAT(std::string(q.status().message()), HasSubstr("bits 3"));
  q = read(R"({"quant_method": "gptq", "bits": 4, "qcal": {"grid": "cuberoot"}})");
  ASSERT_FALSE(q.ok());
  EXPECT_THAT(std::string(q.status().message()), HasSubstr("cuberoot"));
  q = read(R"({"quant_method": "gptq", "bits": 4, "qcal": {"grid": "nf4"}})");
  ASSERT_FALSE(q.ok());
  EXPECT_THAT(std::string(q.status().message()), HasSubstr("qcal.grid"));
  fs::remove_all(dir);
}

TEST(ExportOptionsTest, ShardSizeMustBePositive) {
  ExportOptions o;
  EXPECT_EQ(o.shard_size, 4ll << 30);
  EXPECT_TRUE(o.Validate().ok());
  for (int64_t bad : {0ll, -1ll}) {
    o.shard_size = bad;
    const absl::Status st = o.Validate();
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(st.message()), HasSubstr("shard_size"));
  }
}

// ---------------------------------------------------------------------------------------------
// The synthetic tiny model (2 blocks, untied lm_head, fp32).

class SynthExportTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = new std::string(testing::MakeTempDir("export_synth"));
    SynthOptions o;
    o.out_dir = *root_ + "/model";
    auto r = WriteSyntheticCheckpoint(o);
    ASSERT_TRUE(r.ok()) << r.status();
  }
  static void TearDownTestSuite() {
    fs::remove_all(*root_);
    delete root_;
  }
  static std::string Source() { return *root_ + "/model"; }
  static TokenWindows Windows() { return EvalWindows(Source(), Source() + "/eval.txt", 1); }

  static std::string* root_;
};
std::string* SynthExportTest::root_ = nullptr;

TEST_F(SynthExportTest, SmallShardSizeWritesNumberedShardsAndAnIndex) {
  const Recipe recipe = MakeRecipe(4, 32);
  const auto quantized = QuantizeAll(Source(), recipe);
  const CheckpointExtras extras = MakeExtras(Source());
  const int64_t shard_size = 128 << 10;
  const std::string dir = Export(Source(), recipe, quantized, extras, shard_size, "sharded");

  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"));
  auto index = ReadJson(dir + "/model.safetensors.index.json");
  ASSERT_TRUE(index.ok()) << index.status();
  const std::vector<std::string> files = ShardFiles(dir);
  const int n = static_cast<int>(files.size());
  ASSERT_GE(n, 4);
  // The shards are exactly model-{i:05d}-of-{N:05d}.safetensors, i = 1..N.
  std::set<std::string> on_disk;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f.size() > 12 && f.substr(f.size() - 12) == ".safetensors") on_disk.insert(f);
  }
  std::set<std::string> expected_files;
  for (int i = 1; i <= n; ++i) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "model-%05d-of-%05d.safetensors", i, n);
    expected_files.insert(buf);
  }
  EXPECT_EQ(on_disk, expected_files);

  // weight_map names every tensor with the file holding it; total_size is their byte count; no
  // shard passes shard_size unless it holds a single tensor, and each shard stops only when the
  // next tensor would take it past shard_size.
  std::map<std::string, std::string> holder;
  std::vector<int64_t> shard_bytes;
  std::vector<int64_t> first_bytes;
  int64_t total = 0;
  for (const std::string& f : files) {
    auto file = SafetensorsFile::Open(dir + "/" + f);
    ASSERT_TRUE(file.ok()) << file.status();
    EXPECT_EQ((*file)->metadata(), (std::map<std::string, std::string>{{"format", "pt"}}));
    int64_t bytes = 0, first = -1;
    for (const auto& [name, info] : (*file)->tensors()) {
      EXPECT_TRUE(holder.emplace(name, f).second) << name << " is in two shards";
      bytes += static_cast<int64_t>(info.end - info.begin);
      if (info.begin == 0) first = static_cast<int64_t>(info.end);
    }
    if ((*file)->tensors().size() > 1) {
      EXPECT_LE(bytes, shard_size) << f;
    }
    shard_bytes.push_back(bytes);
    first_bytes.push_back(first);
    total += bytes;
  }
  for (int s = 0; s + 1 < n; ++s) EXPECT_GT(shard_bytes[s] + first_bytes[s + 1], shard_size) << s;
  std::map<std::string, std::string> weight_map;
  for (const auto& [name, file] : (*index)["weight_map"].items()) {
    weight_map[name] = file.get<std::string>();
  }
  EXPECT_EQ(weight_map, holder);
  EXPECT_EQ((*index)["metadata"]["total_size"].get<int64_t>(), total);
  EXPECT_EQ(weight_map.size(), 3u + 2u * (7u * 4u + 2u));  // embed, norm, lm_head; blocks

  // The data follows the documented order across the shards.
  std::set<std::string> names;
  for (const auto& [name, file] : holder) names.insert(name);
  const std::vector<std::string> order = DataOrder(dir, files);
  EXPECT_EQ(order, DocumentedOrder(names, 2));
  EXPECT_EQ(order.front(), "model.embed_tokens.weight");
  EXPECT_EQ(order.back(), "model.norm.weight");

  // The adapter stays one file (PEFT reads one), whatever the shard size.
  EXPECT_TRUE(fs::exists(dir + "/adapter/adapter_model.safetensors"));
  EXPECT_FALSE(fs::exists(dir + "/adapter/adapter_model.safetensors.index.json"));
  EXPECT_EQ(ReadDir(dir + "/adapter").size(), 2u);

  // Deterministic: a second export gives the same bytes in every file.
  const std::string again = Export(Source(), recipe, quantized, extras, shard_size, "again");
  const auto fa = ReadDir(dir);
  auto fb = ReadDir(again);
  ASSERT_EQ(fa.size(), fb.size());
  for (const auto& [name, bytes] : fa) EXPECT_TRUE(fb[name] == bytes) << name << " differs";
  fs::remove_all(dir);
  fs::remove_all(again);
}

class SynthFormatTest : public SynthExportTest, public ::testing::WithParamInterface<Recipe> {};

TEST_P(SynthFormatTest, ShardedAndSingleFileExportsLoadIdentically) {
  const Recipe recipe = GetParam();
  const auto quantized = QuantizeAll(Source(), recipe);
  const CheckpointExtras extras = MakeExtras(Source());
  const std::string single = Export(Source(), recipe, quantized, extras, 4ll << 30, "single");
  const std::string sharded = Export(Source(), recipe, quantized, extras, 100 << 10, "sharded");
  ASSERT_TRUE(fs::exists(single + "/model.safetensors"));
  ASSERT_GE(ShardFiles(sharded).size(), 3u);
  ExpectSameTensors(single, sharded);
  EXPECT_EQ(ReadDir(single + "/adapter"), ReadDir(sharded + "/adapter"));
  for (const char* f : {"config.json", "quantize_config.json"}) {
    EXPECT_EQ(*ReadFileToString(single + "/" + f), *ReadFileToString(sharded + "/" + f)) << f;
  }
  ExpectSameModels(single, sharded, Windows());
  fs::remove_all(single);
  fs::remove_all(sharded);
}

INSTANTIATE_TEST_SUITE_P(Formats, SynthFormatTest,
                         ::testing::Values(MakeRecipe(4, 32), MakeRecipe(3, -1), MakeRecipe(5, 32),
                                           MakeRecipe(3, 32, "cuberoot"),
                                           MakeRecipe(2, 32, "balanced")));

// The single-file export holds exactly the tensors of the map-based layout that preceded the
// streaming writer (every source tensor, GPTQ tensors for the quantized linears, replaced tensors
// in their source dtype), with the same header. Only the data order differs: the stream writes
// block by block, the map wrote sorted by name (lm_head before the embeddings).
TEST_F(SynthExportTest, SingleFileHoldsTheMapLayoutsTensors) {
  const Recipe recipe = MakeRecipe(4, 32);
  const auto quantized = QuantizeAll(Source(), recipe);
  const CheckpointExtras extras = MakeExtras(Source());
  const std::string dir = Export(Source(), recipe, quantized, extras, 4ll << 30, "maplayout");

  auto reader = CheckpointReader::Open(Source());
  ASSERT_TRUE(reader.ok());
  std::map<std::string, Tensor> expected;
  for (const std::string& name : (*reader)->Names()) {
    const std::string prefix = name.substr(0, name.rfind('.'));
    auto q = quantized.find(prefix);
    if (q != quantized.end()) {
      auto qweight = PackQweight(q->second.codes, q->second.d_out, q->second.d_in, 4);
      auto qzeros = PackQzeros(q->second.zeros, q->second.n_groups, q->second.d_out, 4);
      ASSERT_TRUE(qweight.ok() && qzeros.ok());
      auto ints = [](const std::vector<int32_t>& v, Shape shape) {
        Tensor t = Tensor::Zeros(DType::kI32, std::move(shape));
        std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
        return t;
      };
      const int64_t d_out = q->second.d_out, d_in = q->second.d_in, g = q->second.n_groups;
      expected[prefix + ".qweight"] = ints(*qweight, {d_in / 32 * 4, d_out});
      expected[prefix + ".qzeros"] = ints(*qzeros, {g, d_out / 32 * 4});
      expected[prefix + ".g_idx"] = ints(q->second.g_idx, {d_in});
      Tensor scales = Tensor::Zeros(DType::kF16, {g, d_out});
      for (int64_t i = 0; i < g * d_out; ++i) {
        scales.data<uint16_t>()[i] = FloatToHalf(q->second.scales[i]);
      }
      expected[prefix + ".scales"] = scales;
    } else if (extras.replaced.count(name)) {
      expected[name] = extras.replaced.at(name);  // the source is fp32
    } else {
      expected[name] = *(*reader)->Get(name);
    }
  }
  auto bytes = SerializeSafetensors(expected, {{"format", "pt"}});
  ASSERT_TRUE(bytes.ok());
  auto want = SafetensorsFile::FromBytes(*bytes, "expected");
  auto got = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(want.ok() && got.ok());
  EXPECT_EQ(fs::file_size(dir + "/model.safetensors"), bytes->size());
  EXPECT_EQ((*got)->metadata(), (*want)->metadata());
  ASSERT_EQ((*got)->tensors().size(), (*want)->tensors().size());
  for (const auto& [name, info] : (*want)->tensors()) {
    auto a = (*want)->Get(name);
    auto b = (*got)->Get(name);
    ASSERT_TRUE(a.ok() && b.ok()) << name;
    ASSERT_EQ(a->dtype(), b->dtype()) << name;
    ASSERT_EQ(a->shape(), b->shape()) << name;
    EXPECT_EQ(0, std::memcmp(a->raw(), b->raw(), a->nbytes())) << name;
  }
  // With fewer than ten blocks the adapter's block order is its name order: byte-identical to
  // the map-based WriteLoraAdapter.
  const std::string lora = testing::MakeTempDir("lora");
  ASSERT_TRUE(WriteLoraAdapter(lora, extras.adapters).ok());
  EXPECT_EQ(ReadDir(lora), ReadDir(dir + "/adapter"));
  fs::remove_all(dir);
  fs::remove_all(lora);
}

TEST_F(SynthExportTest, CopiesTokenizerAndGenerationFiles) {
  const std::string source = testing::MakeTempDir("source");
  fs::copy(Source(), source, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  const std::map<std::string, std::string> extra = {
      {"tokenizer.json", R"({"version": "1.0"})"},
      {"tokenizer_config.json", R"({"add_bos_token": true})"},
      {"special_tokens_map.json", R"({"bos_token": "<s>"})"}};
  for (const auto& [f, text] : extra) ASSERT_TRUE(WriteStringToFile(source + "/" + f, text).ok());
  const Recipe recipe = MakeRecipe(4, 32);
  const std::string dir =
      Export(source, recipe, QuantizeAll(source, recipe), {}, 4ll << 30, "copy");
  for (const char* f : {"tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                        "special_tokens_map.json", "generation_config.json"}) {
    auto want = ReadFileToString(source + "/" + f);
    auto got = ReadFileToString(dir + "/" + f);
    ASSERT_TRUE(want.ok() && got.ok()) << f;
    EXPECT_EQ(*got, *want) << f;
  }
  EXPECT_FALSE(fs::exists(dir + "/calib.txt"));
  EXPECT_FALSE(fs::exists(dir + "/adapter"));
  fs::remove_all(source);
  fs::remove_all(dir);
}

// The block callback is called once per block, in order; what it returned for block b is
// released before block b + 1 is asked for (the writer holds one block at a time).
TEST_F(SynthExportTest, AsksForEachBlockOnceInOrderAndReleasesIt) {
  const Recipe recipe = MakeRecipe(4, 32);
  const auto quantized = QuantizeAll(Source(), recipe);
  const CheckpointExtras extras = MakeExtras(Source());
  std::vector<int> calls;
  std::vector<std::weak_ptr<Storage>> handed_out;
  const BlockExportFn block = [&](int b) -> absl::StatusOr<BlockExport> {
    calls.push_back(b);
    for (size_t i = 0; i < handed_out.size(); ++i) {
      EXPECT_TRUE(handed_out[i].expired()) << "block " << i << " still held when asking for " << b;
    }
    BlockExport e;
    const std::string prefix = absl::StrCat("model.layers.", b, ".");
    for (const auto& [name, q] : quantized) {
      if (name.rfind(prefix, 0) == 0) e.quantized[name] = q;
    }
    for (const auto& [name, ad] : extras.adapters) {
      if (name.rfind(prefix, 0) == 0) e.extras.adapters[name] = {ad.a.Clone(), ad.b.Clone()};
    }
    const std::string norm = prefix + "post_attention_layernorm.weight";
    const Tensor& t = extras.replaced.at(norm);
    auto storage = AllocateHost(t.nbytes());
    std::memcpy(storage->data(), t.raw(), t.nbytes());
    e.extras.replaced[norm] = Tensor(storage, 0, DType::kF32, t.shape());
    handed_out.push_back(storage);
    return e;
  };
  const std::string dir = testing::MakeTempDir("calls");
  ExportOptions options;
  options.shard_size = 100 << 10;
  const absl::Status st =
      WriteQuantizedCheckpoint(Source(), dir, recipe, 2, block, RanksOf(extras), options);
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_THAT(calls, ElementsAre(0, 1));
  ASSERT_EQ(handed_out.size(), 2u);
  EXPECT_TRUE(handed_out[1].expired());
  // The callback's tensors are what was written.
  const std::string reference = Export(Source(), recipe, quantized, extras, 100 << 10, "ref");
  ExpectSameTensors(reference, dir);
  EXPECT_EQ(ReadDir(reference + "/adapter"), ReadDir(dir + "/adapter"));
  fs::remove_all(dir);
  fs::remove_all(reference);
}

TEST_F(SynthExportTest, CallbackErrorAbortsWithThatError) {
  const Recipe recipe = MakeRecipe(4, 32);
  const auto quantized = QuantizeAll(Source(), recipe);
  std::vector<int> calls;
  const BlockExportFn block = [&](int b) -> absl::StatusOr<BlockExport> {
    calls.push_back(b);
    if (b == 1) return absl::DataLossError("block 1: activation checkpoint is truncated");
    BlockExport e;
    for (LinearKind k : kAllLinears)
      e.quantized[LinearPrefix(b, k)] = quantized.at(LinearPrefix(b, k));
    return e;
  };
  const std::string dir = testing::MakeTempDir("abort");
  const absl::Status st = WriteQuantizedCheckpoint(Source(), dir, recipe, 2, block, {}, {});
  EXPECT_EQ(st, absl::DataLossError("block 1: activation checkpoint is truncated"));
  EXPECT_THAT(calls, ElementsAre(0, 1));
  EXPECT_FALSE(fs::exists(dir + "/config.json"));
  fs::remove_all(dir);
}

TEST_F(SynthExportTest, RejectsInputsThatDoNotMatchThePlan) {
  const Recipe recipe = MakeRecipe(4, 32);
  const auto quantized = QuantizeAll(Source(), recipe);
  const CheckpointExtras extras = MakeExtras(Source());
  const std::map<std::string, int64_t> ranks = RanksOf(extras);
  // Block b's part of the maps, then `edit` applied to it.
  auto run = [&](const std::function<void(int, BlockExport&)>& edit, int num_blocks = 2,
                 const std::map<std::string, int64_t>* adapter_ranks = nullptr,
                 int64_t shard_size = 4ll << 30) {
    const BlockExportFn block = [&](int b) -> absl::StatusOr<BlockExport> {
      BlockExport e;
      const std::string prefix = absl::StrCat("model.layers.", b, ".");
      for (const auto& [name, q] : quantized) {
        if (name.rfind(prefix, 0) == 0) e.quantized[name] = q;
      }
      for (const auto& [name, t] : extras.replaced) {
        if (name.rfind(prefix, 0) == 0) e.extras.replaced[name] = t;
      }
      for (const auto& [name, ad] : extras.adapters) {
        if (name.rfind(prefix, 0) == 0) e.extras.adapters[name] = ad;
      }
      edit(b, e);
      return e;
    };
    const std::string dir = testing::MakeTempDir("reject");
    ExportOptions options;
    options.shard_size = shard_size;
    const absl::Status st = WriteQuantizedCheckpoint(
        Source(), dir, recipe, num_blocks, block, adapter_ranks ? *adapter_ranks : ranks, options);
    fs::remove_all(dir);
    return st;
  };
  auto expect_error = [](const absl::Status& st, const std::string& text) {
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_THAT(std::string(st.message()), HasSubstr(text));
  };
  const auto nothing = [](int, BlockExport&) {};
  ASSERT_TRUE(run(nothing).ok());
  expect_error(run(nothing, 3), "config.json");
  expect_error(run(nothing, 2, nullptr, 0), "shard_size");
  expect_error(run([](int b, BlockExport& e) {
                 if (b == 1) e.quantized.erase("model.layers.1.mlp.up_proj");
               }),
               "model.layers.1.mlp.up_proj");
  expect_error(run([&](int b, BlockExport& e) {
                 if (b == 0)
                   e.quantized["model.layers.1.mlp.up_proj"] = e.quantized.begin()->second;
               }),
               "model.layers.1.mlp.up_proj");
  expect_error(run([](int b, BlockExport& e) {
                 if (b == 0)
                   std::swap(e.quantized.at(LinearPrefix(0, LinearKind::kQ)),
                             e.quantized.at(LinearPrefix(0, LinearKind::kDown)));
               }),
               LinearPrefix(0, LinearKind::kDown));
  expect_error(run([](int b, BlockExport& e) {
                 if (b == 0) e.quantized.at(LinearPrefix(0, LinearKind::kK)).scales.pop_back();
               }),
               LinearPrefix(0, LinearKind::kK));
  expect_error(run([&](int b, BlockExport& e) {
                 if (b == 0) {
                   e.extras.replaced["model.layers.1.input_layernorm.weight"] =
                       extras.replaced.begin()->second;
                 }
               }),
               "model.layers.1.input_layernorm.weight");
  expect_error(run([](int b, BlockExport& e) {
                 if (b == 1) e.extras.adapters.erase(LinearPrefix(1, LinearKind::kDown));
               }),
               LinearPrefix(1, LinearKind::kDown));
  expect_error(run([&](int b, BlockExport& e) {
                 if (b == 0)
                   e.extras.adapters[LinearPrefix(0, LinearKind::kV)] =
                       extras.adapters.at(LinearPrefix(0, LinearKind::kQ));
               }),
               LinearPrefix(0, LinearKind::kV));
  const std::map<std::string, int64_t> foreign = {{"model.norm", 4}};
  expect_error(run(nothing, 2, &foreign), "model.norm");
  // The map-taking overload refuses replaced tensors outside the blocks, which the stream cannot
  // place.
  CheckpointExtras outside;
  outside.replaced["model.norm.weight"] = extras.replaced.begin()->second;
  const std::string dir = testing::MakeTempDir("outside");
  expect_error(WriteQuantizedCheckpoint(Source(), dir, recipe, quantized, outside),
               "model.norm.weight");
  fs::remove_all(dir);
}

// A GPTQ checkpoint sharded by another tool (its own file names, tensors spread over the shards
// in another order, quantize_config.json instead of quantization_config) loads and evaluates
// exactly like our single-file export of the same tensors.
TEST_F(SynthExportTest, LoadsForeignShardedGptqCheckpoint) {
  const Recipe recipe = MakeRecipe(4, 32);
  const std::string ours =
      Export(Source(), recipe, QuantizeAll(Source(), recipe), {}, 4ll << 30, "ours");
  const std::string foreign = testing::MakeTempDir("foreign");
  auto file = SafetensorsFile::Open(ours + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  std::vector<std::map<std::string, Tensor>> shards(3);
  nlohmann::json weight_map = nlohmann::json::object();
  int64_t total = 0;
  int i = 0;
  for (const auto& [name, info] : (*file)->tensors()) {
    const int s = (i++ * 7) % 3;
    shards[s][name] = *(*file)->Get(name);
    weight_map[name] = absl::StrCat("gptq_model-4bit-32g-part", s, ".safetensors");
    total += static_cast<int64_t>(info.end - info.begin);
  }
  for (int s = 0; s < 3; ++s) {
    ASSERT_TRUE(
        WriteSafetensors(absl::StrCat(foreign, "/gptq_model-4bit-32g-part", s, ".safetensors"),
                         shards[s])
            .ok());
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  ASSERT_TRUE(WriteStringToFile(foreign + "/model.safetensors.index.json", index.dump()).ok());
  auto config = ReadJson(ours + "/config.json");
  ASSERT_TRUE(config.ok());
  config->erase("quantization_config");
  ASSERT_TRUE(WriteStringToFile(foreign + "/config.json", config->dump(2)).ok());
  const nlohmann::json qc = {{"bits", 4}, {"group_size", 32}, {"desc_act", false}, {"sym", false}};
  ASSERT_TRUE(WriteStringToFile(foreign + "/quantize_config.json", qc.dump()).ok());
  ASSERT_EQ(ShardFiles(foreign).size(), 3u);

  ExpectSameTensors(ours, foreign);
  ExpectSameModels(ours, foreign, Windows());
  fs::remove_all(ours);
  fs::remove_all(foreign);
}

// ---------------------------------------------------------------------------------------------
// An 11-block checkpoint written by hand: block order differs from name order ("layers.10" sorts
// before "layers.2"); bf16 norms, a q_proj bias in block 3 and a tensor outside the blocks.

class ElevenBlockExportTest : public ::testing::Test {
 protected:
  static constexpr int kBlocks = 11;

  void SetUp() override {
    source_ = testing::MakeTempDir("eleven");
    nlohmann::json config = {{"architectures", {"LlamaForCausalLM"}},
                             {"model_type", "llama"},
                             {"hidden_size", 32},
                             {"intermediate_size", 64},
                             {"num_hidden_layers", kBlocks},
                             {"num_attention_heads", 1},
                             {"num_key_value_heads", 1},
                             {"head_dim", 32},
                             {"vocab_size", 64},
                             {"max_position_embeddings", 128},
                             {"rms_norm_eps", 1e-5},
                             {"tie_word_embeddings", false},
                             {"torch_dtype", "float32"}};
    ASSERT_TRUE(WriteStringToFile(source_ + "/config.json", config.dump(2)).ok());
    std::map<std::string, Tensor> t;
    t["model.embed_tokens.weight"] = Filled({64, 32}, 0.01f, 1);
    t["lm_head.weight"] = Filled({64, 32}, 0.01f, 2);
    t["model.norm.weight"] = Filled({32}, 0.05f, 3);
    t["model.rotary_emb.inv_freq"] = Filled({16}, 0.1f, 4);
    for (int b = 0; b < kBlocks; ++b) {
      for (LinearKind k : kAllLinears) {
        const bool down = k == LinearKind::kDown;
        const bool up = k == LinearKind::kGate || k == LinearKind::kUp;
        t[LinearPrefix(b, k) + ".weight"] = Filled({up ? 64 : 32, down ? 64 : 32}, 0.02f, b);
      }
      for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) {
        auto bf16 = Filled({32}, 0.25f, b).ConvertTo(DType::kBF16);
        ASSERT_TRUE(bf16.ok());
        t[absl::StrCat("model.layers.", b, ".", norm, ".weight")] = *bf16;
      }
    }
    t["model.layers.3.self_attn.q_proj.bias"] = Filled({32}, 0.01f, 5);
    ASSERT_TRUE(WriteSafetensors(source_ + "/model.safetensors", t).ok());
  }
  void TearDown() override { fs::remove_all(source_); }

  std::string source_;
};

TEST_F(ElevenBlockExportTest, DataFollowsBlockOrderAcrossShards) {
  const Recipe recipe = MakeRecipe(4, 32);
  const auto quantized = QuantizeAll(source_, recipe);
  CheckpointExtras extras;
  // Folded norms are written in the source dtype (bf16): 2x is exact.
  auto reader = CheckpointReader::Open(source_);
  ASSERT_TRUE(reader.ok());
  auto norm = (*reader)->GetF32("model.layers.10.input_layernorm.weight");
  ASSERT_TRUE(norm.ok());
  for (int64_t i = 0; i < norm->numel(); ++i) norm->data<float>()[i] *= 2;
  extras.replaced["model.layers.10.input_layernorm.weight"] = *norm;
  for (int b : {2, 10}) {
    extras.adapters[LinearPrefix(b, LinearKind::kO)] = {Filled({32, 3}, 1e-3f, b),
                                                        Filled({3, 32}, 1e-3f, b)};
  }
  std::vector<int> calls;
  const BlockExportFn block = [&](int b) -> absl::StatusOr<BlockExport> {
    calls.push_back(b);
    BlockExport e;
    const std::string prefix = absl::StrCat("model.layers.", b, ".");
    for (const auto& [name, q] : quantized) {
      if (name.rfind(prefix, 0) == 0) e.quantized[name] = q;
    }
    for (const auto& [name, t] : extras.replaced) {
      if (name.rfind(prefix, 0) == 0) e.extras.replaced[name] = t;
    }
    for (const auto& [name, ad] : extras.adapters) {
      if (name.rfind(prefix, 0) == 0) e.extras.adapters[name] = ad;
    }
    return e;
  };
  for (int64_t shard_size : {int64_t{4} << 30, int64_t{8} << 10}) {
    SCOPED_TRACE(shard_size);
    calls.clear();
    const std::string dir = testing::MakeTempDir("eleven_out");
    ExportOptions options;
    options.shard_size = shard_size;
    const absl::Status st =
        WriteQuantizedCheckpoint(source_, dir, recipe, kBlocks, block, RanksOf(extras), options);
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_THAT(calls, ElementsAre(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10));
    const std::vector<std::string> files = ShardFiles(dir);
    EXPECT_EQ(files.size() > 1, shard_size < (1 << 20));
    const std::vector<std::string> order = DataOrder(dir, files);
    const std::set<std::string> names(order.begin(), order.end());
    EXPECT_EQ(order, DocumentedOrder(names, kBlocks));
    EXPECT_EQ(names.size(), 4u + kBlocks * (7 * 4 + 2) + 1);
    const std::vector<std::string> adapter_order =
        DataOrder(dir + "/adapter", {"adapter_model.safetensors"});
    EXPECT_THAT(adapter_order,
                ElementsAre("base_model.model.model.layers.2.self_attn.o_proj.lora_A.weight",
                            "base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight",
                            "base_model.model.model.layers.10.self_attn.o_proj.lora_A.weight",
                            "base_model.model.model.layers.10.self_attn.o_proj.lora_B.weight"));
    // Unquantized tensors keep dtype and bytes; the replaced norm is bf16 with the new values.
    auto out = CheckpointReader::Open(dir);
    ASSERT_TRUE(out.ok()) << out.status();
    for (const char* name :
         {"model.layers.3.self_attn.q_proj.bias", "model.layers.4.input_layernorm.weight",
          "model.rotary_emb.inv_freq", "lm_head.weight"}) {
      auto a = (*reader)->Get(name);
      auto b = (*out)->Get(name);
      ASSERT_TRUE(a.ok() && b.ok()) << name;
      ASSERT_EQ(a->dtype(), b->dtype()) << name;
      EXPECT_EQ(0, std::memcmp(a->raw(), b->raw(), a->nbytes())) << name;
    }
    auto replaced = (*out)->Get("model.layers.10.input_layernorm.weight");
    ASSERT_TRUE(replaced.ok());
    EXPECT_EQ(replaced->dtype(), DType::kBF16);
    auto back = replaced->ToF32();
    ASSERT_TRUE(back.ok());
    EXPECT_EQ(0, std::memcmp(back->raw(), norm->raw(), norm->nbytes()));
    fs::remove_all(dir);
  }
}

// ---------------------------------------------------------------------------------------------
// Real models from ../shared (skipped without it).

struct SharedCase {
  std::string model;
  std::string eval_text;
};

class SharedModelExportTest : public ::testing::TestWithParam<SharedCase> {
 protected:
  void SetUp() override {
    QCAL_REQUIRE_SHARED();
    if (!fs::exists(ModelDir())) GTEST_SKIP() << ModelDir() << " is absent";
  }
  std::string ModelDir() const { return testing::SharedDir() + "/models/" + GetParam().model; }
};

TEST_P(SharedModelExportTest, ShardedAndSingleFileExportsMatch) {
  const Recipe recipe = MakeRecipe(4, 32);
  const auto quantized = QuantizeAll(ModelDir(), recipe);
  const CheckpointExtras extras = MakeExtras(ModelDir());
  const std::string single = Export(ModelDir(), recipe, quantized, extras, 4ll << 30, "single");
  const int64_t total = static_cast<int64_t>(fs::file_size(single + "/model.safetensors"));
  const std::string sharded = Export(ModelDir(), recipe, quantized, extras, total / 8, "sharded");
  EXPECT_GE(ShardFiles(sharded).size(), 4u);
  ExpectSameTensors(single, sharded);
  auto config = LoadModelConfig(ModelDir());
  ASSERT_TRUE(config.ok());
  const double ppl = ExpectSameModels(
      single, sharded,
      EvalWindows(ModelDir(), testing::SharedDir() + "/data/" + GetParam().eval_text,
                  config->bos_token_id));
  RecordProperty("perplexity", std::to_string(ppl));
  fs::remove_all(single);
  fs::remove_all(sharded);
}

INSTANTIATE_TEST_SUITE_P(Models, SharedModelExportTest,
                         ::testing::Values(SharedCase{"stories260k", "tinystories-eval.txt"},
                                           SharedCase{"sotu-llama-16m", "sotu-eval.txt"}),
                         [](const ::testing::TestParamInfo<SharedCase>& info) {
                           std::string name = info.param.model;
                           for (char& c : name) {
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           }
                           return name;
                         });

// stories260k has no lm_head and fewer than ten blocks, so the documented order is its name
// order: the streamed single file is byte-identical to the map-based layout (sorted data).
TEST(StoriesExportTest, SingleFileIsByteIdenticalToTheMapLayout) {
  QCAL_REQUIRE_SHARED();
  const std::string source = testing::SharedDir() + "/models/stories260k";
  if (!fs::exists(source)) GTEST_SKIP() << source << " is absent";
  const Recipe recipe = MakeRecipe(3, 32);
  const auto quantized = QuantizeAll(source, recipe);
  const std::string dir = Export(source, recipe, quantized, {}, 4ll << 30, "stories");
  const std::vector<std::string> order = DataOrder(dir, {"model.safetensors"});
  ASSERT_TRUE(std::is_sorted(order.begin(), order.end()));
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok());
  std::map<std::string, Tensor> tensors;
  for (const auto& [name, info] : (*file)->tensors()) tensors[name] = *(*file)->Get(name);
  auto want = SerializeSafetensors(tensors, {{"format", "pt"}});
  ASSERT_TRUE(want.ok());
  EXPECT_TRUE(*ReadFileToString(dir + "/model.safetensors") == *want);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace qcal::engine
