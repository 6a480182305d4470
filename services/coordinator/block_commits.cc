// Layer commits and checkpoints: CommitBlock (each owner's layers, the block's done mark), the
// advance of the usable checkpoint boundary, and what a resuming worker reads back.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/files.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/coordinator_internal.h"
#include "services/coordinator/store_schema.h"
#include "services/engine/gang/plan.h"
#include "services/engine/model.h"
#include "services/engine/pipeline.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

using store::v1::ActivationRecord;
using store::v1::ArtifactRecord;
using store::v1::BlockRecord;
using store::v1::LayerDigest;

// Writes `bytes` to `path` through a temporary file, fsynced (WriteStringToFile), renamed into
// place. Errors are UNAVAILABLE, so that the committing worker retries.
absl::Status WriteFileSynced(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp";
  if (absl::Status s = WriteStringToFile(tmp, bytes); !s.ok()) {
    return absl::UnavailableError(s.message());
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat(path, ": rename failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<v1::CommitBlockResponse> Coordinator::CommitBlock(
    const v1::CommitBlockHeader& header, const std::vector<std::string>& artifacts) {
  const int b = header.block();
  const int n = header.layers_size();
  // The content checks need no lock.
  if (n < 1 || static_cast<int>(artifacts.size()) != n || header.layer_index_size() != n ||
      (header.layer_expert_size() != 0 && header.layer_expert_size() != n)) {
    return absl::InvalidArgumentError(
        absl::StrCat("block ", b, ": ", n, " layers with ", header.layer_index_size(),
                     " layer indices and ", header.layer_expert_size(),
                     " experts (at least one layer, one index each, and one "
                     "expert each or none)"));
  }
  // Each layer as the engine names it: its kind and, in an MoE block, its expert.
  std::vector<engine::LinearId> ids;
  std::vector<LayerDigest> digests;
  std::vector<engine::LayerReport> reports;
  for (int i = 0; i < n; ++i) {
    const v1::LayerManifest& m = header.layers(i);
    const int l = header.layer_index(i);
    const int expert = header.layer_expert_size() == n ? header.layer_expert(i) : engine::kNoExpert;
    if (l < 0 || l >= engine::kNumLinears || expert < engine::kSharedExpert) {
      return absl::InvalidArgumentError(
          absl::StrCat("block ", b, ": layer index ", l, " (expert ", expert, ") is out of range"));
    }
    ids.emplace_back(engine::kAllLinears[static_cast<size_t>(l)], expert);
    const std::string sha = Sha256Hex(artifacts[i]);
    if (sha != m.sha256() || static_cast<int64_t>(artifacts[i].size()) != m.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat(m.name(), ": the upload does not match its manifest (sha256 ", sha, ")"));
    }
    const nlohmann::json report_json =
        nlohmann::json::parse(m.report_json(), nullptr, /*allow_exceptions=*/false);
    absl::StatusOr<engine::LayerReport> report =
        report_json.is_object() ? engine::LayerReportFromJson(report_json)
                                : absl::InvalidArgumentError("not a JSON object");
    if (!report.ok() || report->name != m.name()) {
      return absl::InvalidArgumentError(absl::StrCat(m.name(), ": malformed report entry"));
    }
    reports.push_back(*report);
    LayerDigest& d = digests.emplace_back();
    d.set_name(m.name());
    d.set_sha256(sha);
    d.set_size(m.size());
    d.set_report_sha256(Sha256Hex(m.report_json()));
  }

  absl::MutexLock lock(&mu_);
  QCAL_ASSIGN_OR_RETURN(const int rank,
                        GangRank(header.lease(), header.job_id(), header.gang_epoch()));
  JobRecord* rec = &jobs_.at(header.job_id());
  // Copied: assigning *rec below replaces its Job message.
  const v1::Job job = rec->job();
  const std::string& id = job.job_id();
  v1::CommitBlockResponse response;
  if (job.cancel_requested()) {
    QCAL_RETURN_IF_ERROR(
        FinishJob(*rec, v1::JOB_STATE_CANCELLED, "cancelled by a client", nullptr));
    response.set_cancel_job(true);
    return response;
  }
  // A gang's owners commit independently: one block past the committed prefix may arrive while
  // another owner's layers of the block before are still on their way.
  const int ahead = job.gang_size() > 1 ? 1 : 0;
  if (b < 0 || b >= job.num_blocks() || b > job.blocks_done() + ahead) {
    return absl::FailedPreconditionError(absl::StrCat("job ", id, ": block ", b,
                                                      " is out of order (", job.blocks_done(),
                                                      " of ", job.num_blocks(), " committed)"));
  }
  QCAL_ASSIGN_OR_RETURN(const ModelConfig* config, ConfigOf(*rec));
  // The block's linears (engine::BlockLinears order: the store's layer indices), and each
  // committed layer's place among them.
  const std::vector<engine::LinearId> linears = engine::BlockLinears(*config, b);
  std::vector<int> slots;
  const v1::GangMember& me = job.gang(rank);
  for (int i = 0; i < n; ++i) {
    const engine::LinearId& lid = ids[static_cast<size_t>(i)];
    const auto at = std::find(linears.begin(), linears.end(), lid);
    const std::string expected = at == linears.end() ? "" : engine::LinearPrefix(*config, b, lid);
    const int slot = static_cast<int>(at - linears.begin());
    if (at == linears.end() || std::find(slots.begin(), slots.end(), slot) != slots.end()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "block ", b, ": layer ", header.layers(i).name(), " (index ", static_cast<int>(lid.kind),
          ", expert ", lid.expert, ") is not a linear of the block or repeated"));
    }
    if (header.layers(i).name() != expected) {
      return absl::InvalidArgumentError(absl::StrCat("block ", b, " layer ", slot, " is \"",
                                                     header.layers(i).name(), "\", expected \"",
                                                     expected, "\""));
    }
    slots.push_back(slot);
    // Dense linears by their kind; an expert's by its unit, whose three linears have one owner.
    const bool owned =
        lid.expert == engine::kNoExpert
            ? std::find(me.owned_linears().begin(), me.owned_linears().end(),
                        static_cast<int>(lid.kind)) != me.owned_linears().end()
            : std::find(me.owned_expert_units().begin(), me.owned_expert_units().end(),
                        engine::ExpertUnitOf(*config, lid.expert)) != me.owned_expert_units().end();
    if (!owned) {
      return absl::FailedPreconditionError(
          absl::StrCat("job ", id, ": rank ", rank, " (", me.worker_id(), ") does not own ",
                       digests[static_cast<size_t>(i)].name(), " under gang epoch ",
                       job.gang_epoch(), "; only its owner commits it"));
    }
  }

  // Layers committed before (an earlier attempt) must be reproduced exactly.
  std::vector<bool> fresh(static_cast<size_t>(n), false);
  std::vector<std::optional<LayerDigest>> in(linears.size());
  for (int l = 0; l < static_cast<int>(linears.size()); ++l) {
    QCAL_ASSIGN_OR_RETURN(auto stored, GetRecord<store::v1::LayerRecord>(*store_, Column::kTasks,
                                                                         LayerKey(id, b, l)));
    if (stored.has_value()) in[static_cast<size_t>(l)] = stored->digest();
  }
  for (int i = 0; i < n; ++i) {
    const LayerDigest& now = digests[static_cast<size_t>(i)];
    const std::optional<LayerDigest>& then = in[static_cast<size_t>(slots[static_cast<size_t>(i)])];
    if (!then.has_value()) {
      fresh[static_cast<size_t>(i)] = true;
      continue;
    }
    if (now.sha256() != then->sha256() || now.report_sha256() != then->report_sha256()) {
      const std::string error =
          absl::StrCat("determinism error: ", now.name(), " recomputed with sha256 ", now.sha256(),
                       " (report ", now.report_sha256(), ") but committed with ", then->sha256(),
                       " (report ", then->report_sha256(), ")");
      QCAL_RETURN_IF_ERROR(FinishJob(*rec, v1::JOB_STATE_FAILED, error, nullptr));
      return absl::AbortedError(error);
    }
  }
  const bool any_fresh = std::find(fresh.begin(), fresh.end(), true) != fresh.end();
  QCAL_ASSIGN_OR_RETURN(auto done_mark,
                        GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(id, b)));
  if (!any_fresh) {
    response.set_already_committed(true);
    response.set_block_complete(done_mark.has_value());
    Emit(*rec, absl::StrCat("block ", b + 1, "/", job.num_blocks(),
                            " recomputed: matches the committed artifacts (rank ", rank, ")"));
    return response;
  }

  QCAL_RETURN_IF_ERROR(faults_->Hit("precommit", b));
  // The artifacts' bytes go to files first (synced); the batch then records them. A crash between
  // the two leaves files that no record names, which the next commit of the block overwrites.
  {
    std::error_code ec;
    fs::create_directories(ArtifactDir(id), ec);
    if (ec) {
      return absl::UnavailableError(absl::StrCat(ArtifactDir(id), ": ", ec.message()));
    }
    for (int i = 0; i < n; ++i) {
      if (!fresh[static_cast<size_t>(i)]) continue;
      const fs::path path =
          fs::path(options_.data_dir) / ArtifactFile(id, b, slots[static_cast<size_t>(i)]);
      QCAL_RETURN_IF_ERROR(WriteFileSynced(path.string(), artifacts[static_cast<size_t>(i)]));
    }
    internal::SyncDir(ArtifactDir(id));
  }
  WriteBatch batch;
  for (int i = 0; i < n; ++i) {
    if (!fresh[static_cast<size_t>(i)]) continue;
    const int l = slots[static_cast<size_t>(i)];
    ArtifactRecord a;
    a.set_name(header.layers(i).name());
    a.set_file(ArtifactFile(id, b, l));
    a.set_report_json(header.layers(i).report_json());
    batch.Put(Column::kArtifacts, ArtifactKey(id, b, l), Encode(a));
    store::v1::LayerRecord lr;
    *lr.mutable_digest() = digests[static_cast<size_t>(i)];
    lr.set_worker_id(header.lease().worker_id());
    lr.set_gang_epoch(header.gang_epoch());
    batch.Put(Column::kTasks, LayerKey(id, b, l), Encode(lr));
    in[static_cast<size_t>(l)] = digests[static_cast<size_t>(i)];
  }
  const bool complete =
      std::all_of(in.begin(), in.end(), [](const auto& d) { return d.has_value(); });
  JobRecord updated = *rec;
  updated.mutable_job()->set_stage(v1::JOB_STAGE_QUANTIZING);
  std::vector<std::string> stale_files;
  if (complete && !done_mark.has_value()) {
    BlockRecord block;
    block.set_block(b);
    block.set_worker_id(header.lease().worker_id());
    block.set_epoch(header.lease().epoch());
    for (const auto& d : in) *block.add_layers() = *d;
    batch.Put(Column::kTasks, BlockKey(id, b), Encode(block));
    // The committed prefix grows over this block and any later one already done.
    int done = job.blocks_done();
    while (done < job.num_blocks()) {
      if (done != b) {
        QCAL_ASSIGN_OR_RETURN(auto mark,
                              GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(id, done)));
        if (!mark.has_value()) break;
      }
      ++done;
    }
    updated.mutable_job()->set_blocks_done(done);
    QCAL_RETURN_IF_ERROR(AdvanceCheckpoint(updated, nullptr, batch, &stale_files));
  }
  batch.Put(Column::kJobs, JobKey(id), Encode(updated));
  if (absl::Status injected = faults_->Hit("store", b); !injected.ok()) {
    // Behave exactly as a failed store write does.
    metrics_->ObserveStoreWrite(0, 0, false);
    store_failed_at_ = clock_->Now();
    SetServing(false);
    return absl::UnavailableError(absl::StrCat("store write failed: ", injected.message()));
  }
  QCAL_RETURN_IF_ERROR(Commit(batch));
  *rec = updated;
  std::error_code ec;
  for (const std::string& f : stale_files) fs::remove(f, ec);
  QCAL_RETURN_IF_ERROR(faults_->Hit("commit", b));
  response.set_block_complete(complete);
  if (rec->job().blocks_done() == rec->job().num_blocks()) scheduler_.SetExportOnly(id);

  for (int i = 0; i < n; ++i) {
    if (!fresh[static_cast<size_t>(i)]) continue;
    const engine::LayerReport& r = reports[static_cast<size_t>(i)];
    metrics_->ObserveLayer(header.layers(i).solve_seconds(), r.rel_error_rtn, r.rel_error,
                           r.reconstructed ? r.rel_error_er : -1.0);
  }
  metrics_->ObserveBlockExchange(rank, header.stats().exchange_bytes(),
                                 header.stats().reduction_wait_seconds());
  Live& live = live_[id];
  if (!complete || done_mark.has_value()) {
    // The dense linears by name, then the experts whose linears these are ("q_proj,o_proj,
    // experts 0,3,shared").
    std::string names;
    std::vector<std::string> experts;
    for (int i = 0; i < n; ++i) {
      if (!fresh[static_cast<size_t>(i)]) continue;
      const engine::LinearId& lid = ids[static_cast<size_t>(i)];
      if (lid.expert == engine::kNoExpert) {
        absl::StrAppend(&names, names.empty() ? "" : ",", engine::LinearName(lid.kind));
        continue;
      }
      const std::string e =
          lid.expert == engine::kSharedExpert ? "shared" : absl::StrCat(lid.expert);
      if (std::find(experts.begin(), experts.end(), e) == experts.end()) experts.push_back(e);
    }
    if (!experts.empty()) {
      absl::StrAppend(&names, names.empty() ? "" : ",", "experts ", absl::StrJoin(experts, ","));
    }
    Emit(*rec, absl::StrCat("block ", b + 1, "/", job.num_blocks(), ": ", names,
                            " committed by rank ", rank));
    return response;
  }
  metrics_->AddBlockCommitted();
  metrics_->ObserveStage("block", header.stats().seconds());
  live.block = b;
  if (header.stats().seconds() > 0) {
    live.block_seconds += header.stats().seconds();
    live.blocks_timed += 1;
    live.tokens_per_second =
        static_cast<double>(job.spec().samples()) * job.spec().seq_len() / header.stats().seconds();
    metrics_->SetCalibrationTokensPerSecond(live.tokens_per_second);
  }
  if (header.stats().hessian_seconds() > 0) {
    metrics_->SetHessianFlopsPerSecond(header.stats().hessian_flops() /
                                       header.stats().hessian_seconds());
  }
  Emit(*rec, absl::StrCat("block ", b + 1, "/", job.num_blocks(), " committed"));
  UpdateGauges();
  return response;
}

