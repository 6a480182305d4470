#include "common/safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/files.h"
#include "nlohmann/json.hpp"

namespace qcal {
namespace {

absl::Status Bad(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(path, ": ", what));
}

absl::Status Changed(const std::string& path, const std::string& what) {
  return absl::DataLossError(
      absl::StrCat(path, ": the file changed while it was being read (", what, ")"));
}

// Reads exactly `bytes` bytes at `offset`; false on a short read (the file shrank) with errno 0,
// or on an error with errno set.
bool PreadAll(int fd, void* dst, size_t bytes, uint64_t offset) {
  auto* p = static_cast<char*>(dst);
  while (bytes > 0) {
    const ssize_t n = ::pread(fd, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = 0;
      return false;
    }
    p += n;
    bytes -= static_cast<size_t>(n);
    offset += static_cast<uint64_t>(n);
  }
  return true;
}

uint64_t HeaderLength(const unsigned char* bytes) {
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  return header_len;
}

// Checks the 8-byte header length against the cap and the file size.
absl::Status CheckHeaderLength(const std::string& path, uint64_t header_len, uint64_t file_size) {
  if (header_len > kMaxSafetensorsHeaderBytes) {
    return Bad(path, absl::StrCat("safetensors header length ", header_len,
                                  " exceeds the limit of ", kMaxSafetensorsHeaderBytes, " bytes"));
  }
  if (header_len > file_size - 8) {
    return Bad(path, absl::StrCat("safetensors header length ", header_len,
                                  " runs past the end of the file (", file_size, " bytes)"));
  }
  return absl::OkStatus();
}

absl::Status Truncated(const std::string& path, uint64_t file_size) {
  return Bad(path, absl::StrCat("truncated safetensors file (", file_size,
                                " bytes; the 8-byte header length is missing)"));
}

}  // namespace

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = path;
  file->fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (file->fd_ < 0) {
    return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  }
  struct stat st;
  if (fstat(file->fd_, &st) != 0) {
    return absl::InternalError(absl::StrCat(path, ": stat failed: ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) return Bad(path, "not a regular file");
  file->identity_ = {static_cast<uint64_t>(st.st_dev), static_cast<uint64_t>(st.st_ino),
                     static_cast<uint64_t>(st.st_size), static_cast<int64_t>(st.st_mtim.tv_sec),
                     static_cast<int64_t>(st.st_mtim.tv_nsec)};
  const uint64_t file_size = file->identity_.size;
  if (file_size < 8) return Truncated(path, file_size);
  unsigned char len_bytes[8];
  if (!PreadAll(file->fd_, len_bytes, 8, 0)) {
    return Changed(path, "cannot read the header length");
  }
  const uint64_t header_len = HeaderLength(len_bytes);
  QCAL_RETURN_IF_ERROR(CheckHeaderLength(path, header_len, file_size));
  std::string header(header_len, '\0');
  if (!PreadAll(file->fd_, header.data(), header_len, 8)) {
    return Changed(path, absl::StrCat("cannot read the ", header_len, "-byte header"));
  }
  QCAL_RETURN_IF_ERROR(file->Parse(header.data(), header_len, file_size - 8 - header_len));
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(
    const std::string& bytes, const std::string& name) {
  if (bytes.size() < 8) return Truncated(name, bytes.size());
  auto file = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  file->path_ = name;
  file->in_memory_ = AllocateHost(bytes.size());
  std::memcpy(file->in_memory_->data(), bytes.data(), bytes.size());
  const auto* raw = reinterpret_cast<const unsigned char*>(bytes.data());
  const uint64_t header_len = HeaderLength(raw);
  QCAL_RETURN_IF_ERROR(CheckHeaderLength(name, header_len, bytes.size()));
  QCAL_RETURN_IF_ERROR(file->Parse(static_cast<const char*>(file->in_memory_->data()) + 8,
                                   header_len, bytes.size() - 8 - header_len));
  return file;
}

absl::Status SafetensorsFile::Parse(const char* header_text, uint64_t header_len,
                                    uint64_t data_size) {
  const std::string& path = path_;
  data_offset_ = 8 + header_len;
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(header_text, header_text + header_len);
  } catch (const nlohmann::json::exception& e) {
    return Bad(path, absl::StrCat("malformed safetensors header JSON: ", e.what()));
  }
  if (!header.is_object()) return Bad(path, "safetensors header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) return Bad(path, "__metadata__ is not an object");
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) return Bad(path, "__metadata__ values must be strings");
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat("tensor \"", name, "\"");
    if (!entry.is_object() || !entry.contains("dtype") || !entry.contains("shape") ||
        !entry.contains("data_offsets")) {
      return Bad(path, absl::StrCat(where, ": entry needs dtype, shape and data_offsets"));
    }
    if (!entry["dtype"].is_string())
      return Bad(path, absl::StrCat(where, ": dtype is not a string"));
    auto dtype = ParseDType(entry["dtype"].get<std::string>());
    if (!dtype.ok()) return Bad(path, absl::StrCat(where, ": ", dtype.status().message()));
    TensorInfo info;
    info.dtype = *dtype;
    const auto& shape = entry["shape"];
    if (!shape.is_array()) return Bad(path, absl::StrCat(where, ": shape is not an array"));
    uint64_t numel = 1;
    for (const auto& d : shape) {
      if (!d.is_number_unsigned()) {
        return Bad(path, absl::StrCat(where, ": shape has a non-integer or negative dimension"));
      }
      uint64_t v = d.get<uint64_t>();
      if (v > (1ull << 40) || (v != 0 && numel > (1ull << 48) / v)) {
        return Bad(path, absl::StrCat(where, ": shape is too large"));
      }
      numel *= v;
      info.shape.push_back(static_cast<int64_t>(v));
    }
    const auto& offsets = entry["data_offsets"];
    if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
        !offsets[1].is_number_unsigned()) {
      return Bad(path, absl::StrCat(where, ": data_offsets must be two non-negative integers"));
    }
    info.begin = offsets[0].get<uint64_t>();
    info.end = offsets[1].get<uint64_t>();
    if (info.end < info.begin) return Bad(path, absl::StrCat(where, ": data_offsets end < begin"));
    if (info.end > data_size) {
      return Bad(path, absl::StrCat(where, ": data_offsets [", info.begin, ", ", info.end,
                                    ") run past the end of the file (data section is ", data_size,
                                    " bytes)"));
    }
    if (info.end - info.begin != numel * DTypeSize(info.dtype)) {
      return Bad(path, absl::StrCat(where, ": ", info.end - info.begin, " bytes do not match ",
                                    DTypeName(info.dtype), ShapeString(info.shape), " (",
                                    numel * DTypeSize(info.dtype), " bytes)"));
    }
    tensors_[name] = std::move(info);
  }
  return absl::OkStatus();
}

