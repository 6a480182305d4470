#include "services/engine/oac/oac_job.h"

#include <sys/statvfs.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/status.h"
#include "services/engine/gang/exchange.h"
#include "services/engine/pipeline.h"

namespace qcal::engine {
namespace fs = std::filesystem;

absl::StatusOr<GradientChunks> GradientChunksOf(const std::vector<std::vector<int>>& samples,
                                                ChunkRange chunks) {
  if (samples.empty()) return absl::InvalidArgumentError("no calibration samples");
  GradientChunks out;
  out.seq_len = static_cast<int>(samples[0].size());
  out.total_chunks = NumChunks(static_cast<int>(samples.size()));
  if (chunks.begin < 0 || chunks.end < chunks.begin || chunks.end > out.total_chunks) {
    return absl::InvalidArgumentError(absl::StrCat("chunks [", chunks.begin, ", ", chunks.end,
                                                   ") outside the ", out.total_chunks,
                                                   " chunks of the calibration set"));
  }
  out.first_chunk = chunks.begin;
  for (int c = chunks.begin; c < chunks.end; ++c) {
    const size_t c0 = static_cast<size_t>(c) * kCalibChunk;
    const size_t c1 = std::min(samples.size(), c0 + kCalibChunk);
    std::vector<int32_t> ids;
    for (size_t i = c0; i < c1; ++i) {
      if (static_cast<int>(samples[i].size()) != out.seq_len) {
        return absl::InvalidArgumentError("calibration samples must have equal length");
      }
      ids.insert(ids.end(), samples[i].begin(), samples[i].end());
    }
    out.ids.push_back(std::move(ids));
    out.chunk_batch.push_back(static_cast<int>(c1 - c0));
  }
  return out;
}

GradientPassOptions GradientPassOptionsOf(const Recipe& recipe, const std::string& scratch_dir) {
  GradientPassOptions o;
  o.kind = recipe.GradientPassKind();
  o.fisher = recipe.NeedsFisher();
  o.scratch_dir = scratch_dir;
  return o;
}

int64_t OwnedOacBytes(const ModelConfig& config, const GangPlan& plan, bool fisher) {
  int64_t per_block = 0;
  for (LinearKind k : kAllLinears) {
    if (!plan.Owns(k)) continue;
    const auto [d_out, d_in] = LinearShape(config, k);
    per_block += LinearOacBytes(d_out, d_in, fisher);
  }
  return per_block * config.num_layers;
}

absl::Status CheckOacStorage(const Recipe& recipe, int64_t bytes, const std::string& dir) {
  struct statvfs fs_stats;
  if (statvfs(dir.c_str(), &fs_stats) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir, ": cannot read the free space of the scratch directory: ", std::strerror(errno)));
  }
  const int64_t free_bytes =
      static_cast<int64_t>(fs_stats.f_bavail) * static_cast<int64_t>(fs_stats.f_frsize);
  if (bytes <= free_bytes) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "recipe key \"hessian\" is %s: the gradient pass stores %d bytes (%.2f GiB) of statistics, "
      "but the scratch directory %s has %d bytes (%.2f GiB) free; give the job a larger scratch "
      "directory (a 70B model needs cluster storage, DESIGN section 2)",
      RecipeName(recipe.hessian), bytes, bytes / double(1 << 30), dir, free_bytes,
      free_bytes / double(1 << 30)));
}

std::string OacFilePath(const std::string& dir, int block, LinearKind kind) {
  return (fs::path(dir) / absl::StrFormat("%06d-%02d.safetensors", block, static_cast<int>(kind)))
      .string();
}

namespace {

// A host copy of t in the backend's host buffers (AllocHost: page-locked on a device backend).
absl::StatusOr<Tensor> ToHostBuffer(kernels::Backend& backend, const Tensor& t) {
  if (t.device() == Device::kHost) return t.Clone();
  QCAL_ASSIGN_OR_RETURN(Tensor host, backend.AllocHost(t.dtype(), t.shape()));
  QCAL_RETURN_IF_ERROR(backend.Copy(t, host));
  return host;
}

}  // namespace

int64_t OacMemoryStore::DeviceBytesPerBlock(const ModelConfig& config, bool fisher) {
  int64_t bytes = 0;
  for (LinearKind k : kAllLinears) {
    const auto [d_out, d_in] = LinearShape(config, k);
    bytes += (d_in * d_in + (fisher ? d_out * d_in : 0)) * int64_t{sizeof(float)};
  }
  return bytes;
}

