// The recipe's activations, smoothing, error_reconstruction and retrain sections (DESIGN section
// 6): YAML parsing of every key, every range and cross-section rule with an error naming the key,
// and the canonical JSON / Sha256 that identifies a recipe.
#include "services/engine/recipe.h"

#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace qcal::engine {
namespace {

using ::testing::HasSubstr;

// A valid recipe without the new sections; tests append them.
constexpr char kBase[] = "method: gptq\nweights: {bits: 4}\n";

absl::StatusOr<Recipe> Parse(const std::string& sections) {
  return ParseRecipeYaml(kBase + sections, "r.yaml");
}

// The error of a recipe that must be refused: INVALID_ARGUMENT naming the file and the key.
std::string Error(const std::string& sections, const std::string& key) {
  absl::StatusOr<Recipe> r = Parse(sections);
  EXPECT_FALSE(r.ok()) << sections;
  if (r.ok()) return "";
  EXPECT_TRUE(absl::IsInvalidArgument(r.status())) << r.status();
  const std::string msg(r.status().message());
  EXPECT_THAT(msg, HasSubstr("r.yaml")) << sections;
  EXPECT_THAT(msg, HasSubstr("\"" + key + "\"")) << sections;
  return msg;
}

Recipe ParseOk(const std::string& sections) {
  absl::StatusOr<Recipe> r = Parse(sections);
  EXPECT_TRUE(r.ok()) << sections << ": " << r.status();
  return r.ok() ? *r : Recipe{};
}

std::string Sha(const std::string& text) {
  absl::StatusOr<Recipe> r = ParseRecipeYaml(text, "r.yaml");
  EXPECT_TRUE(r.ok()) << text << ": " << r.status();
  return r.ok() ? r->Sha256() : "";
}

TEST(RecipeTest, NewSectionsDefaultToOff) {
  const Recipe r = ParseOk("");
  EXPECT_EQ(r.activations.bits, 16);
  EXPECT_FALSE(r.activations.enabled());
  EXPECT_EQ(r.smoothing.method, SmoothingMethod::kNone);
  EXPECT_DOUBLE_EQ(r.smoothing.alpha, 0.5);
  EXPECT_EQ(r.smoothing.outlier_channels, 32);
  EXPECT_FALSE(r.smoothing.enabled());
  EXPECT_FALSE(r.error_reconstruction.enabled);
}

TEST(RecipeTest, ActivationBitsAre16Or4To8) {
  for (int bits : {4, 5, 6, 7, 8, 16}) {
    const Recipe r = ParseOk("activations: {bits: " + std::to_string(bits) + "}\n");
    EXPECT_EQ(r.activations.bits, bits);
    EXPECT_EQ(r.activations.enabled(), bits != 16);
  }
  for (const char* bits : {"3", "9", "17", "0", "-1", "x"}) {
    Error(std::string("activations: {bits: ") + bits + "}\n", "activations.bits");
  }
}

TEST(RecipeTest, SmoothingKeysParse) {
  Recipe r = ParseOk("smoothing:\n  method: smoothquant\n  alpha: 0.25\n  outlier_channels: 8\n");
  EXPECT_EQ(r.smoothing.method, SmoothingMethod::kSmoothQuant);
  EXPECT_DOUBLE_EQ(r.smoothing.alpha, 0.25);
  EXPECT_EQ(r.smoothing.outlier_channels, 8);
  EXPECT_TRUE(r.smoothing.enabled());
  EXPECT_DOUBLE_EQ(ParseOk("smoothing: {alpha: 0}\n").smoothing.alpha, 0.0);
  EXPECT_DOUBLE_EQ(ParseOk("smoothing: {alpha: 1}\n").smoothing.alpha, 1.0);
  r = ParseOk("smoothing: {method: aser}\nerror_reconstruction: {rank: 32}\n");
  EXPECT_EQ(r.smoothing.method, SmoothingMethod::kAser);
}

TEST(RecipeTest, SmoothingOutOfRangeNamesTheKey) {
  EXPECT_THAT(Error("smoothing: {method: awq}\n", "smoothing.method"), HasSubstr("awq"));
  Error("smoothing: {method: SmoothQuant}\n", "smoothing.method");
  Error("smoothing: {alpha: -0.1}\n", "smoothing.alpha");
  Error("smoothing: {alpha: 1.1}\n", "smoothing.alpha");
  Error("smoothing: {alpha: .nan}\n", "smoothing.alpha");
  Error("smoothing: {alpha: half}\n", "smoothing.alpha");
  Error("smoothing: {outlier_channels: 0}\n", "smoothing.outlier_channels");
  Error("smoothing: {outlier_channels: -4}\n", "smoothing.outlier_channels");
}

TEST(RecipeTest, AserRequiresErrorReconstruction) {
  EXPECT_THAT(Error("smoothing: {method: aser}\n", "smoothing.method"),
              HasSubstr("error_reconstruction"));
  // SmoothQuant needs no reconstruction.
  EXPECT_TRUE(Parse("smoothing: {method: smoothquant}\n").ok());
}

TEST(RecipeTest, ErrorReconstructionKeysParse) {
  Recipe r = ParseOk(
      "error_reconstruction:\n  rank: 64\n  energy: 0.5\n  max_extra_params: 0.2\n"
      "  whitening: diagonal\n");
  const ErrorReconstructionRecipe& er = r.error_reconstruction;
  EXPECT_TRUE(er.enabled);
  EXPECT_EQ(er.rank, 64);
  EXPECT_DOUBLE_EQ(er.energy, 0.5);
  EXPECT_DOUBLE_EQ(er.max_extra_params, 0.2);
  EXPECT_EQ(er.whitening, Whitening::kDiagonal);

  r = ParseOk("error_reconstruction: {rank: 1}\n");
  EXPECT_TRUE(r.error_reconstruction.enabled);
  EXPECT_EQ(r.error_reconstruction.rank, 1);
  EXPECT_DOUBLE_EQ(r.error_reconstruction.energy, 0.9);
  EXPECT_DOUBLE_EQ(r.error_reconstruction.max_extra_params, 0.1);
  EXPECT_EQ(r.error_reconstruction.whitening, Whitening::kCholesky);
  EXPECT_EQ(
      ParseOk("error_reconstruction: {rank: 8, whitening: none}\n").error_reconstruction.whitening,
      Whitening::kNone);
  // The closed ends of (0, 1].
  r = ParseOk("error_reconstruction: {rank: auto, energy: 1, max_extra_params: 1}\n");
  EXPECT_DOUBLE_EQ(r.error_reconstruction.energy, 1.0);
  EXPECT_DOUBLE_EQ(r.error_reconstruction.max_extra_params, 1.0);
}

TEST(RecipeTest, RankIsRequiredWhenTheSectionIsPresent) {
  EXPECT_THAT(Error("error_reconstruction: {energy: 0.5}\n", "error_reconstruction.rank"),
              HasSubstr("required"));
  EXPECT_THAT(Error("error_reconstruction: {}\n", "error_reconstruction.rank"),
              HasSubstr("required"));
  // An empty section is neither "off" nor "on".
  Error("error_reconstruction:\n", "error_reconstruction");
}

TEST(RecipeTest, RankIsAPositiveIntegerOrAuto) {
  for (const char* rank : {"0", "-3", "-1", "abc", "1.5", "Auto", "[4]"}) {
    Error(std::string("error_reconstruction: {rank: ") + rank + "}\n", "error_reconstruction.rank");
  }
  EXPECT_EQ(ParseOk("error_reconstruction: {rank: auto}\n").error_reconstruction.rank,
            kRecipeAutoRank);
  EXPECT_EQ(ParseOk("error_reconstruction: {rank: \"auto\"}\n").error_reconstruction.rank,
            kRecipeAutoRank);
}

TEST(RecipeTest, ErrorReconstructionOutOfRangeNamesTheKey) {
  Error("error_reconstruction: {rank: auto, energy: 0}\n", "error_reconstruction.energy");
  Error("error_reconstruction: {rank: auto, energy: 1.5}\n", "error_reconstruction.energy");
  Error("error_reconstruction: {rank: auto, energy: -0.5}\n", "error_reconstruction.energy");
  Error("error_reconstruction: {rank: auto, max_extra_params: 0}\n",
        "error_reconstruction.max_extra_params");
  Error("error_reconstruction: {rank: auto, max_extra_params: 2}\n",
        "error_reconstruction.max_extra_params");
  EXPECT_THAT(
      Error("error_reconstruction: {rank: 4, whitening: svd}\n", "error_reconstruction.whitening"),
      HasSubstr("svd"));
}

TEST(RecipeTest, OutlierChannelsMustNotExceedAFixedRank) {
  EXPECT_THAT(Error("smoothing: {method: aser, outlier_channels: 33}\n"
                    "error_reconstruction: {rank: 32}\n",
                    "smoothing.outlier_channels"),
              HasSubstr("error_reconstruction.rank"));
  // The default outlier_channels (32) against a smaller rank.
  Error("smoothing: {method: aser}\nerror_reconstruction: {rank: 16}\n",
        "smoothing.outlier_channels");
  EXPECT_TRUE(Parse("smoothing: {method: aser, outlier_channels: 32}\n"
                    "error_reconstruction: {rank: 32}\n")
                  .ok());
  // rank: auto is raised to at least outlier_channels at run time.
  EXPECT_TRUE(Parse("smoothing: {method: aser, outlier_channels: 4096}\n"
                    "error_reconstruction: {rank: auto}\n")
                  .ok());
  // Without aser the outlier channels are unused.
  EXPECT_TRUE(Parse("smoothing: {method: smoothquant, outlier_channels: 64}\n"
                    "error_reconstruction: {rank: 8}\n")
                  .ok());
}

TEST(RecipeTest, UnknownKeysInsideNewSectionsAreNamed) {
  EXPECT_THAT(Error("activations: {bits: 8, group_size: 32}\n", "activations.group_size"),
              HasSubstr("unknown"));
  EXPECT_THAT(Error("smoothing: {method: smoothquant, beta: 0.5}\n", "smoothing.beta"),
              HasSubstr("unknown"));
  EXPECT_THAT(Error("error_reconstruction: {rank: 8, ranks: 8}\n", "error_reconstruction.ranks"),
              HasSubstr("unknown"));
  EXPECT_THAT(Error("hessian: {mode: layer}\n", "hessian"), HasSubstr("must be a scalar"));
  EXPECT_THAT(Error("hessian: fisher\n", "hessian"),
              HasSubstr("must be layer, output_adaptive or output_adaptive_token, got \"fisher\""));
  Recipe rtn = ParseOk("hessian: output_adaptive_token\n");
  rtn.method = QuantMethod::kRtn;
  EXPECT_THAT(std::string(rtn.Validate().message()),
              HasSubstr("recipe key \"hessian\" \"output_adaptive_token\" requires method gptq"));
  Error("activations: 8\n", "activations");
}

// The gRPC path builds the struct without YAML: Validate alone applies the same rules.
TEST(RecipeTest, ValidateChecksTheStructDirectly) {
  Recipe r = ParseOk("");
  r.error_reconstruction.enabled = true;
  EXPECT_THAT(std::string(r.Validate().message()), HasSubstr("\"error_reconstruction.rank\""));
  r.error_reconstruction.rank = -2;
  EXPECT_THAT(std::string(r.Validate().message()), HasSubstr("\"error_reconstruction.rank\""));
  r.error_reconstruction.rank = kRecipeAutoRank;
  EXPECT_TRUE(r.Validate().ok());
  r.activations.bits = 2;
  EXPECT_THAT(std::string(r.Validate().message()), HasSubstr("\"activations.bits\""));
}

TEST(RecipeTest, CanonicalJsonFillsDefaults) {
  nlohmann::json j = ParseOk("").ToCanonicalJson();
  EXPECT_EQ(j["activations"].dump(), R"({"bits":16})");
  EXPECT_EQ(j["smoothing"].dump(), R"({"alpha":0.5,"method":"none","outlier_channels":32})");
  ASSERT_TRUE(j.contains("error_reconstruction"));
  EXPECT_TRUE(j["error_reconstruction"].is_null());

  j = ParseOk("error_reconstruction: {rank: auto}\n").ToCanonicalJson();
  EXPECT_EQ(j["error_reconstruction"].dump(),
            R"({"energy":0.9,"max_extra_params":0.1,"rank":"auto","whitening":"cholesky"})");
  j = ParseOk("error_reconstruction: {rank: 64}\n").ToCanonicalJson();
  EXPECT_EQ(j["error_reconstruction"]["rank"], 64);
}

// recipe_sha256 values pinned before the string keys became enums (method, weights.grid,
// smoothing.method, error_reconstruction.whitening): every value of each key, hashes unchanged.
// Re-pinned once when the canonical form gained `hessian` (issue 12, OAC).
TEST(RecipeTest, HashesOfEveryEnumValueArePinned) {
  EXPECT_EQ(Sha("method: gptq\nweights: {bits: 4, group_size: 128}\n"),
            "2ce27e1f2e1aeb9c9570570a73dfd186efdd55c68444048a896b579d70ab15c6");
  EXPECT_EQ(Sha("method: gptq\nweights: {bits: 4, group_size: -1}\nactivations: {bits: 8}\n"
                "smoothing: {method: aser, outlier_channels: 8}\n"
                "error_reconstruction: {rank: 16, whitening: cholesky}\n"),
            "9f8839fdd3bf5f109502a95226d0772a378a01ac8c66cf2eca48cc02352054c4");
  EXPECT_EQ(Sha("method: rtn\nweights: {bits: 3, group_size: 32, grid: cuberoot}\n"
                "gptq: {true_sequential: false}\nsmoothing: {method: smoothquant}\n"
                "error_reconstruction: {rank: auto, whitening: diagonal}\n"),
            "43fea8ab77b41246b31c86bcc22aea04eeb0112b2fb4d198e52c5f5e67561501");
  EXPECT_EQ(Sha("method: gptq\nweights: {bits: 3, group_size: 32, symmetric: true}\n"
                "gptq: {true_sequential: false, act_order: true}\n"
                "smoothing: {method: aser, outlier_channels: 4}\n"
                "error_reconstruction: {rank: 8, whitening: none}\n"),
            "020a0ca7236fc6e192d77541e592e865052e4af850b645644512cb6cd4908198");
}

// The balanced grid (ABQ bit balance) parses at 2 bits, hashes apart from uniform, and other bit
// widths are refused naming weights.grid and weights.bits.
TEST(RecipeTest, BalancedGridRequiresTwoBits) {
  const absl::StatusOr<Recipe> r =
      ParseRecipeYaml("method: rtn\nweights: {bits: 2, grid: balanced}\n", "r.yaml");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->weights.grid, kernels::GridKind::kBalanced);
  EXPECT_EQ(r->ToCanonicalJson()["weights"]["grid"], "balanced");
  EXPECT_NE(Sha("method: rtn\nweights: {bits: 2, grid: balanced}\n"),
            Sha("method: rtn\nweights: {bits: 2}\n"));
  for (int bits : {3, 4, 8}) {
    const absl::StatusOr<Recipe> bad = ParseRecipeYaml(
        "method: gptq\nweights: {bits: " + std::to_string(bits) + ", grid: balanced}\n", "r.yaml");
    ASSERT_FALSE(bad.ok());
    EXPECT_TRUE(absl::IsInvalidArgument(bad.status()));
    const std::string msg(bad.status().message());
    EXPECT_THAT(msg, HasSubstr("recipe key \"weights.grid\" balanced requires weights.bits 2"));
    EXPECT_THAT(msg, HasSubstr("got weights.bits " + std::to_string(bits)));
  }
  const absl::StatusOr<Recipe> sym = ParseRecipeYaml(
      "method: gptq\nweights: {bits: 2, grid: balanced, symmetric: true}\n", "r.yaml");
  EXPECT_TRUE(sym.ok()) << sym.status();
  const absl::StatusOr<Recipe> typo =
      ParseRecipeYaml("method: gptq\nweights: {bits: 2, grid: balance}\n", "r.yaml");
  ASSERT_FALSE(typo.ok());
  EXPECT_THAT(std::string(typo.status().message()), HasSubstr("\"weights.grid\""));
  EXPECT_THAT(std::string(typo.status().message()), HasSubstr("balanced"));
}

