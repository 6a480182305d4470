// qcal eval: perplexity of a checkpoint on a text file.
#include <cstdio>
#include <memory>

#include "common/hf_config.h"
#include "common/logging.h"
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
  int act_bits = 0;
  bool json = false;
};

absl::Status RunEval(const EvalArgs& a) {
  QCAL_ASSIGN_OR_RETURN(kernels::BackendOptions bo, a.dev.ToOptions());
  QCAL_ASSIGN_OR_RETURN(auto backend, kernels::CreateBackend(bo));
  QCAL_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(a.model));
  engine::LoadOptions load;
  load.act_bits = a.act_bits;
  // Evaluation runs layer-major, one block resident at a time (DESIGN section 2, "Memory").
  load.residency = engine::BlockResidency::kStreaming;
  QCAL_ASSIGN_OR_RETURN(auto model, engine::LoadCheckpoint(a.model, backend.get(), load));
  QCAL_RETURN_IF_ERROR(Annotate(CheckSequenceLength(model->config(), a.seq_len), a.model));
  QCAL_ASSIGN_OR_RETURN(std::string text, LoadCorpusText(a.text));
  QCAL_ASSIGN_OR_RETURN(std::vector<int> tokens, tokenizer->Encode(text));
  QCAL_ASSIGN_OR_RETURN(
      TokenWindows windows,
      MakeEvalWindows(tokens, a.seq_len, a.max_windows, model->config().bos_token_id, a.text));
  spdlog::info("eval: {} windows of {} tokens on {} ({} threads)", windows.inputs.size(), a.seq_len,
               backend->name(), backend->threads());
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
  app.add_option("--text", a->text, "Evaluation text (.txt, or .jsonl with a \"text\" field)")
      ->required();
  app.add_option("--seq-len", a->seq_len, "Window length L in tokens")
      ->required()
      ->check(CLI::Range(2, 1 << 20));
  app.add_option("--max-windows", a->max_windows, "Keep only the first K windows (default: all)")
      ->check(CLI::PositiveNumber);
  a->dev.Add(app);
  app.add_option("--act-bits", a->act_bits,
                 "Activation bits of every block linear (4..8, or 16 for off); default: what the "
                 "checkpoint records")
      ->check(CLI::IsMember({4, 5, 6, 7, 8, 16}));
  app.add_flag("--json", a->json,
               "Print one JSON object: perplexity, nll, tokens, windows, seconds");
  return [a] { return RunEval(*a); };
}

}  // namespace qcal::cli
