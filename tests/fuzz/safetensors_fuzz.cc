// Fuzzes the safetensors reader (common/safetensors.h): the header length, the header JSON, every
// entry's dtype, shape and data offsets, reading each tensor from memory (FromBytes) and from a
// file (Open, pread), and CheckpointReader over the file alone or with an index.
//
// Input: model.safetensors bytes, optionally followed by kFileSeparator and the text of
// model.safetensors.index.json (the file is then the shard "model-00001-of-00001.safetensors").
#include <cstdint>
#include <vector>

#include "common/safetensors.h"
#include "common/status.h"
#include "tests/fuzz/fuzz_util.h"

namespace {

using qcal::DType;
using qcal::Tensor;

// Reads every tensor of `file` both ways; the two reads must agree byte for byte.
void ReadAll(const qcal::SafetensorsFile& file) {
  for (const auto& [name, info] : file.tensors()) {
    absl::StatusOr<Tensor> t = file.Get(name);
    QCAL_CHECK(t.ok());
    QCAL_CHECK(t->nbytes() == info.end - info.begin);
    std::vector<char> copy(t->nbytes());
    QCAL_CHECK(file.ReadInto(name, copy.data(), copy.size()).ok());
    QCAL_CHECK(std::equal(copy.begin(), copy.end(), static_cast<const char*>(t->raw())));
    if (t->dtype() == DType::kF32 || t->dtype() == DType::kF16 || t->dtype() == DType::kBF16) {
      QCAL_CHECK(t->ToF32().ok());
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::vector<std::string> files = qcal::fuzz::SplitFiles(data, size, 2);
  auto in_memory = qcal::SafetensorsFile::FromBytes(files[0], "fuzz.safetensors");
  if (in_memory.ok()) ReadAll(**in_memory);

  const qcal::fuzz::ScratchDir& dir = qcal::fuzz::ScratchDir::Get();
  dir.Clear();
  const bool indexed = !files[1].empty();
  const std::string path =
      dir.Write(indexed ? "model-00001-of-00001.safetensors" : "model.safetensors", files[0]);
  auto on_disk = qcal::SafetensorsFile::Open(path);
  // The two readers accept exactly the same files.
  QCAL_CHECK(on_disk.ok() == in_memory.ok());
  if (on_disk.ok()) ReadAll(**on_disk);

  if (indexed) dir.Write("model.safetensors.index.json", files[1]);
  auto reader = qcal::CheckpointReader::Open(dir.path());
  if (reader.ok()) {
    for (const std::string& name : (*reader)->Names()) {
      QCAL_CHECK((*reader)->Info(name).ok());
      QCAL_CHECK((*reader)->FileOf(name).ok());
      (void)(*reader)->GetF32(name);
    }
  }
  return 0;
}