TEST(RecipeTest, EnumNamesRoundTrip) {
  for (QuantMethod v : {QuantMethod::kRtn, QuantMethod::kGptq}) {
    EXPECT_EQ(ParseQuantMethod(RecipeName(v)).value(), v);
  }
  for (kernels::GridKind v :
       {kernels::GridKind::kUniform, kernels::GridKind::kCuberoot, kernels::GridKind::kBalanced}) {
    EXPECT_EQ(ParseGrid(RecipeName(v)).value(), v);
  }
  for (SmoothingMethod v :
       {SmoothingMethod::kNone, SmoothingMethod::kSmoothQuant, SmoothingMethod::kAser}) {
    EXPECT_EQ(ParseSmoothingMethod(RecipeName(v)).value(), v);
  }
  for (Whitening v : {Whitening::kCholesky, Whitening::kDiagonal, Whitening::kNone}) {
    EXPECT_EQ(ParseWhitening(RecipeName(v)).value(), v);
  }
  EXPECT_EQ(ParseQuantMethod("awq").status().message(),
            "recipe key \"method\" must be rtn or gptq, got \"awq\"");
  EXPECT_EQ(ParseWhitening("svd").status().message(),
            "recipe key \"error_reconstruction.whitening\" must be cholesky, diagonal or none, "
            "got \"svd\"");
  // An empty method is a missing one.
  EXPECT_THAT(
      std::string(
          ParseRecipeYaml("method: \"\"\nweights: {bits: 4}\n", "r.yaml").status().message()),
      HasSubstr("\"method\" is required"));
}

