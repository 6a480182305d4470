#include "services/coordinator/store_check.h"

#include <algorithm>
#include <filesystem>
#include <iterator>
#include <map>
#include <optional>
#include <set>
#include <tuple>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/files.h"
#include "common/status.h"
#include "nlohmann/json.hpp"
#include "qcal/store/v1/records.pb.h"
#include "services/common/job_spec.h"
#include "services/coordinator/store_schema.h"
#include "services/engine/gang/plan.h"
#include "services/engine/model.h"

namespace qcal::coordinator {
namespace fs = std::filesystem;

namespace {

using store::v1::ActivationRecord;
using store::v1::ArtifactRecord;
using store::v1::BlockRecord;
using store::v1::Counters;
using store::v1::GradientFileRecord;
using store::v1::IdempotencyRecord;
using store::v1::JobRecord;
using store::v1::LayerDigest;
using store::v1::LayerRecord;
using store::v1::WorkerRecord;

// A per-job key "<job_id>/<rest>": the job id and the rest split at '/'.
struct ScopedKey {
  std::string job_id;
  std::vector<std::string> rest;
};

ScopedKey SplitScoped(const std::string& key) {
  std::vector<std::string> parts = absl::StrSplit(key, '/');
  ScopedKey k;
  k.job_id = parts.front();
  k.rest.assign(parts.begin() + 1, parts.end());
  return k;
}

// An index written with "%0<digits>d": at least `digits` digits, more only without a leading zero
// (a layer index of an MoE block can pass 99).
bool ParseIndex(const std::string& text, size_t digits, int* out) {
  return text.size() >= digits && (text.size() == digits || text[0] != '0') &&
         std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
         absl::SimpleAtoi(text, out) && *out >= 0;
}

bool SameDigest(const LayerDigest& a, const LayerDigest& b) {
  return a.name() == b.name() && a.sha256() == b.sha256() && a.size() == b.size() &&
         a.report_sha256() == b.report_sha256();
}

class Checker {
 public:
  Checker(KvStore& store, std::string data_dir) : store_(store), data_dir_(std::move(data_dir)) {}

  absl::StatusOr<StoreCheckResult> Run() {
    QCAL_RETURN_IF_ERROR(ScanJobs());
    QCAL_RETURN_IF_ERROR(ScanWorkers());
    QCAL_RETURN_IF_ERROR(ScanTasks());
    QCAL_RETURN_IF_ERROR(ScanArtifacts());
    QCAL_RETURN_IF_ERROR(ScanActivations());
    CheckCounters();
    CheckIdempotency();
    for (const auto& [id, rec] : jobs_) CheckJob(id, rec);
    CheckOrphanRecords();
    CheckFiles();
    return result_;
  }

 private:
  void Problem(std::string text) { result_.problems.push_back(std::move(text)); }

  // Decodes `value` into `record`; a problem naming column/key when it does not parse.
  template <typename T>
  bool Parse(Column column, const std::string& key, const std::string& value, T* record) {
    absl::StatusOr<T> r = Decode<T>(column, key, value);
    if (!r.ok()) {
      Problem(std::string(r.status().message()));
      return false;
    }
    *record = *std::move(r);
    return true;
  }

  absl::Status ScanJobs() {
    return store_.Scan(Column::kJobs, "", [&](const std::string& key, const std::string& value) {
      if (key == kCountersKey) {
        Counters c;
        if (Parse(Column::kJobs, key, value, &c)) counters_ = c;
      } else if (key.rfind(kJobKeyPrefix, 0) == 0) {
        JobRecord rec;
        if (!Parse(Column::kJobs, key, value, &rec)) return true;
        if (JobKey(rec.job().job_id()) != key) {
          Problem(absl::StrCat("jobs/", key, ": holds job \"", rec.job().job_id(), "\""));
        }
        jobs_[rec.job().job_id()] = rec;
      } else if (key.rfind("idem/", 0) == 0) {
        IdempotencyRecord idem;
        if (Parse(Column::kJobs, key, value, &idem)) idempotency_[key] = idem;
      } else {
        Problem(absl::StrCat("jobs/", key, ": unknown key"));
      }
      return true;
    });
  }