OacSink OacMemoryStore::Sink(kernels::Backend& backend, int total_chunks, bool on_device) {
  return [this, &backend, total_chunks, on_device](int block,
                                                   BlockOacPartials partials) -> absl::Status {
    for (LinearKind k : kAllLinears) {
      auto done = CompleteTree(std::move(partials[static_cast<size_t>(k)]), total_chunks,
                               LinearOacCombine(backend));
      if (!done.ok()) {
        return Annotate(done.status(),
                        absl::StrCat("output-adaptive statistics of ", LinearPrefix(block, k)));
      }
      if (on_device) {
        bytes_ += done->hessian.nbytes() + (done->fisher.defined() ? done->fisher.nbytes() : 0);
        stats_[{block, k}] = *std::move(done);
        continue;
      }
      // Into the backend's page-locked host memory: a 7B model's statistics are 26 GiB, which
      // pageable copies move at a third of the bus's speed, twice (here and in the solve).
      LinearOac host;
      QCAL_ASSIGN_OR_RETURN(host.hessian, ToHostBuffer(backend, done->hessian));
      bytes_ += host.hessian.nbytes();
      if (done->fisher.defined()) {
        QCAL_ASSIGN_OR_RETURN(host.fisher, ToHostBuffer(backend, done->fisher));
        bytes_ += host.fisher.nbytes();
      }
      stats_[{block, k}] = std::move(host);
    }
    return absl::OkStatus();
  };
}

OacSource OacMemoryStore::Source() const {
  return [this](int block, LinearKind kind) -> absl::StatusOr<LinearOac> {
    auto it = stats_.find({block, kind});
    if (it == stats_.end()) {
      return absl::NotFoundError(
          absl::StrCat("the gradient pass left no statistics for ", LinearPrefix(block, kind)));
    }
    return it->second;
  };
}

nlohmann::ordered_json GradientPassJson(const GradientPassStats& s) {
  nlohmann::ordered_json j;
  j["seconds"] = s.seconds;
  j["forward_seconds"] = s.forward_seconds;
  j["backward_seconds"] = s.backward_seconds;
  j["hessian_seconds"] = s.hessian_seconds;
  j["head_seconds"] = s.head_seconds;
  j["sink_seconds"] = s.sink_seconds;
  j["loss"] = s.loss;
  j["tokens"] = s.tokens;
  j["boundary_every"] = s.boundary_every;
  if (s.peak_device_bytes >= 0) j["peak_device_bytes"] = s.peak_device_bytes;
  return j;
}

// ---- JobSession's gradient pass (pipeline.h).

bool JobSession::NeedsGradientPass() const {
  return options_.recipe.RunsGradientPass() && !has_oac_;
}