absl::Status Coordinator::AdvanceCheckpoint(JobRecord& updated, const ActivationRecord* added,
                                            WriteBatch& batch,
                                            std::vector<std::string>* stale_files) {
  v1::Job& job = *updated.mutable_job();
  const int total = engine::NumChunks(job.spec().samples());
  std::map<int, int> chunks;  // boundary -> chunks in
  std::vector<std::pair<std::string, ActivationRecord>> records;
  absl::Status decode_error;
  QCAL_RETURN_IF_ERROR(store_->Scan(Column::kActivations, JobScopedPrefix(job.job_id()),
                                    [&](const std::string& key, const std::string& value) {
                                      absl::StatusOr<ActivationRecord> a = Decode<ActivationRecord>(
                                          Column::kActivations, key, value);
                                      if (!a.ok()) {
                                        decode_error = a.status();
                                        return false;
                                      }
                                      chunks[a->block()]++;
                                      records.emplace_back(key, *std::move(a));
                                      return true;
                                    }));
  QCAL_RETURN_IF_ERROR(decode_error);
  if (added != nullptr) chunks[added->block()]++;
  int best = job.checkpoint_block();
  for (const auto& [block, count] : chunks) {
    if (count == total && block <= job.blocks_done()) best = std::max(best, block);
  }
  if (best == job.checkpoint_block()) return absl::OkStatus();
  job.set_checkpoint_block(best);
  for (const auto& [key, a] : records) {
    if (a.block() >= best) continue;
    batch.Delete(Column::kActivations, key);
    stale_files->push_back((fs::path(options_.data_dir) / a.file()).string());
  }
  return absl::OkStatus();
}