  absl::Status ScanWorkers() {
    return store_.Scan(Column::kWorkers, "", [&](const std::string& key, const std::string& value) {
      WorkerRecord w;
      if (!Parse(Column::kWorkers, key, value, &w)) return true;
      if (w.worker_id() != key) {
        Problem(absl::StrCat("workers/", key, ": holds worker \"", w.worker_id(), "\""));
      }
      ++result_.workers;
      max_lease_epoch_ = std::max(max_lease_epoch_, w.epoch());
      return true;
    });
  }

  absl::Status ScanTasks() {
    return store_.Scan(Column::kTasks, "", [&](const std::string& key, const std::string& value) {
      const ScopedKey k = SplitScoped(key);
      scoped_jobs_.insert({k.job_id, absl::StrCat("tasks/", key)});
      int block = 0, layer = 0;
      if (k.rest.size() == 2 && k.rest[0] == "block" && ParseIndex(k.rest[1], 6, &block)) {
        BlockRecord b;
        if (!Parse(Column::kTasks, key, value, &b)) return true;
        if (b.block() != block) Problem(absl::StrCat("tasks/", key, ": names block ", b.block()));
        blocks_[{k.job_id, block}] = b;
      } else if (k.rest.size() == 3 && k.rest[0] == "layer" && ParseIndex(k.rest[1], 6, &block) &&
                 ParseIndex(k.rest[2], 2, &layer)) {
        LayerRecord l;
        if (Parse(Column::kTasks, key, value, &l)) layers_[{k.job_id, block, layer}] = l;
      } else if (k.rest.size() == 3 && k.rest[0] == "oac" && ParseIndex(k.rest[1], 6, &block) &&
                 ParseIndex(k.rest[2], 2, &layer)) {
        GradientFileRecord g;
        if (!Parse(Column::kTasks, key, value, &g)) return true;
        if (g.block() != block || g.layer() != layer) {
          Problem(absl::StrCat("tasks/", key, ": names block ", g.block(), " layer ", g.layer()));
        }
        referenced_files_.insert(g.file());
        CheckFile(absl::StrCat("tasks/", key), g.file(), g.size(), g.sha256());
      } else {
        Problem(absl::StrCat("tasks/", key, ": unknown key"));
      }
      return true;
    });
  }

  // A per-job key "<job_id>/<6 digits>/<`digits` digits>" of `column`: recorded as the job's,
  // its two indices parsed; a problem (and false) when the key has another shape.
  bool JobKeyIndices(Column column, const std::string& key, size_t digits, std::string* job_id,
                     int* first, int* second) {
    const ScopedKey k = SplitScoped(key);
    scoped_jobs_.insert({k.job_id, absl::StrCat(ColumnName(column), "/", key)});
    *job_id = k.job_id;
    if (k.rest.size() == 2 && ParseIndex(k.rest[0], 6, first) &&
        ParseIndex(k.rest[1], digits, second)) {
      return true;
    }
    Problem(absl::StrCat(ColumnName(column), "/", key, ": unknown key"));
    return false;
  }

  absl::Status ScanArtifacts() {
    return store_.Scan(Column::kArtifacts, "",
                       [&](const std::string& key, const std::string& value) {
                         std::string job_id;
                         int block = 0, layer = 0;
                         ArtifactRecord a;
                         if (JobKeyIndices(Column::kArtifacts, key, 2, &job_id, &block, &layer) &&
                             Parse(Column::kArtifacts, key, value, &a)) {
                           artifacts_[{job_id, block, layer}] = a;
                         }
                         return true;
                       });
  }

  absl::Status ScanActivations() {
    return store_.Scan(
        Column::kActivations, "", [&](const std::string& key, const std::string& value) {
          std::string job_id;
          int block = 0, chunk = 0;
          ActivationRecord a;
          if (!JobKeyIndices(Column::kActivations, key, 6, &job_id, &block, &chunk) ||
              !Parse(Column::kActivations, key, value, &a)) {
            return true;
          }
          if (a.block() != block || a.chunk() != chunk) {
            Problem(absl::StrCat("activations/", key, ": names block ", a.block(), " chunk ",
                                 a.chunk()));
          }
          referenced_files_.insert(a.file());
          CheckFile(absl::StrCat("activations/", key), a.file(), a.size(), a.sha256());
          activations_[job_id].push_back(a);
          return true;
        });
  }

