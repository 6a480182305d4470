// qcal eval: perplexity of a checkpoint on a text file; with --logits-out, the first window's fp32
// logits as a safetensors file (for comparisons with other implementations, tools/families/), and
// with --dump-routing the experts an MoE model routed that window's tokens to.
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "common/hf_config.h"
#include "common/logging.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "kernels/backend.h"
#include "nlohmann/json.hpp"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/model.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct EvalArgs {
  std::string model;
  std::string text;
  int seq_len = 0;
  int max_windows = -1;
  DeviceFlags dev;
  KernelFlags kernel_flags;
  int act_bits = 0;
  bool json = false;
  std::string logits_out;
  std::string ids;
  std::string dump_routing;
};

// Writes logits [seq, vocab] (F32) and the ids they were computed from (I32 [seq]) to `path`.
absl::Status WriteLogits(const std::string& path, const Tensor& logits,
                         const std::vector<int>& ids) {
  Tensor id_tensor = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(ids.size())});
  std::memcpy(id_tensor.raw(), ids.data(), ids.size() * sizeof(int));
  QCAL_RETURN_IF_ERROR(WriteSafetensors(path, {{"logits", logits}, {"input_ids", id_tensor}}));
  spdlog::info("eval: wrote logits [{}, {}] to {}", logits.dim(0), logits.dim(1), path);
  return absl::OkStatus();
}

// Collects the routing of every MoE block during one SequenceLogits and writes it as safetensors:
// "layers.{b}.experts" I32 [seq, top_k] (chosen experts, in top-k order) and "layers.{b}.weights"
// F32 [seq, top_k] (their routing weights) for every MoE block b.
class RoutingDump {
 public:
  engine::RoutingObserver Observer() {
    return [this](int b, const engine::Routing& r) { routings_[b] = r; };
  }
  absl::Status Write(const std::string& path) const {
    std::map<std::string, Tensor> tensors;
    for (const auto& [b, r] : routings_) {
      Tensor experts = Tensor::Zeros(DType::kI32, {r.rows, r.top_k});
      Tensor weights = Tensor::Zeros(DType::kF32, {r.rows, r.top_k});
      std::memcpy(experts.raw(), r.experts.data(), r.experts.size() * sizeof(int32_t));
      std::memcpy(weights.raw(), r.weights.data(), r.weights.size() * sizeof(float));
      tensors[absl::StrCat("layers.", b, ".experts")] = std::move(experts);
      tensors[absl::StrCat("layers.", b, ".weights")] = std::move(weights);
    }
    QCAL_RETURN_IF_ERROR(WriteSafetensors(path, tensors));
    spdlog::info("eval: wrote the routing of {} MoE blocks to {}", routings_.size(), path);
    return absl::OkStatus();
  }

 private:
  std::map<int, engine::Routing> routings_;
};

// The logits of `ids` (and, with --dump-routing, their routing) written where the flags say.
absl::Status WriteSequenceOutputs(const EvalArgs& a, engine::Model& model,
                                  const std::vector<int>& ids) {
  RoutingDump dump;
  if (!a.dump_routing.empty()) {
    if (!model.config().moe()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--dump-routing: ", a.model, " is not a mixture-of-experts model (model_type ",
          model.config().model_type, ")"));
    }
    model.set_routing_observer(dump.Observer());
  }
  absl::StatusOr<Tensor> logits = engine::SequenceLogits(model, ids);
  model.set_routing_observer(nullptr);
  QCAL_RETURN_IF_ERROR(logits.status());
  QCAL_RETURN_IF_ERROR(WriteLogits(a.logits_out, *logits, ids));
  return a.dump_routing.empty() ? absl::OkStatus() : dump.Write(a.dump_routing);
}

// Token ids from a JSON file holding a list of integers (--ids).
absl::StatusOr<std::vector<int>> ReadIds(const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": malformed JSON: ", e.what()));
  }
  if (!j.is_array() || j.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": expected a non-empty list of ids"));
  }
  std::vector<int> ids;
  for (const auto& v : j) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > (1 << 30)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": token id ", v.dump(), " is not a non-negative integer"));
    }
    ids.push_back(v.get<int>());
  }
  return ids;
}