absl::StatusOr<ResumePlan> Coordinator::PrepareResume(const v1::FetchResumeRequest& request) {
  absl::MutexLock lock(&mu_);
  QCAL_ASSIGN_OR_RETURN(JobRecord * rec, HeldJob(request.lease(), request.job_id()));
  const std::string& job_id = request.job_id();
  const int total = engine::NumChunks(rec->job().spec().samples());
  if (request.chunk_begin() < 0 || request.chunk_begin() > request.chunk_end() ||
      request.chunk_end() > total) {
    return absl::InvalidArgumentError(absl::StrCat("chunks [", request.chunk_begin(), ", ",
                                                   request.chunk_end(), ") are not within [0, ",
                                                   total, ")"));
  }
  ResumePlan plan;
  const int k = rec->job().checkpoint_block();
  plan.header.set_checkpoint_block(k);
  if (k == 0) return plan;
  for (int c = request.chunk_begin(); c < request.chunk_end(); ++c) {
    const std::string key = ActivationKey(job_id, k, c);
    QCAL_ASSIGN_OR_RETURN(auto act,
                          GetRecord<ActivationRecord>(*store_, Column::kActivations, key));
    if (!act.has_value()) {
      return absl::DataLossError(
          absl::StrCat("job ", job_id, ": checkpoint at block ", k, " lacks chunk ", c));
    }
    v1::ChunkFile& f = *plan.header.add_chunks();
    f.set_chunk(c);
    f.set_sha256(act->sha256());
    f.set_size(act->size());
    plan.chunk_paths.push_back((fs::path(options_.data_dir) / act->file()).string());
  }
  if (!request.artifacts()) return plan;
  for (int b = 0; b < k; ++b) {
    QCAL_ASSIGN_OR_RETURN(auto block,
                          GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(job_id, b)));
    if (!block.has_value()) {
      return absl::DataLossError(absl::StrCat("job ", job_id, ": block ", b, " has no record"));
    }
    v1::BlockManifest& bm = *plan.header.add_blocks();
    bm.set_block(b);
    for (int l = 0; l < block->layers_size(); ++l) {
      const std::string key = ArtifactKey(job_id, b, l);
      QCAL_ASSIGN_OR_RETURN(auto artifact,
                            GetRecord<ArtifactRecord>(*store_, Column::kArtifacts, key));
      if (!artifact.has_value() ||
          Sha256Hex(artifact->report_json()) != block->layers(l).report_sha256()) {
        return absl::DataLossError(absl::StrCat("store: artifact ", key, " is missing or corrupt"));
      }
      v1::LayerManifest& m = *bm.add_layers();
      m.set_name(block->layers(l).name());
      m.set_sha256(block->layers(l).sha256());
      m.set_size(block->layers(l).size());
      m.set_report_json(artifact->report_json());
    }
  }
  return plan;
}