absl::Status SafetensorsFile::CheckIdentity() const {
  struct stat st;
  if (::stat(path_.c_str(), &st) != 0) {
    return Changed(path_, absl::StrCat("it can no longer be found: ", std::strerror(errno)));
  }
  if (static_cast<uint64_t>(st.st_dev) != identity_.dev ||
      static_cast<uint64_t>(st.st_ino) != identity_.ino) {
    return Changed(path_, "the path now names another file");
  }
  if (static_cast<uint64_t>(st.st_size) != identity_.size) {
    return Changed(
        path_, absl::StrCat("its size went from ", identity_.size, " to ", st.st_size, " bytes"));
  }
  if (st.st_mtim.tv_sec != identity_.mtime_sec || st.st_mtim.tv_nsec != identity_.mtime_nsec) {
    return Changed(path_, "it was modified");
  }
  return absl::OkStatus();
}

absl::Status SafetensorsFile::ReadInto(const std::string& name, void* dst, size_t bytes) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor \"", name, "\""));
  }
  const TensorInfo& info = it->second;
  const uint64_t size = info.end - info.begin;
  if (bytes != size) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor \"", name, "\" has ", size,
                                                   " bytes; the buffer has ", bytes));
  }
  if (in_memory_ != nullptr) {
    // An empty tensor's buffer may be null, which memcpy must not see even for 0 bytes.
    if (bytes > 0) {
      std::memcpy(dst, static_cast<const char*>(in_memory_->data()) + data_offset_ + info.begin,
                  bytes);
    }
    return absl::OkStatus();
  }
  QCAL_RETURN_IF_ERROR(CheckIdentity());
  if (!PreadAll(fd_, dst, bytes, data_offset_ + info.begin)) {
    if (errno == 0) {
      return Changed(path_, absl::StrCat("short read of tensor \"", name, "\""));
    }
    return absl::DataLossError(
        absl::StrCat(path_, ": reading tensor \"", name, "\" failed: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<Tensor> SafetensorsFile::Get(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor \"", name, "\""));
  }
  const TensorInfo& info = it->second;
  if (in_memory_ != nullptr) {
    return Tensor(in_memory_, data_offset_ + info.begin, info.dtype, info.shape);
  }
  // Checkpoint tensors come and go block by block: keep them out of the heap.
  Tensor t = Tensor::ZerosMapped(info.dtype, info.shape);
  QCAL_RETURN_IF_ERROR(ReadInto(name, t.raw(), t.nbytes()));
  return t;
}