  // The file `rel` (relative to the data directory) has `size` bytes hashing to `sha256`.
  void CheckFile(const std::string& what, const std::string& rel, int64_t size,
                 const std::string& sha256) {
    const fs::path path = fs::path(data_dir_) / rel;
    std::error_code ec;
    const uintmax_t actual = fs::file_size(path, ec);
    if (ec) {
      Problem(absl::StrCat(what, ": file ", rel, " is missing"));
      return;
    }
    ++result_.files_checked;
    if (static_cast<int64_t>(actual) != size) {
      Problem(absl::StrCat(what, ": file ", rel, " has ", actual, " bytes, the record ", size));
      return;
    }
    absl::StatusOr<std::string> sha = Sha256File(path.string());
    if (!sha.ok() || *sha != sha256) {
      Problem(absl::StrCat(what, ": file ", rel, " does not match its sha256"));
    }
  }

  void CheckCounters() {
    if (!counters_.has_value()) {
      if (!jobs_.empty() || result_.workers > 0) Problem("jobs/meta/counters: missing");
      return;
    }
    std::map<int64_t, std::string> seqs;
    for (const auto& [id, rec] : jobs_) {
      if (rec.seq() >= counters_->next_seq()) {
        Problem(absl::StrCat("job ", id, ": seq ", rec.seq(), " not below next_seq ",
                             counters_->next_seq()));
      }
      if (auto [it, fresh] = seqs.emplace(rec.seq(), id); !fresh) {
        Problem(absl::StrCat("job ", id, ": seq ", rec.seq(), " also belongs to ", it->second));
      }
      if (rec.job().gang_epoch() >= counters_->next_gang_epoch() &&
          counters_->next_gang_epoch() != 0) {
        Problem(absl::StrCat("job ", id, ": gang epoch ", rec.job().gang_epoch(),
                             " not below next_gang_epoch ", counters_->next_gang_epoch()));
      }
    }
    if (max_lease_epoch_ > 0 && max_lease_epoch_ >= counters_->next_epoch()) {
      Problem(absl::StrCat("workers: lease epoch ", max_lease_epoch_, " not below next_epoch ",
                           counters_->next_epoch()));
    }
  }

  void CheckIdempotency() {
    for (const auto& [key, idem] : idempotency_) {
      ++result_.idempotency_keys;
      if (IdempotencyKey(idem.client(), idem.key()) != key) {
        Problem(absl::StrCat("jobs/", key, ": does not hash client \"", idem.client(),
                             "\" and key \"", idem.key(), "\""));
      }
      auto it = jobs_.find(idem.job_id());
      if (it == jobs_.end()) {
        Problem(absl::StrCat("jobs/", key, ": key \"", idem.key(), "\" names job ", idem.job_id(),
                             ", which the store lacks"));
        continue;
      }
      if (it->second.job().client() != idem.client()) {
        Problem(absl::StrCat("jobs/", key, ": client \"", idem.client(), "\" but job ",
                             idem.job_id(), " is \"", it->second.job().client(), "\"'s"));
      }
      if (it->second.spec_sha256() != idem.spec_sha256()) {
        Problem(absl::StrCat("jobs/", key, ": spec sha256 differs from job ", idem.job_id(), "'s"));
      }
    }
  }