TEST(RecipeTest, SpellingsOfOneRecipeHashTheSame) {
  const std::string a =
      "method: gptq\nweights: {bits: 4}\nsmoothing: {method: aser}\n"
      "error_reconstruction: {rank: auto}\n";
  const std::string b =
      "error_reconstruction:\n  whitening: cholesky\n  rank: \"auto\"\n  energy: 0.90\n"
      "  max_extra_params: 1e-1\n"
      "smoothing:\n  outlier_channels: 32\n  method: aser\n  alpha: 0.50\n"
      "activations:\n  bits: 16\n"
      "weights:\n  bits: 4\n"
      "method: gptq\n";
  EXPECT_EQ(Sha(a), Sha(b));
  EXPECT_EQ(Sha(kBase), Sha(std::string(kBase) + "activations: {bits: 16}\nsmoothing: {}\n"));
}

TEST(RecipeTest, EachNewKeyChangesTheHash) {
  const std::string base = std::string(kBase) + "smoothing: {method: aser, outlier_channels: 16}\n";
  const std::vector<std::string> variants = {
      base + "error_reconstruction: {rank: 32}\n",
      base + "error_reconstruction: {rank: 32}\nactivations: {bits: 8}\n",
      base + "error_reconstruction: {rank: 33}\n",
      base + "error_reconstruction: {rank: auto}\n",
      base + "error_reconstruction: {rank: 32, energy: 0.8}\n",
      base + "error_reconstruction: {rank: 32, max_extra_params: 0.2}\n",
      base + "error_reconstruction: {rank: 32, whitening: diagonal}\n",
      std::string(kBase) + "smoothing: {method: aser, outlier_channels: 8}\n" +
          "error_reconstruction: {rank: 32}\n",
      std::string(kBase) + "smoothing: {method: aser, outlier_channels: 16, alpha: 0.6}\n" +
          "error_reconstruction: {rank: 32}\n",
      std::string(kBase) + "smoothing: {method: smoothquant, outlier_channels: 16}\n" +
          "error_reconstruction: {rank: 32}\n",
      std::string(kBase) + "smoothing: {method: smoothquant, outlier_channels: 16}\n",
  };
  std::set<std::string> hashes;
  for (const std::string& v : variants) hashes.insert(Sha(v));
  EXPECT_EQ(hashes.size(), variants.size());
}

