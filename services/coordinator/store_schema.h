// What the coordinator keeps in each column family of its store (records in
// proto/qcal/store/v1/records.proto), and typed reads of them.
//
//   jobs         "job/<job_id>"                    JobRecord (spec, state, attempts, lease)
//                "idem/<sha256(client NUL key)>"   IdempotencyRecord
//                "meta/counters"                   Counters (next lease epoch, next sequence)
//   tasks        "<job_id>/block/<6-digit block>"  BlockRecord (the block is done; its digests)
//                "<job_id>/layer/<6-digit block>/<2-digit layer>"  LayerRecord (a layer is in)
//                "<job_id>/oac/<6-digit block>/<2-digit layer>"    GradientFileRecord (a linear's
//                                                  gradient-pass statistics are in, a file under
//                                                  <data-dir>/artifacts/<job_id>/oac/)
//   workers      "<worker_id>"                     WorkerRecord (a granted lease)
//   artifacts    "<job_id>/<6-digit block>/<2-digit layer>"  ArtifactRecord
//   activations  "<job_id>/<6-digit block>/<6-digit chunk>"  ActivationRecord (one chunk of a
//                                                  boundary checkpoint, a file under
//                                                  <data-dir>/activations/<job_id>/)
//
// A record that does not parse is DATA_LOSS naming the column and key.
#pragma once

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "google/protobuf/message_lite.h"
#include "qcal/store/v1/records.pb.h"
#include "services/coordinator/kv_store.h"

namespace qcal::coordinator {

inline constexpr char kJobKeyPrefix[] = "job/";
inline constexpr char kCountersKey[] = "meta/counters";

std::string JobKey(const std::string& job_id);
std::string IdempotencyKey(const std::string& client, const std::string& key);
std::string BlockKey(const std::string& job_id, int block);
std::string ArtifactKey(const std::string& job_id, int block, int layer);
std::string LayerKey(const std::string& job_id, int block, int layer);
std::string ActivationKey(const std::string& job_id, int block, int chunk);
std::string GradientFileKey(const std::string& job_id, int block, int layer);
// Every GradientFileKey of a job starts with this.
std::string GradientFilePrefix(const std::string& job_id);
// Every tasks / artifacts / activations key of a job starts with this.
std::string JobScopedPrefix(const std::string& job_id);

// Deterministic serialization of a record.
std::string Encode(const google::protobuf::MessageLite& record);

// Parses `bytes` (the value of `key` in `column`) into a T.
template <typename T>
absl::StatusOr<T> Decode(Column column, const std::string& key, const std::string& bytes) {
  T record;
  if (!record.ParseFromString(bytes)) {
    return absl::DataLossError(
        absl::StrCat("store: record ", ColumnName(column), "/", key, " does not parse"));
  }
  return record;
}

// Reads and parses one record; nullopt when the key is absent.
template <typename T>
absl::StatusOr<std::optional<T>> GetRecord(KvStore& store, Column column, const std::string& key) {
  absl::StatusOr<std::optional<std::string>> bytes = store.Get(column, key);
  if (!bytes.ok()) return bytes.status();
  if (!bytes->has_value()) return std::optional<T>();
  absl::StatusOr<T> record = Decode<T>(column, key, **bytes);
  if (!record.ok()) return record.status();
  return std::optional<T>(*std::move(record));
}

}  // namespace qcal::coordinator
