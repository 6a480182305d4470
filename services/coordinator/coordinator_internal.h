// Helpers that several of the coordinator's implementation files share (coordinator.cc defines
// them). Not part of the coordinator's interface: only services/coordinator/*.cc include this.
#pragma once

#include <filesystem>
#include <string>

#include "qcal/v1/types.pb.h"
#include "services/coordinator/scheduler.h"
#include "services/engine/recipe.h"

namespace qcal::coordinator::internal {

// The job state's metrics label: its name in lower case.
std::string StateLabel(v1::JobState state);

// fsyncs a directory so that a rename inside it is durable.
void SyncDir(const std::filesystem::path& dir);

// Whether a job runs the gradient pass: for output-adaptive Hessians, or for the Fisher that
// saliency retraining needs (an unset hessian, from a spec stored before the key existed, is the
// default "layer").
bool RunsGradientPass(const engine::Recipe& recipe);
bool RunsGradientPass(const v1::JobSpec& spec);

// Whether `p` is a directory with at least one entry.
bool IsNonEmptyDir(const std::filesystem::path& p);

// The gang a spec asks for: workers.min (at least 1) to workers.max (at least min).
GangSize GangSizeOf(const v1::JobSpec& spec);

// Removes the directories left empty under `dir` (deepest first), not `dir` itself.
void RemoveEmptyDirs(const std::filesystem::path& dir);

}  // namespace qcal::coordinator::internal
