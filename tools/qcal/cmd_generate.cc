// qcal generate: greedy decoding from BOS (plus an optional prompt), decoded with the model's
// tokenizer and cut at the first of its EOS ids (generation_config.json's list included).
#include <algorithm>
#include <cstdio>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "common/hf_config.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/tokenizer.h"
#include "kernels/backend.h"
#include "services/engine/evaluate.h"
#include "services/engine/export/checkpoint_loader.h"
#include "services/engine/model.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct GenerateArgs {
  std::string model;
  std::string prompt;
  int max_new_tokens = 64;
  DeviceFlags dev;
  KernelFlags kernel_flags;
  int act_bits = 0;
};

absl::Status RunGenerate(const GenerateArgs& a) {
  // The ABQ checks run on the host, before any device is touched.
  QCAL_ASSIGN_OR_RETURN(std::optional<kernels::AbqKernel> abq_kernel,
                        a.kernel_flags.Check(a.model, a.act_bits));
  QCAL_ASSIGN_OR_RETURN(kernels::BackendOptions bo, a.dev.ToOptions());
  QCAL_ASSIGN_OR_RETURN(auto backend, kernels::CreateBackend(bo));
  if (abq_kernel && backend->device() == Device::kHost) {
    spdlog::warn("--kernels abq on the CPU backend runs the kernels' scalar reference (slow)");
  }
  QCAL_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(a.model));
  if (tokenizer->bos_id() < 0 && a.prompt.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(a.model,
                     ": the tokenizer has no BOS token (tokenizer_config.json), so "
                     "generation needs a --prompt"));
  }
  QCAL_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(a.model));
  engine::LoadOptions load;
  load.act_bits = a.act_bits;
  load.abq_kernel = abq_kernel;
  // The whole model on the device when it fits; otherwise every token streams every block.
  load.residency = engine::ResidencyToFit(config, *backend);
  if (load.residency == engine::BlockResidency::kStreaming) {
    spdlog::warn(
        "generate: the model does not fit in {} memory; streaming its blocks for every "
        "token (slow)",
        backend->name());
  }
  QCAL_ASSIGN_OR_RETURN(auto model, engine::LoadCheckpoint(a.model, backend.get(), load));
  std::vector<int> prompt_ids;
  if (!a.prompt.empty()) {
    QCAL_ASSIGN_OR_RETURN(prompt_ids, tokenizer->Encode(a.prompt));
  }
  engine::GenerateOptions go;
  go.max_new_tokens = a.max_new_tokens;
  go.bos_id = tokenizer->bos_id();
  go.eos_ids = tokenizer->eos_ids();
  QCAL_ASSIGN_OR_RETURN(std::vector<int> ids, engine::GenerateGreedy(*model, prompt_ids, go));
  const std::vector<int>& eos = tokenizer->eos_ids();
  ids.erase(std::find_first_of(ids.begin(), ids.end(), eos.begin(), eos.end()), ids.end());
  QCAL_ASSIGN_OR_RETURN(std::string text, tokenizer->Decode(ids));
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fputc('\n', stdout);
  return absl::OkStatus();
}

}  // namespace

RunFn AddGenerate(CLI::App& app) {
  auto a = std::make_shared<GenerateArgs>();
  app.add_option("--model", a->model, "Model directory (Hugging Face layout)")->required();
  app.add_option("--prompt", a->prompt, "Text to continue (default: none, start from BOS)");
  app.add_option("--max-new-tokens", a->max_new_tokens, "Tokens to generate at most")
      ->required()
      ->check(CLI::Range(0, 1 << 20));
  a->dev.Add(app);
  a->kernel_flags.Add(app);
  app.add_option("--act-bits", a->act_bits,
                 "Activation bits of every block linear (4..8, or 16 for off); default: what the "
                 "checkpoint records")
      ->check(CLI::IsMember({4, 5, 6, 7, 8, 16}));
  return [a] { return RunGenerate(*a); };
}

}  // namespace qcal::cli
