#include "services/coordinator/store_schema.h"

#include "absl/strings/str_format.h"
#include "common/files.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"

namespace qcal::coordinator {

std::string JobKey(const std::string& job_id) { return absl::StrCat(kJobKeyPrefix, job_id); }

std::string IdempotencyKey(const std::string& client, const std::string& key) {
  std::string joined = client;
  joined.push_back('\0');
  joined += key;
  return absl::StrCat("idem/", Sha256Hex(joined));
}

std::string BlockKey(const std::string& job_id, int block) {
  return absl::StrFormat("%s/block/%06d", job_id, block);
}

std::string ArtifactKey(const std::string& job_id, int block, int layer) {
  return absl::StrFormat("%s/%06d/%02d", job_id, block, layer);
}

std::string LayerKey(const std::string& job_id, int block, int layer) {
  return absl::StrFormat("%s/layer/%06d/%02d", job_id, block, layer);
}

std::string ActivationKey(const std::string& job_id, int block, int chunk) {
  return absl::StrFormat("%s/%06d/%06d", job_id, block, chunk);
}

std::string GradientFileKey(const std::string& job_id, int block, int layer) {
  return absl::StrFormat("%s/oac/%06d/%02d", job_id, block, layer);
}

std::string GradientFilePrefix(const std::string& job_id) { return absl::StrCat(job_id, "/oac/"); }

std::string JobScopedPrefix(const std::string& job_id) { return absl::StrCat(job_id, "/"); }

std::string Encode(const google::protobuf::MessageLite& record) {
  std::string bytes;
  {
    google::protobuf::io::StringOutputStream out(&bytes);
    google::protobuf::io::CodedOutputStream coded(&out);
    coded.SetSerializationDeterministic(true);
    record.SerializeToCodedStream(&coded);
  }
  return bytes;
}

}  // namespace qcal::coordinator
