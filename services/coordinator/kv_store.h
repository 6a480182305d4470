// The coordinator's durable key-value store interface (DESIGN section 7, "State"): five column
// families and atomic, synced batches. RocksStore (rocks_store.h) implements it on RocksDB; the
// coordinator and its tests see only this header.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qcal::coordinator {

// Column families. The keys and records of each are documented in store_schema.h.
enum class Column { kJobs = 0, kTasks, kWorkers, kArtifacts, kActivations };
inline constexpr int kNumColumns = 5;
// "jobs", "tasks", "workers", "artifacts", "activations".
const char* ColumnName(Column column);

// Operations applied together by KvStore::Write.
class WriteBatch {
 public:
  enum class OpKind { kPut, kDelete, kDeleteRange };
  struct Op {
    OpKind kind;
    Column column;
    std::string key;    // kDeleteRange: first key deleted
    std::string value;  // kPut: the value; kDeleteRange: the first key kept (exclusive end)
  };

  void Put(Column column, std::string key, std::string value);
  void Delete(Column column, std::string key);
  // Deletes every key with `prefix` (non-empty, not ending in byte 0xff).
  void DeletePrefix(Column column, const std::string& prefix);

  const std::vector<Op>& ops() const { return ops_; }
  bool empty() const { return ops_.empty(); }
  // Keys plus values, bytes (the store-write metric).
  size_t bytes() const;

 private:
  std::vector<Op> ops_;
};

// Thread-safe.
class KvStore {
 public:
  virtual ~KvStore() = default;
  // Applies `batch` atomically and durably: all of it or none of it is visible after a crash,
  // and it is on disk (synced) when this returns OK. This is the commit point.
  virtual absl::Status Write(const WriteBatch& batch) = 0;
  // The value of `key`, or nullopt when absent.
  virtual absl::StatusOr<std::optional<std::string>> Get(Column column, const std::string& key) = 0;
  // Calls fn(key, value) for the keys starting with `prefix`, in key order, until fn returns false.
  virtual absl::Status Scan(
      Column column, const std::string& prefix,
      const std::function<bool(const std::string& key, const std::string& value)>& fn) = 0;
};

}  // namespace qcal::coordinator
