#!/usr/bin/env python3
"""Compares `qcal tokenize` with Hugging Face tokenizers (the Rust library behind transformers'
fast tokenizers). Not part of CI: HF tokenizers is not a Debian package; the GPU machine's python
has it.

  hf_compare.py pack OUT_DIR MODEL_DIR...        (here) copies each model's tokenizer files and
                                                 the texts (tests/common/tokenizer_cases.json
                                                 and ../shared/data/*.txt) into OUT_DIR
  hf_compare.py encode PACK_DIR RESULT.json      (where `tokenizers` is installed) encodes every
                                                 text with every model: ids and decoded text
  hf_compare.py compare PACK_DIR RESULT.json QCAL   (here) runs `QCAL tokenize --json
                                                 --each-record` on the same texts and reports
                                                 the strings compared and any difference

Texts are encoded without special tokens added and decoded without skipping them, as qcal's
calibration and evaluation tokenize (DESIGN section 4).
"""
import json
import os
import shutil
import subprocess
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FILES = ("tokenizer.json", "tokenizer_config.json")


def read_text(path):
    # As DESIGN section 4 reads text files (Python's utf-8-sig, universal newlines).
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


def pack(out_dir, model_dirs):
    os.makedirs(out_dir, exist_ok=True)
    models = []
    for d in model_dirs:
        name = os.path.basename(os.path.normpath(d))
        os.makedirs(os.path.join(out_dir, name), exist_ok=True)
        for f in FILES:
            if os.path.exists(os.path.join(d, f)):
                shutil.copy(os.path.join(d, f), os.path.join(out_dir, name, f))
        models.append(name)
    texts = []
    with open(os.path.join(ROOT, "tests/common/tokenizer_cases.json"), encoding="utf-8") as f:
        for group in json.load(f):
            texts += [{"what": group["what"], "text": t} for t in group["texts"]]
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    if os.path.isdir(shared):
        for n in sorted(os.listdir(shared)):
            if n.endswith(".txt"):
                texts.append({"what": n, "text": read_text(os.path.join(shared, n))})
    with open(os.path.join(out_dir, "pack.json"), "w", encoding="utf-8") as f:
        json.dump({"models": models, "texts": texts}, f)


def encode(pack_dir, result):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    import tokenizers  # pylint: disable=import-outside-toplevel
    with open(os.path.join(pack_dir, "pack.json"), encoding="utf-8") as f:
        p = json.load(f)
    out = {"tokenizers_version": tokenizers.__version__, "models": {}}
    for m in p["models"]:
        tok = Tokenizer.from_file(os.path.join(pack_dir, m, "tokenizer.json"))
        ids, decoded = [], []
        for t in p["texts"]:
            e = tok.encode(t["text"], add_special_tokens=False).ids
            ids.append(e)
            decoded.append(tok.decode(e, skip_special_tokens=False))
        out["models"][m] = {"ids": ids, "decoded": decoded}
    with open(result, "w", encoding="utf-8") as f:
        json.dump(out, f)


def compare(pack_dir, result, qcal):
    with open(os.path.join(pack_dir, "pack.json"), encoding="utf-8") as f:
        p = json.load(f)
    with open(result, encoding="utf-8") as f:
        hf = json.load(f)
    jsonl = os.path.join(pack_dir, "texts.jsonl")
    with open(jsonl, "w", encoding="utf-8") as f:
        for t in p["texts"]:
            f.write(json.dumps({"text": t["text"]}) + "\n")
    bad = 0
    for m in p["models"]:
        r = subprocess.run([qcal, "tokenize", "--model", os.path.join(pack_dir, m), "--text",
                            jsonl, "--json", "--each-record"], capture_output=True, text=True,
                           check=True)
        mine = [json.loads(line)["ids"] for line in r.stdout.splitlines()]
        theirs = hf["models"][m]
        tokens = 0
        for i, t in enumerate(p["texts"]):
            tokens += len(mine[i])
            norm = t["text"]
            with open(os.path.join(pack_dir, m, "tokenizer.json"), encoding="utf-8") as f:
                if (json.load(f).get("normalizer") or {}).get("type") == "NFC":
                    norm = unicodedata.normalize("NFC", norm)
            if mine[i] != theirs["ids"][i]:
                bad += 1
                print(f"{m}: ids differ on {t['what']}: {t['text'][:80]!r}")
            if theirs["decoded"][i] != norm:
                bad += 1
                print(f"{m}: HF decode(encode(x)) != normalize(x) on {t['what']}")
        print(f"{m}: {len(p['texts'])} strings, {tokens} tokens compared with HF tokenizers "
              f"{hf['tokenizers_version']}")
    print("identical" if bad == 0 else f"{bad} differences")
    return 1 if bad else 0


def main(argv):
    if len(argv) >= 3 and argv[1] == "pack":
        pack(argv[2], argv[3:])
        return 0
    if len(argv) == 4 and argv[1] == "encode":
        encode(argv[2], argv[3])
        return 0
    if len(argv) == 5 and argv[1] == "compare":
        return compare(argv[2], argv[3], argv[4])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
