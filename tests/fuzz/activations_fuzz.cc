// Fuzzes the activation-checkpoint reader (services/engine/driver/artifacts.h): the boundary
// checkpoint files a resumed job reads (metadata seq_len, next_block, chunk_batch, first_chunk,
// total_chunks; chunk.* and fp_chunk.* tensors), one file or the consecutive per-chunk files of a
// rank. What it accepts must be what the block runner indexes: chunk c is [chunk_batch[c] ·
// seq_len, width] in F32, every chunk of the same width, and the full-precision chunks match.
//
// Input: one checkpoint file, optionally followed by kFileSeparator and the next chunk's file
// (then the two are assembled, as a worker resuming on a range of chunks does).
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "services/engine/driver/artifacts.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qcal::kernels::Backend* backend = &qcal::fuzz::CpuBackend();
  const std::vector<std::string> files = qcal::fuzz::SplitFiles(data, size, 2);
  const qcal::fuzz::ScratchDir& dir = qcal::fuzz::ScratchDir::Get();
  dir.Clear();
  std::vector<std::string> paths = {dir.Write("chunk0.safetensors", files[0])};
  if (!files[1].empty()) paths.push_back(dir.Write("chunk1.safetensors", files[1]));
  auto acts = paths.size() == 1 ? qcal::engine::LoadActivations(*backend, paths[0])
                                : qcal::engine::AssembleActivations(*backend, paths);
  if (!acts.ok()) return 0;
  QCAL_CHECK(acts->seq_len >= 1 && acts->next_block >= 0);
  QCAL_CHECK(acts->chunks.size() == acts->chunk_batch.size());
  QCAL_CHECK(acts->fp_chunks.empty() || acts->fp_chunks.size() == acts->chunks.size());
  QCAL_CHECK(acts->first_chunk >= 0 &&
             acts->first_chunk + static_cast<int64_t>(acts->chunks.size()) <= acts->total_chunks);
  for (size_t c = 0; c < acts->chunks.size(); ++c) {
    const qcal::Tensor& t = acts->chunks[c];
    QCAL_CHECK(acts->chunk_batch[c] >= 1);
    QCAL_CHECK(t.dtype() == qcal::DType::kF32 && t.rank() == 2);
    QCAL_CHECK(t.dim(0) == int64_t{acts->chunk_batch[c]} * acts->seq_len);
    QCAL_CHECK(t.dim(1) == acts->chunks[0].dim(1));
    if (!acts->fp_chunks.empty()) QCAL_CHECK(acts->fp_chunks[c].shape() == t.shape());
  }
  return 0;
}
