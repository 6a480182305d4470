// RocksStore: KvStore on RocksDB, the only code that includes RocksDB headers. One database
// directory with the five column families of kv_store.h; every Write is one WriteBatch with a
// synced WAL (the commit point).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "services/coordinator/kv_store.h"

namespace qcal::coordinator {

struct RocksStoreOptions {
  // Database directory; created (with its parents) when missing. Required.
  std::string dir;
  // Open an existing database for reading only (Write fails); the directory is not created.
  // A read-only open takes no lock, so it may run beside a coordinator, but then sees the
  // state as of the open. Default: false.
  bool read_only = false;
  absl::Status Validate() const;
};

class RocksStore final : public KvStore {
 public:
  // Opens or creates the database with its column families. Errors (a corrupt or locked
  // database, an unwritable directory) name the directory; RocksDB's message is kept.
  static absl::StatusOr<std::unique_ptr<RocksStore>> Open(const RocksStoreOptions& options);
  ~RocksStore() override;

  absl::Status Write(const WriteBatch& batch) override;
  absl::StatusOr<std::optional<std::string>> Get(Column column, const std::string& key) override;
  absl::Status Scan(
      Column column, const std::string& prefix,
      const std::function<bool(const std::string& key, const std::string& value)>& fn) override;

 private:
  struct Impl;
  explicit RocksStore(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qcal::coordinator
