#include "services/engine/driver/artifacts.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/safetensors.h"
#include "common/status.h"
#include "kernels/quant_ops.h"

namespace qcal::engine {
namespace {

Tensor I32Tensor(const std::vector<int32_t>& v) {
  Tensor t = Tensor::Zeros(DType::kI32, {static_cast<int64_t>(v.size())});
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size() * sizeof(int32_t));
  return t;
}

// Codes are at most 8 bits: one byte each, in memory and in artifacts.
Tensor U8Tensor(const std::vector<uint8_t>& v) {
  Tensor t = Tensor::Zeros(DType::kU8, {static_cast<int64_t>(v.size())});
  if (!v.empty()) std::memcpy(t.raw(), v.data(), v.size());
  return t;
}

std::vector<int32_t> I32Vector(const Tensor& t) {
  const int32_t* p = t.data<int32_t>();
  return std::vector<int32_t>(p, p + t.numel());
}

// The tensors and metadata of a quantized linear's artifact.
void QuantizedLinearEntries(const QuantizedLinear& q, std::map<std::string, Tensor>& t,
                            std::map<std::string, std::string>& meta) {
  t["codes"] = U8Tensor(q.codes);
  t["zeros"] = I32Tensor(q.zeros);
  t["g_idx"] = I32Tensor(q.g_idx);
  t["perm"] = I32Tensor(q.perm);
  t["scales"] = Tensor::FromVector(q.scales, {static_cast<int64_t>(q.scales.size())});
  meta = {{"d_out", absl::StrCat(q.d_out)},
          {"d_in", absl::StrCat(q.d_in)},
          {"bits", absl::StrCat(q.spec.bits)},
          {"group_size", absl::StrCat(q.spec.group_size)},
          {"effective_group_size", absl::StrCat(q.group_size)},
          {"n_groups", absl::StrCat(q.n_groups)},
          {"symmetric", q.spec.symmetric ? "1" : "0"},
          {"grid", RecipeName(q.spec.grid)}};
}

// Everything Install, the export and the exchange index by: a valid spec, positive dimensions
// whose product fits, codes on the grid, groups inside the scales and zeros, and a permutation.
absl::Status ValidateQuantizedLinear(const QuantizedLinear& q) {
  auto bad = [](const std::string& what) {
    return absl::DataLossError(absl::StrCat("quantized linear artifact: ", what));
  };
  if (absl::Status s = kernels::ValidateQuantSpec(q.spec); !s.ok()) {
    return bad(std::string(s.message()));
  }
  if (q.d_out < 1 || q.d_in < 1 || q.d_out > (int64_t{1} << 31) || q.d_in > (int64_t{1} << 31)) {
    return bad(absl::StrCat("shape [", q.d_out, ", ", q.d_in, "] is not positive and below 2^31"));
  }
  if (q.group_size != kernels::EffectiveGroupSize(q.spec, q.d_in) ||
      q.n_groups != kernels::NumGroups(q.spec, q.d_in)) {
    return bad(absl::StrCat("group size ", q.group_size, " and ", q.n_groups,
                            " groups do not follow group_size ", q.spec.group_size, " and d_in ",
                            q.d_in));
  }
  // Sizes compared before the product: d_out · d_in may not fit int64.
  if (static_cast<int64_t>(q.codes.size()) / q.d_in != q.d_out ||
      static_cast<int64_t>(q.codes.size()) % q.d_in != 0 ||
      static_cast<int64_t>(q.scales.size()) != q.n_groups * q.d_out ||
      static_cast<int64_t>(q.zeros.size()) != q.n_groups * q.d_out ||
      static_cast<int64_t>(q.g_idx.size()) != q.d_in ||
      (!q.perm.empty() && static_cast<int64_t>(q.perm.size()) != q.d_in)) {
    return bad("inconsistent sizes");
  }
  for (int32_t g : q.g_idx) {
    if (g < 0 || g >= q.n_groups) {
      return bad(absl::StrCat("g_idx ", g, " is outside [0, ", q.n_groups, ")"));
    }
  }
  std::vector<bool> seen(q.perm.size(), false);
  for (int32_t p : q.perm) {
    if (p < 0 || p >= q.d_in || seen[static_cast<size_t>(p)]) {
      return bad("perm is not a permutation of the input columns");
    }
    seen[static_cast<size_t>(p)] = true;
  }
  const int32_t max_code = kernels::MaxCode(q.spec);
  for (int32_t c : q.codes) {
    if (c < 0 || c > max_code) return bad(absl::StrCat("code ", c, " is outside 0..", max_code));
  }
  // Zero points lie in 0..max_code + 1 (GPTQ v1's range, 2^b for uniform grids): q − z then fits.
  for (int32_t z : q.zeros) {
    if (z < 0 || z > max_code + 1) {
      return bad(absl::StrCat("zero point ", z, " is outside 0..", max_code + 1));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<QuantizedLinear> QuantizedLinearFrom(const SafetensorsFile* file) {
  const auto& meta = file->metadata();
  auto get = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = meta.find(key);
    if (it == meta.end() || !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat("quantized linear artifact lacks \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QuantizedLinear q;
  int64_t bits = 0, gs = 0, sym = 0;
  QCAL_RETURN_IF_ERROR(get("d_out", &q.d_out));
  QCAL_RETURN_IF_ERROR(get("d_in", &q.d_in));
  QCAL_RETURN_IF_ERROR(get("bits", &bits));
  QCAL_RETURN_IF_ERROR(get("group_size", &gs));
  QCAL_RETURN_IF_ERROR(get("effective_group_size", &q.group_size));
  QCAL_RETURN_IF_ERROR(get("n_groups", &q.n_groups));
  QCAL_RETURN_IF_ERROR(get("symmetric", &sym));
  if (bits < 2 || bits > 8 || gs < -1 || gs > (int64_t{1} << 31) - 1) {
    return absl::DataLossError(absl::StrCat("quantized linear artifact: bits ", bits,
                                            " or group_size ", gs, " out of range"));
  }
  q.spec.bits = static_cast<int>(bits);
  q.spec.group_size = static_cast<int>(gs);
  q.spec.symmetric = sym != 0;
  auto grid = meta.find("grid");
  if (grid != meta.end()) {
    absl::StatusOr<GridKind> kind = ParseGrid(grid->second);
    if (!kind.ok()) return absl::DataLossError(kind.status().message());
    q.spec.grid = *kind;
  }
  // Each tensor's stored dtype, as QuantizedLinearEntries writes it.
  const std::pair<const char*, DType> tensors[] = {{"codes", DType::kU8},
                                                   {"zeros", DType::kI32},
                                                   {"g_idx", DType::kI32},
                                                   {"perm", DType::kI32},
                                                   {"scales", DType::kF32}};
  std::map<std::string, Tensor> t;
  for (const auto& [name, dtype] : tensors) {
    if (!file->Has(name))
      return absl::DataLossError(absl::StrCat("quantized linear artifact lacks ", name));
    QCAL_ASSIGN_OR_RETURN(t[name], file->Get(name));
    if (t[name].dtype() != dtype) {
      return absl::DataLossError(absl::StrCat("quantized linear artifact: ", name, " is ",
                                              DTypeName(t[name].dtype()), ", not ",
                                              DTypeName(dtype)));
    }
  }
  const uint8_t* cp = t["codes"].data<uint8_t>();
  q.codes.assign(cp, cp + t["codes"].numel());
  q.zeros = I32Vector(t["zeros"]);
  q.g_idx = I32Vector(t["g_idx"]);
  q.perm = I32Vector(t["perm"]);
  const float* sp = t["scales"].data<float>();
  q.scales.assign(sp, sp + t["scales"].numel());
  QCAL_RETURN_IF_ERROR(ValidateQuantizedLinear(q));
  return q;
}

std::string Serialize(const std::map<std::string, Tensor>& t,
                      const std::map<std::string, std::string>& meta) {
  auto bytes = SerializeSafetensors(t, meta);
  QCAL_CHECK(bytes.ok());  // host tensors only: cannot fail
  return *std::move(bytes);
}

constexpr char kFoldedPrefix[] = "folded/";
// The quantized path's and (recipes that retrain) the full-precision path's chunks in an
// activation checkpoint.
constexpr char kChunkPrefix[] = "chunk.";
constexpr char kFpChunkPrefix[] = "fp_chunk.";

}  // namespace

absl::Status SaveActivations(kernels::Backend& backend, const CalibActivations& acts,
                             const std::string& path) {
  std::map<std::string, Tensor> tensors;
  std::string batches;
  if (!acts.fp_chunks.empty() && acts.fp_chunks.size() != acts.chunks.size()) {
    return absl::InvalidArgumentError(absl::StrCat("activations with ", acts.chunks.size(),
                                                   " chunks and ", acts.fp_chunks.size(),
                                                   " full-precision chunks"));
  }
  for (size_t c = 0; c < acts.chunks.size(); ++c) {
    const int index = 100000 + acts.first_chunk + static_cast<int>(c);
    QCAL_ASSIGN_OR_RETURN(Tensor host, backend.ToHost(acts.chunks[c]));
    tensors[absl::StrCat(kChunkPrefix, index)] = host;
    if (!acts.fp_chunks.empty()) {
      QCAL_ASSIGN_OR_RETURN(tensors[absl::StrCat(kFpChunkPrefix, index)],
                            backend.ToHost(acts.fp_chunks[c]));
    }
    absl::StrAppend(&batches, c ? "," : "", acts.chunk_batch[c]);
  }
  return WriteSafetensors(path, tensors,
                          {{"seq_len", absl::StrCat(acts.seq_len)},
                           {"next_block", absl::StrCat(acts.next_block)},
                           {"chunk_batch", batches},
                           {"first_chunk", absl::StrCat(acts.first_chunk)},
                           {"total_chunks", absl::StrCat(acts.total_chunks)}});
}

absl::Status SaveActivationChunk(kernels::Backend& backend, const CalibActivations& acts, int chunk,
                                 const std::string& path) {
  const int local = chunk - acts.first_chunk;
  if (local < 0 || local >= static_cast<int>(acts.chunks.size())) {
    return absl::InvalidArgumentError(absl::StrCat("chunk ", chunk, " is not held (chunks ",
                                                   acts.first_chunk, " to ",
                                                   acts.first_chunk + acts.chunks.size(), ")"));
  }
  CalibActivations one;
  one.seq_len = acts.seq_len;
  one.next_block = acts.next_block;
  one.chunks = {acts.chunks[static_cast<size_t>(local)]};
  if (!acts.fp_chunks.empty()) one.fp_chunks = {acts.fp_chunks[static_cast<size_t>(local)]};
  one.chunk_batch = {acts.chunk_batch[static_cast<size_t>(local)]};
  one.first_chunk = chunk;
  one.total_chunks = acts.total_chunks;
  return SaveActivations(backend, one, path);
}

absl::StatusOr<CalibActivations> AssembleActivations(kernels::Backend& backend,
                                                     const std::vector<std::string>& chunk_paths) {
  if (chunk_paths.empty()) return absl::InvalidArgumentError("no activation chunk files");
  CalibActivations acts;
  for (size_t i = 0; i < chunk_paths.size(); ++i) {
    QCAL_ASSIGN_OR_RETURN(CalibActivations part, LoadActivations(backend, chunk_paths[i]));
    if (i == 0) {
      acts.seq_len = part.seq_len;
      acts.next_block = part.next_block;
      acts.first_chunk = part.first_chunk;
      acts.total_chunks = part.total_chunks;
    }
    const int expected = acts.first_chunk + static_cast<int>(acts.chunks.size());
    if (part.seq_len != acts.seq_len || part.next_block != acts.next_block ||
        part.total_chunks != acts.total_chunks || part.first_chunk != expected) {
      return absl::DataLossError(
          absl::StrCat(chunk_paths[i], ": chunk ", part.first_chunk, " at block ", part.next_block,
                       " of ", part.total_chunks, " does not follow chunk ", expected - 1,
                       " at block ", acts.next_block, " of ", acts.total_chunks));
    }
    if (i > 0 && part.fp_chunks.empty() != acts.fp_chunks.empty()) {
      return absl::DataLossError(absl::StrCat(
          chunk_paths[i], ": the chunk files do not all hold the full-precision path"));
    }
    for (size_t c = 0; c < part.chunks.size(); ++c) {
      acts.chunks.push_back(std::move(part.chunks[c]));
      acts.chunk_batch.push_back(part.chunk_batch[c]);
      if (!part.fp_chunks.empty()) acts.fp_chunks.push_back(std::move(part.fp_chunks[c]));
    }
  }
  return acts;
}

absl::StatusOr<CalibActivations> LoadActivations(kernels::Backend& backend,
                                                 const std::string& path) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(path));
  CalibActivations acts;
  const auto& meta = file->metadata();
  auto get_int = [&](const char* key, int* out) -> absl::Status {
    auto it = meta.find(key);
    if (it == meta.end() || !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat(path, ": activation checkpoint lacks \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QCAL_RETURN_IF_ERROR(get_int("seq_len", &acts.seq_len));
  QCAL_RETURN_IF_ERROR(get_int("next_block", &acts.next_block));
  auto it = meta.find("chunk_batch");
  if (it == meta.end())
    return absl::DataLossError(absl::StrCat(path, ": activation checkpoint lacks chunk_batch"));
  if (acts.seq_len < 1 || acts.next_block < 0) {
    return absl::DataLossError(absl::StrCat(path, ": seq_len ", acts.seq_len, " or next_block ",
                                            acts.next_block, " out of range"));
  }
  for (absl::string_view part : absl::StrSplit(it->second, ',')) {
    int v = 0;
    if (!absl::SimpleAtoi(part, &v) || v < 1)
      return absl::DataLossError(absl::StrCat(path, ": bad chunk_batch"));
    acts.chunk_batch.push_back(v);
  }
  // Tensors are "chunk.<index>", then (recipes that retrain) "fp_chunk.<index>", each in chunk
  // order: names sort "chunk.*" before "fp_chunk.*", and indices have six digits.
  size_t fp = 0, quantized_path = 0;
  for (const auto& [name, info] : file->tensors()) {
    if (name.rfind(kFpChunkPrefix, 0) == 0) {
      ++fp;
    } else if (name.rfind(kChunkPrefix, 0) == 0) {
      ++quantized_path;
    } else {
      return absl::DataLossError(absl::StrCat(path, ": unexpected tensor \"", name, "\""));
    }
  }
  if (acts.chunk_batch.size() != quantized_path || (fp != 0 && fp != quantized_path)) {
    return absl::DataLossError(absl::StrCat(path, ": chunk count does not match chunk_batch"));
  }
  // Checkpoints written before gangs hold every chunk.
  acts.total_chunks = static_cast<int>(acts.chunk_batch.size());
  if (meta.count("first_chunk") || meta.count("total_chunks")) {
    QCAL_RETURN_IF_ERROR(get_int("first_chunk", &acts.first_chunk));
    QCAL_RETURN_IF_ERROR(get_int("total_chunks", &acts.total_chunks));
  }
  if (acts.first_chunk < 0 ||
      int64_t{acts.first_chunk} + static_cast<int64_t>(acts.chunk_batch.size()) >
          acts.total_chunks) {
    return absl::DataLossError(absl::StrCat(path, ": chunks from ", acts.first_chunk,
                                            " do not fit in ", acts.total_chunks));
  }
  for (const auto& [name, info] : file->tensors()) {
    QCAL_ASSIGN_OR_RETURN(Tensor t, file->Get(name));
    const bool full_precision = name.rfind(kFpChunkPrefix, 0) == 0;
    const size_t c = full_precision ? acts.fp_chunks.size() : acts.chunks.size();
    if (t.dtype() != DType::kF32 || t.rank() != 2) {
      return absl::DataLossError(absl::StrCat(path, ": chunk ", name, " is ", t.DebugString()));
    }
    // Chunk c holds its samples' rows, as wide as the other chunks (the block runner's shapes).
    const Shape expected = {int64_t{acts.chunk_batch[c]} * acts.seq_len,
                            acts.chunks.empty() ? t.dim(1) : acts.chunks[0].dim(1)};
    if (t.shape() != expected) {
      return absl::DataLossError(absl::StrCat(path, ": chunk ", name, " is ", t.DebugString(),
                                              ", expected F32", ShapeString(expected)));
    }
    QCAL_ASSIGN_OR_RETURN(Tensor dev, backend.ToDevice(t));
    (full_precision ? acts.fp_chunks : acts.chunks).push_back(std::move(dev));
  }
  return acts;
}

std::string SerializeQuantizedLinear(const QuantizedLinear& q) {
  std::map<std::string, Tensor> t;
  std::map<std::string, std::string> meta;
  QuantizedLinearEntries(q, t, meta);
  return Serialize(t, meta);
}

absl::StatusOr<QuantizedLinear> ParseQuantizedLinear(const std::string& bytes) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(bytes, "quantized linear artifact"));
  return QuantizedLinearFrom(file.get());
}

std::string SerializeLayerArtifact(const LayerResult& r) {
  std::map<std::string, Tensor> t;
  std::map<std::string, std::string> meta;
  QuantizedLinearEntries(r.quantized, t, meta);
  meta["act_bits"] = absl::StrCat(r.act_bits);
  meta["rank"] = absl::StrCat(r.report.rank);
  if (r.report.rank > 0) {
    t["lora_a"] = Tensor::FromVector(r.lora_a, {r.quantized.d_out, r.report.rank});
    t["lora_b"] = Tensor::FromVector(r.lora_b, {r.report.rank, r.quantized.d_in});
  }
  for (const auto& [name, host] : r.folded) t[kFoldedPrefix + name] = host;
  return Serialize(t, meta);
}

absl::StatusOr<LayerResult> ParseLayerArtifact(const std::string& bytes) {
  QCAL_ASSIGN_OR_RETURN(auto file, SafetensorsFile::FromBytes(bytes, "layer artifact"));
  LayerResult r;
  QCAL_ASSIGN_OR_RETURN(r.quantized, QuantizedLinearFrom(file.get()));
  const auto& meta = file->metadata();
  int64_t act_bits = 16, rank = 0;
  auto get = [&](const char* key, int64_t* out) -> absl::Status {
    auto it = meta.find(key);
    if (it != meta.end() && !absl::SimpleAtoi(it->second, out)) {
      return absl::DataLossError(absl::StrCat("layer artifact has a bad \"", key, "\""));
    }
    return absl::OkStatus();
  };
  QCAL_RETURN_IF_ERROR(get("act_bits", &act_bits));
  QCAL_RETURN_IF_ERROR(get("rank", &rank));
  if (act_bits != 16 && (act_bits < 4 || act_bits > 8)) {
    return absl::DataLossError(
        absl::StrCat("layer artifact: act_bits ", act_bits, " is not 16 (off) or 4..8"));
  }
  if (rank < 0 || rank > std::min(r.quantized.d_out, r.quantized.d_in)) {
    return absl::DataLossError(absl::StrCat("layer artifact: rank ", rank, " is outside 0..",
                                            std::min(r.quantized.d_out, r.quantized.d_in)));
  }
  r.act_bits = static_cast<int>(act_bits);
  r.report.rank = rank;
  if (rank > 0) {
    if (!file->Has("lora_a") || !file->Has("lora_b")) {
      return absl::DataLossError("layer artifact of rank > 0 lacks its low-rank factors");
    }
    QCAL_ASSIGN_OR_RETURN(Tensor a, file->Get("lora_a"));
    QCAL_ASSIGN_OR_RETURN(Tensor b, file->Get("lora_b"));
    if (a.dtype() != DType::kF32 || b.dtype() != DType::kF32 ||
        a.shape() != Shape{r.quantized.d_out, rank} || b.shape() != Shape{rank, r.quantized.d_in}) {
      return absl::DataLossError("layer artifact has low-rank factors of the wrong shape");
    }
    r.lora_a.assign(a.data<float>(), a.data<float>() + a.numel());
    r.lora_b.assign(b.data<float>(), b.data<float>() + b.numel());
  }
  for (const auto& [name, info] : file->tensors()) {
    if (name.rfind(kFoldedPrefix, 0) != 0) continue;
    QCAL_ASSIGN_OR_RETURN(Tensor t, file->Get(name));
    if (t.dtype() != DType::kF32) {
      return absl::DataLossError(absl::StrCat("layer artifact: ", name, " is not F32"));
    }
    r.folded[name.substr(sizeof(kFoldedPrefix) - 1)] = t.Clone();
  }
  return r;
}

void AddToExtras(const LayerResult& r, CheckpointExtras& extras) {
  for (const auto& [name, t] : r.folded) extras.replaced[name] = t;
  if (r.report.rank > 0) {
    const int64_t rank = r.report.rank;
    extras.adapters[r.report.name] = {Tensor::FromVector(r.lora_a, {r.quantized.d_out, rank}),
                                      Tensor::FromVector(r.lora_b, {rank, r.quantized.d_in})};
  }
}

}  // namespace qcal::engine
