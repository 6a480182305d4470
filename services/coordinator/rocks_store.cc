#include "services/coordinator/rocks_store.h"

#include <filesystem>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "rocksdb/db.h"
#include "rocksdb/options.h"
#include "rocksdb/write_batch.h"

namespace qcal::coordinator {

namespace {
// Artifacts of at least this many bytes are stored in blob files (all real ones are larger).
constexpr uint64_t kMinBlobBytes = 4096;
}  // namespace

absl::Status RocksStoreOptions::Validate() const {
  if (dir.empty()) return absl::InvalidArgumentError("the store directory is required");
  return absl::OkStatus();
}

struct RocksStore::Impl {
  std::string dir;
  std::unique_ptr<rocksdb::DB> db;
  // Index = Column; owned by db and destroyed before it.
  std::vector<rocksdb::ColumnFamilyHandle*> handles;

  ~Impl() {
    if (db) {
      for (rocksdb::ColumnFamilyHandle* h : handles) db->DestroyColumnFamilyHandle(h);
      db->Close();
    }
  }
  rocksdb::ColumnFamilyHandle* Handle(Column c) const { return handles[static_cast<int>(c)]; }
  absl::Status Error(const rocksdb::Status& s, const std::string& what) const {
    const std::string msg = absl::StrCat("store ", dir, ": ", what, ": ", s.ToString());
    if (s.IsNotFound()) return absl::NotFoundError(msg);
    if (s.IsCorruption()) return absl::DataLossError(msg);
    if (s.IsIOError() && s.subcode() == rocksdb::Status::kNoSpace) {
      return absl::ResourceExhaustedError(msg);
    }
    return absl::UnavailableError(msg);
  }
};

RocksStore::RocksStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RocksStore::~RocksStore() = default;

absl::StatusOr<std::unique_ptr<RocksStore>> RocksStore::Open(const RocksStoreOptions& options) {
  QCAL_RETURN_IF_ERROR(options.Validate());
  std::error_code ec;
  if (!options.read_only) std::filesystem::create_directories(options.dir, ec);
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("store ", options.dir, ": cannot create the directory: ", ec.message()));
  }
  auto impl = std::make_unique<Impl>();
  impl->dir = options.dir;
  rocksdb::DBOptions db_options;
  db_options.create_if_missing = !options.read_only;
  db_options.create_missing_column_families = !options.read_only;
  // The coordinator's writes are small and few; keep the footprint small.
  db_options.max_background_jobs = 2;
  db_options.keep_log_file_num = 4;
  std::vector<rocksdb::ColumnFamilyDescriptor> families;
  families.emplace_back(rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions());
  for (int c = 0; c < kNumColumns; ++c) {
    rocksdb::ColumnFamilyOptions cf;
    if (static_cast<Column>(c) == Column::kArtifacts) {
      // Quantized layers (megabytes, up to gigabytes at 70B) are separated into blob files when
      // their memtable is flushed; the LSM tree keeps only references, so compactions never
      // rewrite them. A small write buffer flushes soon after each commit, so the memtable
      // holds about one commit's artifacts rather than accumulating them.
      cf.enable_blob_files = true;
      cf.min_blob_size = kMinBlobBytes;
      cf.blob_file_size = 256 << 20;
      cf.enable_blob_garbage_collection = true;
      cf.write_buffer_size = 8 << 20;
    }
    families.emplace_back(ColumnName(static_cast<Column>(c)), cf);
  }
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* raw = nullptr;
  const rocksdb::Status s =
      options.read_only
          ? rocksdb::DB::OpenForReadOnly(db_options, options.dir, families, &handles, &raw)
          : rocksdb::DB::Open(db_options, options.dir, families, &handles, &raw);
  if (!s.ok()) return impl->Error(s, "open");
  impl->db.reset(raw);
  // handles[0] is the default family, which the store does not use.
  impl->db->DestroyColumnFamilyHandle(handles[0]);
  impl->handles.assign(handles.begin() + 1, handles.end());
  return std::unique_ptr<RocksStore>(new RocksStore(std::move(impl)));
}

absl::Status RocksStore::Write(const WriteBatch& batch) {
  rocksdb::WriteBatch wb;
  for (const WriteBatch::Op& op : batch.ops()) {
    rocksdb::ColumnFamilyHandle* h = impl_->Handle(op.column);
    rocksdb::Status s;
    switch (op.kind) {
      case WriteBatch::OpKind::kPut:
        s = wb.Put(h, op.key, op.value);
        break;
      case WriteBatch::OpKind::kDelete:
        s = wb.Delete(h, op.key);
        break;
      case WriteBatch::OpKind::kDeleteRange:
        s = wb.DeleteRange(h, op.key, op.value);
        break;
    }
    if (!s.ok()) return impl_->Error(s, "batch");
  }
  rocksdb::WriteOptions wo;
  wo.sync = true;
  const rocksdb::Status s = impl_->db->Write(wo, &wb);
  if (!s.ok()) return impl_->Error(s, "write");
  return absl::OkStatus();
}

absl::StatusOr<std::optional<std::string>> RocksStore::Get(Column column, const std::string& key) {
  std::string value;
  const rocksdb::Status s =
      impl_->db->Get(rocksdb::ReadOptions(), impl_->Handle(column), key, &value);
  if (s.IsNotFound()) return std::optional<std::string>();
  if (!s.ok()) return impl_->Error(s, absl::StrCat("get ", ColumnName(column), "/", key));
  return std::optional<std::string>(std::move(value));
}

absl::Status RocksStore::Scan(
    Column column, const std::string& prefix,
    const std::function<bool(const std::string& key, const std::string& value)>& fn) {
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions(), impl_->Handle(column)));
  for (it->Seek(prefix); it->Valid(); it->Next()) {
    const rocksdb::Slice key = it->key();
    if (!key.starts_with(prefix)) break;
    if (!fn(key.ToString(), it->value().ToString())) break;
  }
  if (!it->status().ok())
    return impl_->Error(it->status(), absl::StrCat("scan ", ColumnName(column)));
  return absl::OkStatus();
}

}  // namespace qcal::coordinator
