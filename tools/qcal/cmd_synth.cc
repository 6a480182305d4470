// qcal synth: (implemented by services/engine/synth; this file maps flags onto its options).
#include "tools/qcal/commands.h"

namespace qcal::cli {

RunFn AddSynth(CLI::App& app) {
  return [] { return absl::UnimplementedError("qcal synth is not built yet"); };
}

}  // namespace qcal::cli