// Per block, each linear's partials go to its owner (all sends of the block before its receives,
// so no rank waits on a message that waits on it); the owner completes the canonical reduction
// and writes the linear's file before the pass moves down.
absl::StatusOr<std::vector<OacFile>> JobSession::RunGradientPass(
    Transport* transport, const GangBlockOptions& gang_options) {
  const Recipe& recipe = options_.recipe;
  if (!recipe.RunsGradientPass()) {
    return absl::FailedPreconditionError(
        "recipe key \"hessian\" is layer and nothing needs the Fisher: the job has no gradient "
        "pass");
  }
  if (next_block() != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the gradient pass runs on the full-precision model before block 0, not at block ",
        next_block()));
  }
  if (transport == nullptr && gang_.world > 1) {
    return absl::FailedPreconditionError(absl::StrCat("rank ", gang_.rank, " of a gang of ",
                                                      gang_.world,
                                                      " runs the gradient pass without peers"));
  }
  QCAL_RETURN_IF_ERROR(gang_options.Validate());
  const GradientPassOptions pass_options = GradientPassOptionsOf(recipe, scratch_);
  const ModelConfig& cfg = config();
  QCAL_RETURN_IF_ERROR(
      CheckOacStorage(recipe, OwnedOacBytes(cfg, gang_, pass_options.fisher), scratch_));
  const std::string dir = (fs::path(scratch_) / "oac").string();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat(dir, ": cannot create the gradient pass's directory: ", ec.message()));
  }
  const int rank = gang_.rank;
  std::vector<OacFile> files;
  auto receive = [&](int b, LinearKind k, int from) -> absl::StatusOr<std::string> {
    const MessageKey key{b, kStepGradientPass, MessageKind::kOacPartials, static_cast<int>(k),
                         from};
    auto payload = transport->Receive(key, gang_options.receive_timeout);
    if (!payload.ok()) {
      return Annotate(payload.status(),
                      absl::StrCat("rank ", rank, " receiving ", DescribeKey(key)));
    }
    return payload;
  };
  auto sink = [&](int b, BlockOacPartials partials) -> absl::Status {
    if (gang_options.gradient_block) QCAL_RETURN_IF_ERROR(gang_options.gradient_block(b));
    for (LinearKind k : kAllLinears) {
      const int owner = gang_.OwnerOf(k);
      if (owner == rank) continue;
      const auto [d_out, d_in] = LinearShape(cfg, k);
      QCAL_ASSIGN_OR_RETURN(std::string bytes,
                            SerializeOacPartials(*backend_, k, d_out, d_in, pass_options.fisher,
                                                 partials[static_cast<size_t>(k)]));
      const MessageKey key{b, kStepGradientPass, MessageKind::kOacPartials, static_cast<int>(k),
                           rank};
      QCAL_RETURN_IF_ERROR(
          Annotate(transport->Send(owner, key, std::move(bytes)),
                   absl::StrCat("sending ", DescribeKey(key), " to rank ", owner)));
      partials[static_cast<size_t>(k)].clear();
    }
    for (LinearKind k : kAllLinears) {
      if (!gang_.Owns(k)) continue;
      const auto [d_out, d_in] = LinearShape(cfg, k);
      TreePartials<LinearOac> all = std::move(partials[static_cast<size_t>(k)]);
      for (int q = 0; q < gang_.world; ++q) {
        if (q == rank) continue;
        QCAL_ASSIGN_OR_RETURN(std::string bytes, receive(b, k, q));
        QCAL_ASSIGN_OR_RETURN(
            TreePartials<LinearOac> theirs,
            ParseOacPartials(*backend_, k, d_out, d_in, pass_options.fisher, bytes));
        for (auto& p : theirs) all.push_back(std::move(p));
      }
      const std::string name = LinearPrefix(b, k);
      auto done = CompleteTree(std::move(all), gang_.total_chunks, LinearOacCombine(*backend_));
      if (!done.ok()) {
        return Annotate(done.status(), absl::StrCat("output-adaptive statistics of ", name));
      }
      LinearOac host;
      QCAL_ASSIGN_OR_RETURN(host.hessian, backend_->ToHost(done->hessian));
      if (done->fisher.defined()) {
        QCAL_ASSIGN_OR_RETURN(host.fisher, backend_->ToHost(done->fisher));
      }
      OacFile f;
      f.block = b;
      f.kind = k;
      f.path = OacFilePath(dir, b, k);
      QCAL_ASSIGN_OR_RETURN(f.sha256, WriteLinearOac(f.path, pass_options.kind, host));
      f.bytes = static_cast<int64_t>(fs::file_size(f.path, ec));
      if (ec) return absl::DataLossError(absl::StrCat(f.path, ": ", ec.message()));
      files.push_back(f);
    }
    return absl::OkStatus();
  };
  if (log_) {
    log_(absl::StrFormat("gradient pass (%s%s): chunks [%d, %d) of %d, %d blocks",
                         RecipeName(pass_options.kind), pass_options.fisher ? " and Fisher" : "",
                         gang_.local().begin, gang_.local().end, gang_.total_chunks, num_blocks()));
  }
  QCAL_ASSIGN_OR_RETURN(GradientPassStats stats, engine::RunGradientPass(*model_, gradient_chunks_,
                                                                         pass_options, sink, log_));
  gradient_pass_ = GradientPassJson(stats);
  int64_t bytes = 0;
  for (const OacFile& f : files) bytes += f.bytes;
  gradient_pass_["files"] = files.size();
  gradient_pass_["file_bytes"] = bytes;
  if (log_) {
    log_(absl::StrFormat("gradient pass: rank %d wrote %d statistics files (%.3f GiB)", rank,
                         files.size(), bytes / double(1 << 30)));
  }
  oac_files_.clear();
  for (const OacFile& f : files) oac_files_[{f.block, f.kind}] = f;
  has_oac_ = true;
  return files;
}

absl::Status JobSession::RestoreGradientPass(std::vector<OacFile> files) {
  if (!options_.recipe.RunsGradientPass()) {
    return absl::FailedPreconditionError(
        "recipe key \"hessian\" is layer and nothing needs the Fisher: the job has no gradient "
        "pass to restore");
  }
  std::map<std::pair<int, LinearKind>, OacFile> by_linear;
  for (OacFile& f : files) {
    if (f.block < 0 || f.block >= num_blocks() || static_cast<int>(f.kind) < 0 ||
        static_cast<int>(f.kind) >= kNumLinears) {
      return absl::InvalidArgumentError(absl::StrCat("restore: gradient-pass file ", f.path,
                                                     " names block ", f.block, " linear ",
                                                     static_cast<int>(f.kind)));
    }
    const std::pair<int, LinearKind> key{f.block, f.kind};
    if (!by_linear.emplace(key, std::move(f)).second) {
      return absl::InvalidArgumentError(absl::StrCat("restore: two gradient-pass files for ",
                                                     LinearPrefix(key.first, key.second)));
    }
  }
  oac_files_ = std::move(by_linear);
  has_oac_ = true;
  gradient_pass_ = nlohmann::ordered_json{{"restored_files", oac_files_.size()}};
  return absl::OkStatus();
}

OacSource JobSession::OacFiles() const {
  return [this](int block, LinearKind kind) -> absl::StatusOr<LinearOac> {
    auto it = oac_files_.find({block, kind});
    if (it == oac_files_.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("rank ", gang_.rank, " has no gradient-pass file for ",
                       LinearPrefix(block, kind), " (restore every linear it owns)"));
    }
    const auto [d_out, d_in] = LinearShape(config(), kind);
    return ReadLinearOac(it->second.path, options_.recipe.GradientPassKind(), d_out, d_in,
                         it->second.sha256);
  };
}

}  // namespace qcal::engine