absl::StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  auto reader = std::make_unique<CheckpointReader>();
  reader->dir_ = dir;
  const std::string index_path = (fs::path(dir) / "model.safetensors.index.json").string();
  const std::string single_path = (fs::path(dir) / "model.safetensors").string();
  std::vector<std::string> shard_names;
  if (fs::exists(index_path)) {
    QCAL_ASSIGN_OR_RETURN(std::string text, ReadFileToString(index_path));
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      return Bad(index_path, absl::StrCat("malformed JSON: ", e.what()));
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return Bad(index_path, "missing \"weight_map\" object");
    }
    std::map<std::string, size_t> shard_ids;
    std::map<std::string, std::string> wanted;
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string()) return Bad(index_path, "weight_map values must be file names");
      std::string shard = it.value().get<std::string>();
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..") {
        return Bad(index_path, absl::StrCat("shard name \"", shard, "\" is not a plain file name"));
      }
      if (!shard_ids.count(shard)) {
        QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open((fs::path(dir) / shard).string()));
        shard_ids[shard] = reader->files_.size();
        reader->files_.push_back(std::move(file));
      }
      wanted[it.key()] = shard;
    }
    for (const auto& [name, shard] : wanted) {
      size_t id = shard_ids[shard];
      if (!reader->files_[id]->Has(name)) {
        return Bad(reader->files_[id]->path(),
                   absl::StrCat("tensor \"", name,
                                "\" listed in model.safetensors.index.json is missing"));
      }
      reader->index_[name] = id;
    }
  } else if (fs::exists(single_path)) {
    QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(single_path));
    for (const auto& [name, info] : file->tensors()) reader->index_[name] = 0;
    reader->files_.push_back(std::move(file));
  } else {
    return absl::NotFoundError(
        absl::StrCat(dir, ": no model.safetensors or model.safetensors.index.json"));
  }
  return reader;
}

std::vector<std::string> CheckpointReader::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, id] : index_) names.push_back(name);
  return names;
}

absl::StatusOr<TensorInfo> CheckpointReader::Info(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor \"", name, "\""));
  }
  return files_[it->second]->tensors().at(name);
}

absl::StatusOr<std::string> CheckpointReader::FileOf(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor \"", name, "\""));
  }
  return std::filesystem::path(files_[it->second]->path()).filename().string();
}

absl::StatusOr<Tensor> CheckpointReader::Get(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor \"", name, "\""));
  }
  return files_[it->second]->Get(name);
}

absl::Status CheckpointReader::ReadInto(const std::string& name, void* dst, size_t bytes) const {
  auto it = index_.find(name);
  if (it == index_.end()) {
    return absl::NotFoundError(absl::StrCat(dir_, ": checkpoint has no tensor \"", name, "\""));
  }
  return files_[it->second]->ReadInto(name, dst, bytes);
}

absl::StatusOr<Tensor> CheckpointReader::GetF32(const std::string& name,
                                                const Shape& expected) const {
  QCAL_ASSIGN_OR_RETURN(Tensor t, Get(name));
  const std::string& path = files_[index_.at(name)]->path();
  if (!expected.empty() && t.shape() != expected) {
    return Bad(path, absl::StrCat("tensor \"", name, "\" has shape ", ShapeString(t.shape()),
                                  ", expected ", ShapeString(expected)));
  }
  if (t.dtype() != DType::kF32 && t.dtype() != DType::kF16 && t.dtype() != DType::kBF16) {
    return Bad(path, absl::StrCat("tensor \"", name, "\" has dtype ", DTypeName(t.dtype()),
                                  "; expected F32, F16 or BF16"));
  }
  return t.ToF32();
}

std::string SafetensorsHeader(const std::map<std::string, TensorInfo>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  // nlohmann::ordered_json keeps insertion order; std::map iteration gives sorted names.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  for (const auto& [name, info] : tensors) {
    nlohmann::ordered_json entry;
    entry["dtype"] = std::string(DTypeName(info.dtype));
    entry["shape"] = info.shape;
    entry["data_offsets"] = {info.begin, info.end};
    header[name] = entry;
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::string out;
  out.reserve(8 + text.size());
  const uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((len >> (8 * i)) & 0xff));
  out += text;
  return out;
}

absl::StatusOr<std::string> SerializeSafetensors(
    const std::map<std::string, Tensor>& tensors,
    const std::map<std::string, std::string>& metadata) {
  std::map<std::string, TensorInfo> infos;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (t.device() != Device::kHost) {
      return absl::InvalidArgumentError(
          absl::StrCat("WriteSafetensors: \"", name, "\" is not on the host"));
    }
    infos[name] = TensorInfo{t.dtype(), t.shape(), offset, offset + t.nbytes()};
    offset += t.nbytes();
  }
  std::string out = SafetensorsHeader(infos, metadata);
  out.reserve(out.size() + offset);
  for (const auto& [name, t] : tensors) out.append(static_cast<const char*>(t.raw()), t.nbytes());
  return out;
}

absl::Status WriteSafetensors(const std::string& path, const std::map<std::string, Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  QCAL_ASSIGN_OR_RETURN(std::string bytes, SerializeSafetensors(tensors, metadata));
  return WriteStringToFile(path, bytes);
}

}  // namespace qcal
