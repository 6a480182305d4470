// qcal tokenize: the token ids of a text file under a model's tokenizer (DESIGN section 4: no BOS
// or EOS added, the file read as calibration and evaluation read it).
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/text_data.h"
#include "common/tokenizer.h"
#include "nlohmann/json.hpp"
#include "tools/qcal/commands.h"

namespace qcal::cli {
namespace {

struct TokenizeArgs {
  std::string model;
  std::string text;
  bool count = false;
  bool json = false;
  bool each_record = false;
};

void Print(const std::vector<int>& ids, const TokenizeArgs& a) {
  std::string line;
  if (a.json) {
    nlohmann::ordered_json j;
    j["count"] = ids.size();
    if (!a.count) j["ids"] = ids;
    line = j.dump();
  } else {
    line = a.count ? std::to_string(ids.size()) : absl::StrJoin(ids, " ");
  }
  std::printf("%s\n", line.c_str());
}

absl::Status RunTokenize(const TokenizeArgs& a) {
  QCAL_ASSIGN_OR_RETURN(auto tokenizer, Tokenizer::Load(a.model));
  spdlog::info("tokenize: {} of {} ({} ids, bos {}, eos [{}])", tokenizer->kind(), a.model,
               tokenizer->vocab_size(), tokenizer->bos_id(),
               absl::StrJoin(tokenizer->eos_ids(), ", "));
  if (a.each_record) {
    QCAL_ASSIGN_OR_RETURN(std::vector<std::string> records, LoadCorpusRecords(a.text));
    for (size_t i = 0; i < records.size(); ++i) {
      QCAL_ASSIGN_OR_RETURN(
          std::vector<int> ids,
          TokenizeCorpus(*tokenizer, records[i], absl::StrCat(a.text, " record ", i + 1)));
      Print(ids, a);
    }
    return absl::OkStatus();
  }
  QCAL_ASSIGN_OR_RETURN(std::string text, LoadCorpusText(a.text));
  QCAL_ASSIGN_OR_RETURN(std::vector<int> ids, TokenizeCorpus(*tokenizer, text, a.text));
  Print(ids, a);
  return absl::OkStatus();
}

}  // namespace

RunFn AddTokenize(CLI::App& app) {
  auto a = std::make_shared<TokenizeArgs>();
  app.add_option("--model", a->model, "Model directory (tokenizer.json or tokenizer.model)")
      ->required();
  app.add_option("--text", a->text, "Text file (.txt, or .jsonl with a \"text\" field)")
      ->required();
  app.add_flag("--count", a->count, "Print only the number of tokens");
  app.add_flag("--json", a->json, "Print {\"count\": N, \"ids\": [...]} as one JSON line");
  app.add_flag("--each-record", a->each_record,
               "For a .jsonl file, tokenize every record on its own: one output line each");
  return [a] { return RunTokenize(*a); };
}

}  // namespace qcal::cli
