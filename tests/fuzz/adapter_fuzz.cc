// Fuzzes the PEFT LoRA adapter loader (services/engine/export/checkpoint_loader.h, DESIGN section
// 5): adapter_config.json (peft_type, r, lora_alpha, rank_pattern, alpha_pattern) and
// adapter_model.safetensors (tensor names, shapes and dtypes of lora_A / lora_B), loaded with a
// fixed tiny base model (fuzz_util.h) on the CPU backend.
//
// Input: adapter_config.json, kFileSeparator, adapter_model.safetensors.
#include <cstdint>
#include <string>
#include <vector>

#include "common/status.h"
#include "services/engine/export/checkpoint_loader.h"
#include "tests/fuzz/fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  qcal::kernels::Backend* backend = &qcal::fuzz::CpuBackend();
  static const std::map<std::string, std::string> base = qcal::fuzz::TinyModelFiles();
  const std::vector<std::string> files = qcal::fuzz::SplitFiles(data, size, 2);
  const qcal::fuzz::ScratchDir& dir = qcal::fuzz::ScratchDir::Get();
  dir.Clear();
  qcal::fuzz::WriteFiles(dir.path(), base);
  dir.Write("adapter/adapter_config.json", files[0]);
  dir.Write("adapter/adapter_model.safetensors", files[1]);
  auto model = qcal::engine::LoadCheckpoint(dir.path(), backend);
  if (!model.ok()) return 0;
  // The installed branches fit their linears: [d_out, r] and [r, d_in].
  for (qcal::engine::LinearKind k : qcal::engine::kAllLinears) {
    const qcal::engine::Linear& lin = (*model)->block(0).at(k);
    if (!lin.lora_a.defined()) continue;
    QCAL_CHECK(lin.lora_a.dim(0) == lin.weight.dim(0) && lin.lora_b.dim(1) == lin.weight.dim(1) &&
               lin.lora_a.dim(1) == lin.lora_b.dim(0));
  }
  return 0;
}