// ---- retrain (DESIGN section 6; issue 13).

TEST(RecipeTest, RetrainIsOffWhenAbsentAndFillsDefaultsWhenPresent) {
  EXPECT_FALSE(ParseOk("").retrain.enabled);
  EXPECT_FALSE(ParseOk("").ToCanonicalJson().contains("retrain"));
  const Recipe r = ParseOk("retrain: {}\n");
  EXPECT_TRUE(r.retrain.enabled);
  EXPECT_EQ(r.retrain.method, RetrainMethod::kApiq);
  EXPECT_FALSE(r.retrain.rank.has_value());
  EXPECT_EQ(r.retrain.RankOrDefault(), 64);
  EXPECT_EQ(r.retrain.epochs.weight, 0);
  EXPECT_EQ(r.retrain.epochs.mixed, 0);
  EXPECT_EQ(r.retrain.epochs.output, 20);
  EXPECT_DOUBLE_EQ(r.retrain.lambda, 0.1);
  EXPECT_DOUBLE_EQ(r.retrain.lr_lora, 5.0e-4);
  EXPECT_DOUBLE_EQ(r.retrain.lr_clip, 5.0e-3);
  EXPECT_DOUBLE_EQ(r.retrain.weight_decay, 0.1);
  EXPECT_FALSE(r.NeedsGradientPass());
  EXPECT_FALSE(r.NeedsFisher());
  EXPECT_EQ(r.ToCanonicalJson()["retrain"].dump(),
            R"({"epochs":{"mixed":0,"output":20,"weight":0},"lambda":0.1,"lr_clip":0.005,)"
            R"("lr_lora":0.0005,"method":"apiq","rank":64,"weight_decay":0.1})");
}