absl::Status RunEval(const EvalArgs& a) {
  // The ABQ checks run on the host, before any device is touched.
  QCAL_ASSIGN_OR_RETURN(std::optional<kernels::AbqKernel> abq_kernel,
                        a.kernel_flags.Check(a.model, a.act_bits));
  QCAL_ASSIGN_OR_RETURN(kernels::BackendOptions bo, a.dev.ToOptions());
  QCAL_ASSIGN_OR_RETURN(auto backend, kernels::CreateBackend(bo));
  if (abq_kernel && backend->device() == Device::kHost) {
    spdlog::warn("--kernels abq on the CPU backend runs the kernels' scalar reference (slow)");
  }
  engine::LoadOptions load;
  load.act_bits = a.act_bits;
  load.abq_kernel = abq_kernel;
  // Evaluation runs layer-major, one block resident at a time (DESIGN section 2, "Memory").
  load.residency = engine::BlockResidency::kStreaming;
  QCAL_ASSIGN_OR_RETURN(auto model, engine::LoadCheckpoint(a.model, backend.get(), load));
  if (!a.ids.empty()) {
    // A given token sequence: its logits only (no tokenizer, no windows, no BOS added).
    QCAL_ASSIGN_OR_RETURN(std::vector<int> ids, ReadIds(a.ids));
    QCAL_RETURN_IF_ERROR(
        Annotate(CheckSequenceLength(model->config(), static_cast<int64_t>(ids.size())), a.model));
    return WriteSequenceOutputs(a, *model, ids);
  }
  if (a.seq_len < 2) return absl::InvalidArgumentError("--seq-len is required with --text");
  QCAL_RETURN_IF_ERROR(Annotate(CheckSequenceLength(model->config(), a.seq_len), a.model));
  QCAL_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(a.model));
  QCAL_ASSIGN_OR_RETURN(std::string text, LoadCorpusText(a.text));
  QCAL_ASSIGN_OR_RETURN(std::vector<int> tokens, TokenizeCorpus(*tokenizer, text, a.text));
  QCAL_ASSIGN_OR_RETURN(TokenWindows windows, MakeEvalWindows(tokens, a.seq_len, a.max_windows,
                                                              tokenizer->bos_id(), a.text));
  spdlog::info("eval: {} windows of {} tokens on {} ({} threads)", windows.inputs.size(), a.seq_len,
               backend->name(), backend->threads());
  if (!a.logits_out.empty()) {
    QCAL_RETURN_IF_ERROR(WriteSequenceOutputs(a, *model, windows.inputs[0]));
    // A streaming model read its blocks once already; perplexity reads them again.
  }
  QCAL_ASSIGN_OR_RETURN(
      engine::PerplexityResult r,
      engine::EvaluatePerplexity(*model, windows, [](int64_t done, int64_t total) {
        spdlog::debug("eval: {}/{} windows", done, total);
      }));
  if (a.json) {
    nlohmann::ordered_json j;
    j["perplexity"] = r.perplexity;
    j["nll"] = r.nll;
    j["tokens"] = r.tokens;
    j["windows"] = r.windows;
    j["seconds"] = r.seconds;
    std::printf("%s\n", j.dump().c_str());
  } else {
    std::printf("perplexity %.4f  nll %.6f  tokens %lld  windows %lld  %.2f s (%.0f tokens/s)\n",
                r.perplexity, r.nll, static_cast<long long>(r.tokens),
                static_cast<long long>(r.windows), r.seconds, r.tokens / std::max(r.seconds, 1e-9));
  }
  return absl::OkStatus();
}

}  // namespace

RunFn AddEval(CLI::App& app) {
  auto a = std::make_shared<EvalArgs>();
  app.add_option("--model", a->model, "Model directory (Hugging Face layout)")->required();
  auto* text =
      app.add_option("--text", a->text, "Evaluation text (.txt, or .jsonl with a \"text\" field)");
  app.add_option("--seq-len", a->seq_len, "Window length L in tokens (required with --text)")
      ->check(CLI::Range(2, 1 << 20));
  auto* logits = app.add_option(
      "--logits-out", a->logits_out,
      "Also write the first window's fp32 logits to this safetensors file (tensor \"logits\" "
      "[seq, vocab], and \"input_ids\" [seq] I32, the ids they were computed from)");
  auto* ids = app.add_option(
      "--ids", a->ids,
      "Instead of --text: a JSON file with one list of token ids, run as one sequence (no BOS "
      "added); only its logits are written (needs --logits-out)");
  ids->needs(logits);
  app.add_option("--dump-routing", a->dump_routing,
                 "With --logits-out, on a mixture-of-experts model: also write the experts chosen "
                 "for each token of that sequence to this safetensors file (\"layers.{b}.experts\" "
                 "I32 [seq, top_k] and \"layers.{b}.weights\" F32 for every MoE block b)")
      ->needs(logits);
  ids->excludes(text);
  text->excludes(ids);
  app.add_option("--max-windows", a->max_windows, "Keep only the first K windows (default: all)")
      ->check(CLI::PositiveNumber);
  a->dev.Add(app);
  a->kernel_flags.Add(app);
  app.add_option("--act-bits", a->act_bits,
                 "Activation bits of every block linear (4..8, or 16 for off); default: what the "
                 "checkpoint records")
      ->check(CLI::IsMember({4, 5, 6, 7, 8, 16}));
  app.add_flag("--json", a->json,
               "Print one JSON object: perplexity, nll, tokens, windows, seconds");
  return [a, text, ids] {
    if (text->count() == 0 && ids->count() == 0) {
      return absl::InvalidArgumentError("eval: --text (or --ids with --logits-out) is required");
    }
    return RunEval(*a);
  };
}

}  // namespace qcal::cli
