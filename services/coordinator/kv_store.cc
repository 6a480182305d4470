#include "services/coordinator/kv_store.h"

#include "common/status.h"

namespace qcal::coordinator {

const char* ColumnName(Column column) {
  switch (column) {
    case Column::kJobs:
      return "jobs";
    case Column::kTasks:
      return "tasks";
    case Column::kWorkers:
      return "workers";
    case Column::kArtifacts:
      return "artifacts";
    case Column::kActivations:
      return "activations";
  }
  return "?";
}

void WriteBatch::Put(Column column, std::string key, std::string value) {
  ops_.push_back({OpKind::kPut, column, std::move(key), std::move(value)});
}

void WriteBatch::Delete(Column column, std::string key) {
  ops_.push_back({OpKind::kDelete, column, std::move(key), ""});
}

void WriteBatch::DeletePrefix(Column column, const std::string& prefix) {
  // The exclusive end of the range: the prefix with its last byte incremented. Callers' prefixes
  // end in '/', so the increment never carries.
  QCAL_CHECK(!prefix.empty() && static_cast<unsigned char>(prefix.back()) != 0xff);
  std::string end = prefix;
  end.back() = static_cast<char>(end.back() + 1);
  ops_.push_back({OpKind::kDeleteRange, column, prefix, std::move(end)});
}

size_t WriteBatch::bytes() const {
  size_t n = 0;
  for (const Op& op : ops_) n += op.key.size() + op.value.size();
  return n;
}

}  // namespace qcal::coordinator