TEST(RecipeTest, RetrainKeysParse) {
  const Recipe r = ParseOk(
      "retrain:\n  method: saliency\n  rank: 16\n  epochs: {weight: 15, output: 5}\n"
      "  lambda: 0\n  lr_lora: 1e-3\n  lr_clip: 0.01\n  weight_decay: 0\n");
  EXPECT_EQ(r.retrain.method, RetrainMethod::kSaliency);
  EXPECT_EQ(r.retrain.rank, 16);
  // A stage left out keeps its default: the paper's 15 / 0 / 5 spells mixed by omission.
  EXPECT_EQ(r.retrain.epochs.weight, 15);
  EXPECT_EQ(r.retrain.epochs.mixed, 0);
  EXPECT_EQ(r.retrain.epochs.output, 5);
  EXPECT_DOUBLE_EQ(r.retrain.lambda, 0.0);
  EXPECT_DOUBLE_EQ(r.retrain.lr_lora, 1e-3);
  EXPECT_DOUBLE_EQ(r.retrain.lr_clip, 0.01);
  EXPECT_DOUBLE_EQ(r.retrain.weight_decay, 0.0);
  // Saliency needs the Fisher, with rtn as with gptq; NeedsGradientPass stays about OAC's
  // Hessians (the driver reads it as "GPTQ uses output-adaptive Hessians").
  EXPECT_TRUE(r.NeedsFisher());
  EXPECT_FALSE(r.NeedsGradientPass());
  const absl::StatusOr<Recipe> rtn =
      ParseRecipeYaml("method: rtn\nweights: {bits: 2}\nretrain: {method: saliency}\n", "r.yaml");
  ASSERT_TRUE(rtn.ok()) << rtn.status();
  EXPECT_TRUE(rtn->NeedsFisher());
}

