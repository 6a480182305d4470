// Tests of the file helpers (common/files.h): SHA-256 of strings and files against the FIPS 180-4
// test vectors and against the system's `sha256sum`, and errors that name the file.
#include "common/files.h"

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/test_paths.h"

namespace qcal {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

class FilesTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::MakeTempDir("files_test");
    ASSERT_FALSE(dir_.empty());
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Write(const std::string& name, const std::string& bytes) {
    const std::string path = (fs::path(dir_) / name).string();
    EXPECT_TRUE(WriteStringToFile(path, bytes).ok());
    return path;
  }

  std::string dir_;
};

// FIPS 180-4 / NIST example vectors.
TEST(Sha256Test, KnownVectors) {
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(Sha256Hex(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
  EXPECT_EQ(Sha256Hex(std::string("\0", 1)),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d");
}

TEST_F(FilesTest, FileDigestMatchesTheStringDigest) {
  EXPECT_EQ(*Sha256File(Write("empty", "")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(*Sha256File(Write("abc", "abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST_F(FilesTest, MultiMebibyteFileMatchesSha256sum) {
  // 3 MiB + 17 bytes of SplitMix64 output: crosses the 1 MiB read blocks, ends mid-block.
  std::string bytes((3 << 20) + 17, '\0');
  uint64_t state = 42;
  for (char& c : bytes) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    c = static_cast<char>((z ^ (z >> 31)) & 0xff);
  }
  const std::string path = Write("random.bin", bytes);

  FILE* pipe = popen(("sha256sum '" + path + "'").c_str(), "r");
  ASSERT_NE(pipe, nullptr);
  char out[65] = {};
  const size_t n = std::fread(out, 1, 64, pipe);
  ASSERT_EQ(pclose(pipe), 0) << "sha256sum failed";
  ASSERT_EQ(n, 64u);
  const std::string expected(out, 64);

  auto digest = Sha256File(path);
  ASSERT_TRUE(digest.ok()) << digest.status();
  EXPECT_EQ(*digest, expected);
  EXPECT_EQ(Sha256Hex(bytes), expected);
}

TEST_F(FilesTest, MissingFileIsNotFoundNamingThePath) {
  const std::string path = (fs::path(dir_) / "absent").string();
  auto digest = Sha256File(path);
  ASSERT_FALSE(digest.ok());
  EXPECT_EQ(digest.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(digest.status().message()), HasSubstr(path));
}

TEST_F(FilesTest, DirectoryIsAReadErrorNamingThePath) {
  auto digest = Sha256File(dir_);
  ASSERT_FALSE(digest.ok());
  EXPECT_THAT(std::string(digest.status().message()), HasSubstr(dir_));
}

}  // namespace
}  // namespace qcal
