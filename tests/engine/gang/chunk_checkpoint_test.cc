// Per-chunk boundary checkpoints (DESIGN section 7: a job resumes on any number of workers): each
// chunk saved by its global index, and any contiguous run of them assembled into a rank's
// activations, bit for bit; files that are not consecutive chunks of one boundary are DataLoss.
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "kernels/backend.h"
#include "services/engine/driver/artifacts.h"
#include "tests/support/test_paths.h"

namespace qcal::engine {
namespace {

bool SameBytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

TEST(ChunkCheckpointTest, ChunksSavedOneByOneAssembleIntoAnyRange) {
  kernels::BackendOptions bo;
  bo.threads = 1;
  auto be = kernels::CreateBackend(bo);
  ASSERT_TRUE(be.ok()) << be.status();
  // Chunks 1..4 of 6 (a rank's share), the last of 3 samples.
  CalibActivations acts;
  acts.seq_len = 4;
  acts.next_block = 2;
  acts.first_chunk = 1;
  acts.total_chunks = 6;
  for (int c = 0; c < 4; ++c) {
    const int batch = c == 3 ? 3 : 8;
    Tensor t = Tensor::Zeros(DType::kF32, {int64_t{batch} * 4, 5});
    ASSERT_TRUE((*be)->FillUniform(t, 10u + static_cast<uint64_t>(c), -2.0f, 2.0f).ok());
    acts.chunks.push_back(t);
    acts.chunk_batch.push_back(batch);
  }
  const std::string dir = testing::MakeTempDir("chunk_checkpoint");
  std::vector<std::string> paths;
  for (int c = 1; c <= 4; ++c) {
    paths.push_back(dir + "/chunk-" + std::to_string(c) + ".safetensors");
    ASSERT_TRUE(SaveActivationChunk(**be, acts, c, paths.back()).ok());
  }
  EXPECT_EQ(SaveActivationChunk(**be, acts, 0, dir + "/x").code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SaveActivationChunk(**be, acts, 5, dir + "/x").code(),
            absl::StatusCode::kInvalidArgument);
  // Chunks 2..4, as a rank of another gang would take them.
  auto part = AssembleActivations(**be, {paths[1], paths[2], paths[3]});
  ASSERT_TRUE(part.ok()) << part.status();
  EXPECT_EQ(part->first_chunk, 2);
  EXPECT_EQ(part->total_chunks, 6);
  EXPECT_EQ(part->next_block, 2);
  EXPECT_EQ(part->seq_len, 4);
  EXPECT_EQ(part->chunk_batch, (std::vector<int>{8, 8, 3}));
  ASSERT_EQ(part->chunks.size(), 3u);
  for (size_t c = 0; c < 3; ++c) EXPECT_TRUE(SameBytes(part->chunks[c], acts.chunks[c + 1]));
  // The whole share saved at once reads back the same way.
  ASSERT_TRUE(SaveActivations(**be, acts, dir + "/all.safetensors").ok());
  auto all = LoadActivations(**be, dir + "/all.safetensors");
  ASSERT_TRUE(all.ok()) << all.status();
  EXPECT_EQ(all->first_chunk, 1);
  EXPECT_EQ(all->total_chunks, 6);
  // A gap, a repeat, nothing.
  EXPECT_EQ(AssembleActivations(**be, {paths[0], paths[2]}).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(AssembleActivations(**be, {paths[1], paths[1]}).status().code(),
            absl::StatusCode::kDataLoss);
  EXPECT_EQ(AssembleActivations(**be, {}).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qcal::engine