TEST(RecipeTest, RetrainWithErrorReconstructionTakesItsRanks) {
  const Recipe r = ParseOk("error_reconstruction: {rank: 8}\nretrain: {}\n");
  EXPECT_TRUE(r.ToCanonicalJson()["retrain"]["rank"].is_null());
  EXPECT_THAT(Error("error_reconstruction: {rank: 8}\nretrain: {rank: 8}\n", "retrain.rank"),
              HasSubstr("must be absent with error_reconstruction"));
}

TEST(RecipeTest, RetrainOutOfRangeNamesTheKey) {
  Error("retrain: {method: omniquant}\n", "retrain.method");
  Error("retrain: {rank: 0}\n", "retrain.rank");
  Error("retrain: {rank: x}\n", "retrain.rank");
  Error("retrain: {epochs: {weight: -1}}\n", "retrain.epochs.weight");
  Error("retrain: {epochs: {mixed: -2}}\n", "retrain.epochs.mixed");
  Error("retrain: {epochs: {output: -1, weight: 3}}\n", "retrain.epochs.output");
  Error("retrain: {epochs: {output: 0}}\n", "retrain.epochs");
  Error("retrain: {epochs: 5}\n", "retrain.epochs");
  Error("retrain: {lambda: -0.1}\n", "retrain.lambda");
  Error("retrain: {lambda: .inf}\n", "retrain.lambda");
  Error("retrain: {lr_lora: 0}\n", "retrain.lr_lora");
  Error("retrain: {lr_clip: -1e-3}\n", "retrain.lr_clip");
  Error("retrain: {lr_clip: .nan}\n", "retrain.lr_clip");
  Error("retrain: {weight_decay: -0.5}\n", "retrain.weight_decay");
  Error("retrain: {learning_rate: 1}\n", "retrain.learning_rate");
  Error("retrain: {epochs: {warmup: 1}}\n", "retrain.epochs.warmup");
  Error("retrain: 3\n", "retrain");
  const absl::StatusOr<Recipe> cuberoot =
      ParseRecipeYaml("method: gptq\nweights: {bits: 3, grid: cuberoot}\nretrain: {}\n", "r.yaml");
  ASSERT_FALSE(cuberoot.ok());
  EXPECT_THAT(std::string(cuberoot.status().message()),
              HasSubstr("recipe key \"weights.grid\" must be uniform"));
  // Validate alone (the struct path) applies the same rules.
  Recipe r = ParseOk("retrain: {}\n");
  r.retrain.epochs.output = 0;
  EXPECT_THAT(std::string(r.Validate().message()), HasSubstr("\"retrain.epochs\""));
}

