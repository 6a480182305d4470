// The quantization recipe (DESIGN section 6): what a job computes, parsed from YAML or built from
// the gRPC JobSpec, with every default filled in.
//
// Unknown keys and out-of-range values are errors naming the key. `method`, `weights.bits` and,
// when the section is present, `error_reconstruction.rank` have no default. Every key is hashed
// with its value even where the recipe does not use it (alpha without smoothing, energy with a
// fixed rank), so the hash identifies the text's meaning key by key. The canonical form (sorted-key
// JSON with defaults filled in) is what recipe_sha256 hashes, so two recipes that mean the same
// thing hash the same.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/hf_config.h"
#include "kernels/quant_grid.h"
#include "nlohmann/json_fwd.hpp"

namespace qcal::engine {

// The values of the recipe's string keys. YAML, the proto and the canonical JSON spell them as
// the names below (RecipeName); Parse* turn a name back into the value at that boundary.
// method: rtn | gptq.
enum class QuantMethod { kRtn, kGptq };
// smoothing.method: none | smoothquant | aser.
enum class SmoothingMethod { kNone, kSmoothQuant, kAser };
// error_reconstruction.whitening: cholesky | diagonal | none.
enum class Whitening { kCholesky, kDiagonal, kNone };
// weights.grid: uniform | cuberoot | balanced (kernels::GridKind; balanced requires bits 2).
// hessian: layer | output_adaptive | output_adaptive_token (DESIGN section 3, OAC).
enum class HessianKind { kLayer, kOutputAdaptive, kOutputAdaptiveToken };
// retrain.method: apiq | saliency (DESIGN section 3, "Retraining").
enum class RetrainMethod { kApiq, kSaliency };
// moe.routing: quantized | full_precision (docs/MOE.md).
enum class MoeRouting { kQuantized, kFullPrecision };

const char* RecipeName(QuantMethod v);
const char* RecipeName(kernels::GridKind v);
const char* RecipeName(SmoothingMethod v);
const char* RecipeName(Whitening v);
const char* RecipeName(HessianKind v);
const char* RecipeName(RetrainMethod v);
const char* RecipeName(MoeRouting v);

// The value a name stands for; InvalidArgument `recipe key "<key>" must be ..., got "<name>"`
// otherwise (callers prefix the source).
absl::StatusOr<QuantMethod> ParseQuantMethod(std::string_view name);
absl::StatusOr<kernels::GridKind> ParseGrid(std::string_view name);
absl::StatusOr<SmoothingMethod> ParseSmoothingMethod(std::string_view name);
absl::StatusOr<Whitening> ParseWhitening(std::string_view name);
absl::StatusOr<HessianKind> ParseHessianKind(std::string_view name);
absl::StatusOr<RetrainMethod> ParseRetrainMethod(std::string_view name);
absl::StatusOr<MoeRouting> ParseMoeRouting(std::string_view name);

struct WeightsRecipe {
  int bits = 0;            // required: 2..8
  int group_size = 128;    // -1: one group per row; >= d_in same as -1. Default: 128.
  bool symmetric = false;  // Default: false (asymmetric).
  kernels::GridKind grid = kernels::GridKind::kUniform;  // Default: uniform.
};

struct GptqRecipe {
  double damp = 0.01;           // λ in H += λ·mean(diag H)·I; 0 <= damp <= 1. Default: 0.01.
  int block_size = 128;         // lazy-batch width, 1..4096. Default: 128.
  bool act_order = false;       // Default: false.
  bool true_sequential = true;  // Default: true.
};

// Activation fake-quantization of every quantized linear's input (DESIGN section 3).
struct ActivationsRecipe {
  int bits = 16;  // 16: off; 4..8: per-token dynamic symmetric. Default: 16.
  bool enabled() const { return bits < 16; }
};

// Activation smoothing (DESIGN section 3, "Smoothing").
struct SmoothingRecipe {
  SmoothingMethod method = SmoothingMethod::kNone;  // Default: none.
  double alpha = 0.5;                               // migration strength, 0..1. Default: 0.5.
  int outlier_channels = 32;  // aser: channels extracted per input, >= 1. Default: 32.
  bool enabled() const { return method != SmoothingMethod::kNone; }
};

// `rank: auto` (ErrorReconstructionRecipe::rank).
inline constexpr int kRecipeAutoRank = -1;

// Low-rank error reconstruction (DESIGN section 3, "Error reconstruction"). Off unless the recipe
// has the section (`enabled`).
struct ErrorReconstructionRecipe {
  bool enabled = false;
  int rank = 0;                   // required when enabled: >= 1, or kRecipeAutoRank ("auto")
  double energy = 0.9;            // rank auto: fraction of Σσ² kept, (0, 1]. Default: 0.9.
  double max_extra_params = 0.1;  // rank auto: extra parameters per layer, (0, 1]. Default: 0.1.
  Whitening whitening = Whitening::kCholesky;  // Default: cholesky.
};

// Epochs of each retraining stage, as (c_out, c_reg) of the loss: weight-preservation (0, 1),
// mixed (1, 1), output-preservation (1, 0), run in that order. A stage key left out of the recipe
// keeps its default (so `epochs: {weight: 15, output: 5}` is the saliency paper's 15 / 0 / 5).
struct RetrainEpochs {
  int weight = 0;   // >= 0. Default: 0.
  int mixed = 0;    // >= 0. Default: 0.
  int output = 20;  // >= 0. Default: 20.
};

// Block retraining (DESIGN section 3, "Retraining"; section 2, step 3.4). Off unless the recipe has
// the section (`enabled`). Choices where DESIGN leaves room (docs: services/engine/retrain):
// - saliency does not need method gptq: its Fisher comes from the gradient pass, which does not
//   depend on the solver, and RTN's frozen base W̃ is W itself (Recipe::NeedsFisher).
// - the clipped grid's straight-through estimator is defined for weights.grid uniform only.
struct RetrainRecipe {
  bool enabled = false;
  RetrainMethod method = RetrainMethod::kApiq;  // Default: apiq.
  // LoRA rank, >= 1. Absent (nullopt) with error_reconstruction, whose factors start the LoRA at
  // their own ranks; absent without it means 64. Default: 64.
  std::optional<int> rank;
  RetrainEpochs epochs;       // at least one stage > 0
  double lambda = 0.1;        // weight of the Fisher-weighted term, >= 0 (finite). Default: 0.1.
  double lr_lora = 5.0e-4;    // AdamW learning rate of the LoRA factors, > 0. Default: 5e-4.
  double lr_clip = 5.0e-3;    // AdamW learning rate of the clipping logits, > 0. Default: 5e-3.
  double weight_decay = 0.1;  // AdamW decoupled weight decay, >= 0. Default: 0.1.