absl::StatusOr<std::string> Coordinator::ArtifactBytes(const ArtifactRecord& artifact,
                                                       const std::string& sha256,
                                                       const std::string& key) const {
  std::string bytes = artifact.quantized();
  if (!artifact.file().empty()) {
    absl::StatusOr<std::string> read =
        ReadFileToString((fs::path(options_.data_dir) / artifact.file()).string());
    if (!read.ok()) {
      return absl::DataLossError(
          absl::StrCat("store: artifact ", key, ": ", read.status().message()));
    }
    bytes = *std::move(read);
  }
  if (Sha256Hex(bytes) != sha256) {
    return absl::DataLossError(absl::StrCat("store: artifact ", key, " is corrupt"));
  }
  return bytes;
}

absl::StatusOr<std::string> Coordinator::ReadArtifact(const std::string& job_id, int block,
                                                      int layer) {
  absl::MutexLock lock(&mu_);
  const std::string key = ArtifactKey(job_id, block, layer);
  QCAL_ASSIGN_OR_RETURN(auto digest,
                        GetRecord<BlockRecord>(*store_, Column::kTasks, BlockKey(job_id, block)));
  QCAL_ASSIGN_OR_RETURN(auto artifact, GetRecord<ArtifactRecord>(*store_, Column::kArtifacts, key));
  if (!digest.has_value() || !artifact.has_value() || layer < 0 || layer >= digest->layers_size()) {
    return absl::DataLossError(absl::StrCat("store: artifact ", key, " is missing"));
  }
  return ArtifactBytes(*artifact, digest->layers(layer).sha256(), key);
}

}  // namespace qcal::coordinator