TEST(RecipeTest, EachRetrainKeyChangesTheHash) {
  const std::vector<std::string> variants = {
      std::string(kBase),
      std::string(kBase) + "retrain: {}\n",
      std::string(kBase) + "retrain: {method: saliency}\n",
      std::string(kBase) + "retrain: {rank: 32}\n",
      std::string(kBase) + "retrain: {epochs: {weight: 1}}\n",
      std::string(kBase) + "retrain: {epochs: {mixed: 1}}\n",
      std::string(kBase) + "retrain: {epochs: {output: 19}}\n",
      std::string(kBase) + "retrain: {lambda: 0.2}\n",
      std::string(kBase) + "retrain: {lr_lora: 1e-4}\n",
      std::string(kBase) + "retrain: {lr_clip: 1e-2}\n",
      std::string(kBase) + "retrain: {weight_decay: 0}\n",
  };
  std::set<std::string> hashes;
  for (const std::string& v : variants) hashes.insert(Sha(v));
  EXPECT_EQ(hashes.size(), variants.size());
  // Defaults spelled out hash as the empty section.
  EXPECT_EQ(Sha(std::string(kBase) + "retrain: {}\n"),
            Sha(std::string(kBase) +
                "retrain: {method: apiq, rank: 64, epochs: {weight: 0, mixed: 0, output: 20},"
                " lambda: 0.1, lr_lora: 5.0e-4, lr_clip: 5.0e-3, weight_decay: 0.1}\n"));
}

// Jobs run retraining (issue 13): a recipe file with `retrain` loads, and its errors name the file.
TEST(RecipeTest, RecipeFilesWithRetrainLoad) {
  const std::string path = ::testing::TempDir() + "/retrain_recipe.yaml";
  {
    std::ofstream f(path);
    f << kBase << "retrain: {method: saliency, epochs: {weight: 15, output: 5}}\n";
  }
  absl::StatusOr<Recipe> r = LoadRecipeFile(path);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->retrain.enabled);
  EXPECT_TRUE(r->NeedsFisher());
  EXPECT_TRUE(r->RunsGradientPass());
  EXPECT_FALSE(r->NeedsGradientPass());
  EXPECT_EQ(r->GradientPassKind(), HessianKind::kOutputAdaptiveToken);
  {
    std::ofstream f(path);
    f << kBase << "retrain: {lambda: -1}\n";
  }
  r = LoadRecipeFile(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("retrain.lambda"));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(path));
  std::remove(path.c_str());
}

}  // namespace
}  // namespace qcal::engine
