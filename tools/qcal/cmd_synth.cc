// qcal synth: writes a synthetic checkpoint (services/engine/synth); this file maps flags onto
// SynthOptions and prints the result.
#include <cstdio>
#include <memory>

#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/engine/synth/synthetic_checkpoint.h"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct SynthArgs {
  std::string out;
  std::string preset = "tiny";
  uint64_t seed = 0;
  bool overwrite = false;
  bool json = false;
};

absl::Status RunSynth(const SynthArgs& a) {
  engine::SynthOptions options;
  options.out_dir = a.out;
  QCAL_ASSIGN_OR_RETURN(options.preset, engine::ParseSynthPreset(a.preset));
  options.seed = a.seed;
  options.overwrite = a.overwrite;
  QCAL_ASSIGN_OR_RETURN(engine::SynthResult r, engine::WriteSyntheticCheckpoint(options));
  if (a.json) {
    nlohmann::ordered_json j;
    j["out"] = a.out;
    j["preset"] = a.preset;
    j["seed"] = a.seed;
    j["parameters"] = r.num_parameters;
    j["outlier_channels"] = r.outlier_channels;
    nlohmann::ordered_json files = nlohmann::ordered_json::object();
    for (const engine::SynthFile& f : r.files) {
      files[f.name] = {{"bytes", f.bytes}, {"sha256", f.sha256}};
    }
    j["files"] = files;
    std::printf("%s\n", j.dump().c_str());
  }
  return absl::OkStatus();
}

}  // namespace

RunFn AddSynth(CLI::App& app) {
  auto a = std::make_shared<SynthArgs>();
  app.add_option("--out", a->out, "Output directory (Hugging Face layout)")->required();
  app.add_option("--preset", a->preset, "Architecture: tiny (default) or small");
  app.add_option("--seed", a->seed, "Seed of the weights and the generated texts (default 0)")
      ->check([](const std::string& v) {
        // CLI11 would wrap "-1" to 2^64 - 1.
        return !v.empty() && v[0] == '-' ? std::string("must be a non-negative integer")
                                         : std::string();
      });
  app.add_flag("--overwrite", a->overwrite, "Replace an existing non-empty output directory");
  app.add_flag("--json", a->json,
               "Print one JSON object: out, preset, seed, parameters, outlier_channels, files");
  return [a] { return RunSynth(*a); };
}

}  // namespace qcal::cli
