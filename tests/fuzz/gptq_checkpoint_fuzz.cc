// Fuzzes the GPTQ v1 checkpoint loader (services/engine/export/checkpoint_loader.h, DESIGN
// section 5's reading rules): quantization_config in config.json or quantize_config.json, and the
// qweight / qzeros / scales / g_idx tensors dequantized at load, on the CPU backend.
//
// Input: config.json, kFileSeparator, quantize_config.json (empty: absent), kFileSeparator,
// model.safetensors.
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "services/engine/export/checkpoint_loader.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qcal::kernels::Backend* backend = &qcal::fuzz::CpuBackend();
  const std::vector<std::string> files = qcal::fuzz::SplitFiles(data, size, 3);
  const qcal::fuzz::ScratchDir& dir = qcal::fuzz::ScratchDir::Get();
  dir.Clear();
  dir.Write("config.json", files[0]);
  if (!files[1].empty()) dir.Write("quantize_config.json", files[1]);
  dir.Write("model.safetensors", files[2]);
  auto quantization = qcal::engine::ReadCheckpointQuantization(dir.path());
  auto model = qcal::engine::LoadCheckpoint(dir.path(), backend);
  // The loader reads the quantization config first: it cannot load what it refuses.
  QCAL_CHECK(quantization.ok() || !model.ok());
  if (model.ok()) {
    for (int b = 0; b < (*model)->num_blocks(); ++b) QCAL_CHECK((*model)->resident(b));
  }
  return 0;
}
