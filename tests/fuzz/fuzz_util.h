// Shared by the libFuzzer harnesses (tests/fuzz/*_fuzz.cc) and their seed generator: one fuzz
// input cut into several files, a scratch directory for the parsers that read from disk, and a
// tiny Llama checkpoint for the harnesses that need a model around the file they fuzz.
//
// A harness that reads several files takes them from one input, separated by kFileSeparator; an
// empty part means "file absent". Nothing here hides a failure: setup that cannot succeed aborts
// the harness (a broken harness must not look like a quiet fuzzer).
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/backend.h"

namespace qcal::fuzz {

inline constexpr std::string_view kFileSeparator = "\n--qcal-fuzz-next-file--\n";

// The input cut at kFileSeparator into exactly `n` parts: missing trailing parts are empty, and
// the last part keeps any further separators.
std::vector<std::string> SplitFiles(const uint8_t* data, size_t size, size_t n);
// The inverse, for the seed generator.
std::string JoinFiles(const std::vector<std::string>& files);

// A directory of this process under $TMPDIR (or /tmp), removed at exit. Clear() empties it before
// each input; Write() creates a file (and its parent directories) below it.
class ScratchDir {
 public:
  // The process's scratch directory (created on first use).
  static ScratchDir& Get();
  const std::string& path() const { return path_; }
  // Removes everything below the directory.
  void Clear() const;
  // Writes `bytes` to `rel` below the directory; returns the full path. Aborts on failure.
  std::string Write(const std::string& rel, std::string_view bytes) const;

 private:
  ScratchDir();
  std::string path_;
};

// The process's CPU backend, one thread (created on first use; aborts if it cannot be).
kernels::Backend& CpuBackend();

// A tiny Llama checkpoint in Hugging Face layout: `config.json` and `model.safetensors` (F32,
// deterministic values): hidden 32, intermediate 64, 1 layer, 2 heads, 1 KV head, vocab 64.
// Every linear's d_in and d_out is a multiple of 32, as GPTQ v1 packing likes.
std::map<std::string, std::string> TinyModelFiles();
// The tiny model's config.json text.
std::string TinyModelConfigJson();
// A small byte-level BPE tokenizer.json: the printable ASCII bytes and the space (as GPT-2's
// stand-in "\u0120") at ids 0..94, a few merges, and the added tokens <s> (95), </s> (96) and
// <|eot|> (97).
std::string TinyTokenizerJson();
// Writes `files` (relative name -> bytes) below `dir`.
void WriteFiles(const std::string& dir, const std::map<std::string, std::string>& files);

}  // namespace qcal::fuzz