  void CheckJob(const std::string& id, const JobRecord& rec) {
    ++result_.jobs;
    const v1::Job& job = rec.job();
    const std::string what = absl::StrCat("job ", id);
    if (job.blocks_done() < 0 || job.blocks_done() > job.num_blocks()) {
      Problem(absl::StrCat(what, ": blocks_done ", job.blocks_done(), " of ", job.num_blocks()));
    }
    if (job.checkpoint_block() < 0 || job.checkpoint_block() > job.blocks_done()) {
      Problem(absl::StrCat(what, ": checkpoint_block ", job.checkpoint_block(),
                           " past blocks_done ", job.blocks_done()));
    }
    if (service::IsFinal(job.state())) {
      ++result_.final_jobs;
      if (job.state() == v1::JOB_STATE_SUCCEEDED && job.blocks_done() != job.num_blocks()) {
        Problem(absl::StrCat(what, ": SUCCEEDED with ", job.blocks_done(), " of ", job.num_blocks(),
                             " blocks done"));
      }
      for (auto it = scoped_jobs_.lower_bound({id, ""});
           it != scoped_jobs_.end() && it->first == id; ++it) {
        Problem(absl::StrCat(what, " is ", service::JobStateName(job.state()), " but ", it->second,
                             " remains"));
      }
      return;
    }
    for (int b = 0; b < job.num_blocks(); ++b) {
      auto mark = blocks_.find({id, b});
      if (mark == blocks_.end()) {
        if (b < job.blocks_done()) {
          Problem(absl::StrCat(what, ": block ", b, " below blocks_done has no done mark"));
        }
        continue;
      }
      // A dense block has seven linears, an MoE block at least as many (q, k, v, o and three per
      // expert unit); the mark lists every layer record of the block.
      const auto next_block = layers_.lower_bound({id, b + 1, 0});
      const auto block_layers = std::distance(layers_.lower_bound({id, b, 0}), next_block);
      if (mark->second.layers_size() < engine::kNumLinears ||
          mark->second.layers_size() != block_layers) {
        Problem(absl::StrCat(what, ": block ", b, "'s done mark lists ", mark->second.layers_size(),
                             " layers, the block has ", block_layers, " layer records"));
      }
      for (int l = 0; l < mark->second.layers_size(); ++l) {
        auto layer = layers_.find({id, b, l});
        if (layer == layers_.end() || !SameDigest(layer->second.digest(), mark->second.layers(l))) {
          Problem(absl::StrCat(what, ": block ", b, " layer ", l,
                               ": the done mark's digest has no equal layer record"));
        }
      }
    }
    for (auto it = layers_.lower_bound({id, 0, 0});
         it != layers_.end() && std::get<0>(it->first) == id; ++it) {
      ++result_.layers;
      const auto& [job_id, b, l] = it->first;
      const std::string key = LayerKey(id, b, l);
      auto artifact = artifacts_.find(it->first);
      if (artifact == artifacts_.end()) {
        Problem(absl::StrCat("tasks/", key, ": no artifact record"));
        continue;
      }
      const LayerDigest& d = it->second.digest();
      if (Sha256Hex(artifact->second.report_json()) != d.report_sha256()) {
        Problem(absl::StrCat("artifacts/", ArtifactKey(id, b, l),
                             ": report does not match its sha256"));
      }
      if (artifact->second.file().empty()) {
        if (Sha256Hex(artifact->second.quantized()) != d.sha256()) {
          Problem(absl::StrCat("artifacts/", ArtifactKey(id, b, l),
                               ": inline bytes do not match their sha256"));
        }
      } else {
        referenced_files_.insert(artifact->second.file());
        CheckFile(absl::StrCat("artifacts/", ArtifactKey(id, b, l)), artifact->second.file(),
                  d.size(), d.sha256());
      }
    }
    for (auto it = artifacts_.lower_bound({id, 0, 0});
         it != artifacts_.end() && std::get<0>(it->first) == id; ++it) {
      if (layers_.count(it->first) == 0) {
        const auto& [job_id, b, l] = it->first;
        Problem(absl::StrCat("artifacts/", ArtifactKey(id, b, l), ": no layer record"));
      }
    }
    const int chunks = engine::NumChunks(job.spec().samples());
    int at_checkpoint = 0;
    for (const ActivationRecord& a : activations_[id]) {
      if (a.block() < job.checkpoint_block()) {
        Problem(absl::StrCat("activations/", ActivationKey(id, a.block(), a.chunk()),
                             ": older than the checkpoint at block ", job.checkpoint_block()));
      }
      if (a.block() == job.checkpoint_block()) ++at_checkpoint;
      if (a.chunk() >= chunks) {
        Problem(absl::StrCat("activations/", ActivationKey(id, a.block(), a.chunk()),
                             ": the job has ", chunks, " chunks"));
      }
    }
    if (job.checkpoint_block() > 0 && at_checkpoint != chunks) {
      Problem(absl::StrCat(what, ": checkpoint at block ", job.checkpoint_block(), " has ",
                           at_checkpoint, " of ", chunks, " chunks"));
    }
  }