  // The LoRA rank trained when there are no error-reconstruction factors: rank or its default.
  int RankOrDefault() const { return rank.value_or(kDefaultRank); }
  static constexpr int kDefaultRank = 64;
};

// Mixture-of-experts models (DESIGN section 6, docs/MOE.md): which path's router picks the tokens
// an expert's statistics are taken on (the statistics themselves are always the quantized path's
// inputs), and the fewest routed tokens an expert may have before it is calibrated on all of the
// block's tokens instead (for all three of its linears).
struct MoeRecipe {
  MoeRouting routing = MoeRouting::kQuantized;  // Default: quantized.
  int min_tokens = 128;                         // >= 1. Default: 128.
  bool operator==(const MoeRecipe&) const = default;
};

struct Recipe {
  std::optional<QuantMethod> method;  // required
  WeightsRecipe weights;
  GptqRecipe gptq;
  ActivationsRecipe activations;
  SmoothingRecipe smoothing;
  ErrorReconstructionRecipe error_reconstruction;
  // What weighs GPTQ's rounding: the layer's Gram matrix, or the output-adaptive Hessian from the
  // gradient pass (sample-wise H_oac or per-token H_tok). Anything but kLayer needs method gptq.
  // Default: layer.
  HessianKind hessian = HessianKind::kLayer;
  RetrainRecipe retrain;
  // Absent unless the recipe has a `moe` section or the job fills in its defaults for an MoE model
  // (ResolveForModel): a dense job's canonical recipe, and its recipe_sha256, never carry it.
  std::optional<MoeRecipe> moe;

  // Whether the job runs the gradient pass (DESIGN section 2, step 4) for OAC's Hessians. The
  // driver reads it as "GPTQ uses output-adaptive Hessians", so it stays about `hessian` alone.
  bool NeedsGradientPass() const { return hessian != HessianKind::kLayer; }
  // Whether retraining needs the diagonal Fisher of the gradient pass (saliency). The job then
  // runs the gradient pass too, GPTQ keeping its layer Hessians when hessian is layer.
  bool NeedsFisher() const { return retrain.enabled && retrain.method == RetrainMethod::kSaliency; }
  // Whether the job runs the gradient pass: for output-adaptive Hessians or for the Fisher.
  bool RunsGradientPass() const { return NeedsGradientPass() || NeedsFisher(); }
  // The Hessian kind the gradient pass forms and its files record: `hessian`, or for a pass run
  // only for the Fisher (hessian: layer) the per-token H_tok, the cheapest (one Gram product per
  // linear and chunk), which the solve then does not read. A pass that forms the Fisher alone
  // is later work.
  HessianKind GradientPassKind() const {
    return NeedsGradientPass() ? hessian : HessianKind::kOutputAdaptiveToken;
  }

  absl::Status Validate() const;
  // Fits the recipe to the model it will quantize (before the job starts): for a mixture-of-experts
  // model, fills in the `moe` defaults when the section is absent and refuses what phase 2 does not
  // do on experts (smoothing.method other than none, error_reconstruction, hessian other than
  // layer, retrain, gptq.true_sequential false: InvalidArgument naming the key and the model
  // type); for a dense model, refuses a `moe` section (InvalidArgument naming the key).
  // `source` names the recipe in errors (its file, where the caller knows it).
  absl::Status ResolveForModel(const ModelConfig& config, const std::string& source = "recipe");
  // The refusals of ResolveForModel alone, for a recipe already resolved (entry points that take a
  // recipe and a model: the block driver, QuantizeModel, the export).
  absl::Status CheckForModel(const ModelConfig& config, const std::string& source = "recipe") const;
  // Sorted-key JSON with every default filled in. `retrain` and `moe` appear only when the section
  // is present, so recipes without them keep the hashes they had before the sections existed.
  nlohmann::json ToCanonicalJson() const;
  // sha256 of ToCanonicalJson().dump().
  std::string Sha256() const;
};

// The weight quantizer spec of a recipe.
kernels::QuantSpec SpecOf(const Recipe& recipe);

// Parses recipe YAML text; `source` names the file in error messages.
absl::StatusOr<Recipe> ParseRecipeYaml(const std::string& text, const std::string& source);
// The file's recipe (ParseRecipeYaml of its text, errors naming the file).
absl::StatusOr<Recipe> LoadRecipeFile(const std::string& path);

}  // namespace qcal::engine
