// Fuzzes the solved-layer reader (services/engine/gang/exchange.h, ParseSolvedLayer): the bytes a
// gang member receives from the linear's owner, and, inside them, the layer artifact a worker
// commits and reads back on resume (services/engine/driver/artifacts.h, ParseLayerArtifact: codes,
// zeros, g_idx, perm, scales and their metadata, the low-rank factors, folded tensors) and the
// layer report JSON. What parses must be safe to install: its dequantization (what InstallWeight
// computes) reads only inside the tensors, and it serializes back to bytes that parse to the same
// artifact.
//
// Input: one solved layer (SerializeSolvedLayer's bytes).
#include <cstdint>
#include <string>

#include "common/status.h"
#include "services/engine/driver/artifacts.h"
#include "services/engine/gang/exchange.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<qcal::engine::LayerResult> layer = qcal::engine::ParseSolvedLayer(bytes);
  if (!layer.ok()) return 0;
  const qcal::kernels::QuantizedLinear& q = layer->quantized;
  const std::vector<float> w = q.Dequantized();
  QCAL_CHECK(static_cast<int64_t>(w.size()) == q.d_out * q.d_in);
  const std::string artifact = qcal::engine::SerializeLayerArtifact(*layer);
  absl::StatusOr<qcal::engine::LayerResult> again = qcal::engine::ParseLayerArtifact(artifact);
  QCAL_CHECK(again.ok());
  QCAL_CHECK(qcal::engine::SerializeLayerArtifact(*again) == artifact);
  return 0;
}