  void CheckOrphanRecords() {
    std::string last;
    for (const auto& [job_id, key] : scoped_jobs_) {
      if (jobs_.count(job_id) > 0 || job_id == last) continue;
      last = job_id;
      Problem(absl::StrCat(key, ": names job ", job_id, ", which the store lacks"));
    }
  }

  bool Live(const std::string& job_id) const {
    auto it = jobs_.find(job_id);
    return it != jobs_.end() && !service::IsFinal(it->second.job().state());
  }

  void CheckFiles() {
    std::error_code ec;
    const fs::path acts = fs::path(data_dir_) / "activations";
    for (const auto& e : fs::directory_iterator(acts, ec)) {
      const std::string job_id = e.path().filename().string();
      if (!Live(job_id)) {
        Problem(absl::StrCat("activations/", job_id, "/ remains, and its job is ",
                             jobs_.count(job_id) > 0 ? "final" : "unknown"));
      }
    }
    for (const auto& e : fs::recursive_directory_iterator(acts, ec)) {
      if (!e.is_regular_file()) continue;
      const std::string rel = fs::relative(e.path(), data_dir_).string();
      if (e.path().filename().string().rfind(".upload-", 0) == 0) {
        Problem(absl::StrCat(rel, ": an upload's staging file remains"));
      } else if (referenced_files_.count(rel) == 0) {
        Problem(absl::StrCat(rel, ": no record references it"));
      }
    }
    const fs::path arts = fs::path(data_dir_) / "artifacts";
    for (const auto& e : fs::directory_iterator(arts, ec)) {
      const std::string job_id = e.path().filename().string();
      if (!Live(job_id)) {
        Problem(absl::StrCat("artifacts/", job_id, "/ remains, and its job is ",
                             jobs_.count(job_id) > 0 ? "final" : "unknown"));
        continue;
      }
      for (const auto& f : fs::recursive_directory_iterator(e.path(), ec)) {
        if (!f.is_regular_file()) continue;
        const std::string rel = fs::relative(f.path(), data_dir_).string();
        if (f.path().filename().string().rfind(".upload-", 0) == 0) {
          Problem(absl::StrCat(rel, ": an upload's staging file remains"));
        } else if (referenced_files_.count(rel) == 0) {
          ++result_.unreferenced_artifact_files;
        }
      }
    }
  }

  KvStore& store_;
  const std::string data_dir_;
  StoreCheckResult result_;
  std::optional<Counters> counters_;
  uint64_t max_lease_epoch_ = 0;
  std::map<std::string, JobRecord> jobs_;
  std::map<std::string, IdempotencyRecord> idempotency_;
  std::map<std::pair<std::string, int>, BlockRecord> blocks_;
  std::map<std::tuple<std::string, int, int>, LayerRecord> layers_;
  std::map<std::tuple<std::string, int, int>, ArtifactRecord> artifacts_;
  std::map<std::string, std::vector<ActivationRecord>> activations_;
  // (job id, "column/key") of every per-job record.
  std::set<std::pair<std::string, std::string>> scoped_jobs_;
  // Files (relative to the data directory) that records reference.
  std::set<std::string> referenced_files_;
};

}  // namespace

std::string StoreCheckResult::ToJson() const {
  nlohmann::ordered_json j;
  j["ok"] = ok();
  j["jobs"] = jobs;
  j["final_jobs"] = final_jobs;
  j["idempotency_keys"] = idempotency_keys;
  j["workers"] = workers;
  j["layers"] = layers;
  j["files_checked"] = files_checked;
  j["unreferenced_artifact_files"] = unreferenced_artifact_files;
  j["problems"] = problems;
  return j.dump();
}

absl::StatusOr<StoreCheckResult> CheckStore(KvStore& store, const std::string& data_dir) {
  return Checker(store, data_dir).Run();
}

}  // namespace qcal::coordinator
