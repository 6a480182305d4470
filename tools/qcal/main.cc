// qcal: the command-line front end.
#include <cstdio>
#include <map>
#include <optional>
#include <string>

#include "common/cli_parse.h"
#include "common/logging.h"
#include "tools/qcal/commands.h"

int main(int argc, char** argv) {
  CLI::App app{"qcal: calibration and quantization for Llama-family language models"};
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every subcommand");
  bool verbose = false;
  app.add_flag("-v,--verbose", verbose, "Verbose logging on stderr");

  std::map<CLI::App*, qcal::cli::RunFn> commands;
  auto add = [&](const char* name, const char* help, qcal::cli::RunFn (*fn)(CLI::App&)) {
    CLI::App* sub = app.add_subcommand(name, help);
    commands[sub] = fn(*sub);
  };
  add("eval", "Perplexity of a model on a text (DESIGN section 4 protocol)", qcal::cli::AddEval);
  add("generate", "Greedy text generation", qcal::cli::AddGenerate);
  add("tokenize", "Token ids (or their number) of a text file under a model's tokenizer",
      qcal::cli::AddTokenize);
  add("quantize", "Quantize a checkpoint locally (RTN or GPTQ) and export it",
      qcal::cli::AddQuantize);
  add("synth",
      "Write a synthetic checkpoint (Llama, Llama 3, Qwen2, Qwen3, Mistral or a mixture of "
      "experts: --arch) with a trained tokenizer",
      qcal::cli::AddSynth);
#if QCAL_WITH_SERVICE
  add("submit", "Submit a quantization job to a qcal-coordinator", qcal::cli::AddSubmit);
  add("status", "Show one job of a qcal-coordinator", qcal::cli::AddStatus);
  add("list", "List the jobs of a qcal-coordinator", qcal::cli::AddList);
  add("cancel", "Cancel a job (at the next block boundary when running)", qcal::cli::AddCancel);
  add("watch", "Follow a job's progress until it finishes", qcal::cli::AddWatch);
#endif
  add("bench",
      "Benchmarks on synthetic weights (no disk I/O): a whole quantization job of a 7B-, 13B- "
      "or 70B-shaped or mixture-of-experts model (--shape, --recipe; default GPTQ W4 g128), "
      "error reconstruction (--er), the ABQ GEMMs (--abq) or decoding (--decode)",
      qcal::cli::AddBench);

  if (const std::optional<int> status = qcal::ParseCommandLine(app, argc, argv, "qcal")) {
    return *status;
  }
  qcal::InitLogging(verbose);
  for (auto& [sub, run] : commands) {
    if (sub->parsed()) {
      absl::Status st = run();
      if (!st.ok()) return qcal::cli::ReportError(st);
      return 0;
    }
  }
  return 1;
}
