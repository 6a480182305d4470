#!/usr/bin/env python3
"""Compares qcal's forward pass with Hugging Face transformers on synthetic checkpoints of each
model family (issue 20, acceptance 2). Not part of CI: it needs torch and transformers 5.x, and is
meant for the GPU machine.

For each family (llama, llama3, qwen2, qwen3, mistral, and the mixture-of-experts families mixtral,
qwen2_moe, qwen3_moe of issue 17) it
  1. writes a synthetic tiny checkpoint with `qcal synth --arch FAMILY` (small windows and small
     original_max_position_embeddings, see services/engine/synth/synthetic_checkpoint.h);
  2. runs `qcal eval --logits-out` on the first window of the checkpoint's eval.txt, long enough to
     pass Mistral's sliding window (16) and the llama3 / YaRN original_max_position_embeddings (64),
     and runs transformers in fp32 (eager attention, TF32 off) on the same token ids (read back from
     the logits file); prints the relative Frobenius error ||qcal - hf|| / ||hf||, which must be
     <= 1e-4;
  3. generates 64 tokens greedily from BOS with transformers (a full forward per step, ties to the
     lowest id, stopping at BOS or EOS as qcal does) and with `qcal generate`, and checks that
     (a) qcal's argmax at every position of the transformers sequence, from `qcal eval --ids
         --logits-out`, is the token transformers chose (the two greedy generations are then the
         same ids), and
     (b) the text `qcal generate` prints equals transformers' ids decoded with the checkpoint's
         tokenizer.model (needs the `sentencepiece` module, else AutoTokenizer; skipped when neither
         loads it);
  4. for the MoE families, compares the experts chosen for every token of the window of step 2:
     qcal's (`qcal eval --dump-routing`) against transformers' (the router module's indices when it
     returns them, as transformers 5's TopKRouter classes do; else torch.topk of the fp32 softmax of
     the router's logits, recomputed from its input and weight), block by block, in top-k order; every choice must be identical, and the routing
     weights must agree within the tolerance.
qcal runs on every device asked for (--qcal-devices, default cpu plus cuda when torch sees a GPU),
so the CUDA attention kernels (sliding window) are compared too.

Usage:
  python3 tools/families/compare_transformers.py QCAL_BINARY WORK_DIR [--families a,b,...]
      [--qcal-devices cpu,cuda] [--hf-device cuda|cpu] [--tolerance 1e-4]

WORK_DIR receives the checkpoints, logits files and summary.md (a markdown table of the results).
Exit status 0 when every check passes, 1 otherwise.
"""

import argparse
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np

# family -> tokens of the compared window (each past the family's window or original length).
FAMILIES = {
    "llama": 128,
    "llama3": 200,  # original_max_position_embeddings 64
    "qwen2": 200,  # YaRN, original_max_position_embeddings 64, max_position_embeddings 256
    "qwen3": 160,
    "mistral": 100,  # sliding_window 16
    "mixtral": 128,  # 4 experts, top 2, renormalised
    "qwen2_moe": 128,  # 8 experts, top 4, shared expert with its sigmoid gate
    "qwen3_moe": 128,  # 8 experts, top 2, norm_topk_prob; block 0 dense (mlp_only_layers)
}
MOE_FAMILIES = {"mixtral", "qwen2_moe", "qwen3_moe"}
GENERATE_TOKENS = 64


def run(cmd, **kw):
    print("+ " + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}")
    return p.stdout


def read_safetensors(path):
    """Minimal reader (F32 / I32 tensors), so that the script needs no safetensors package."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F32": np.float32, "I32": np.int32, "I64": np.int64}[info["dtype"]]
        b, e = info["data_offsets"]
        out[name] = np.frombuffer(data[base + b : base + e], dtype=dtype).reshape(info["shape"])
    return out


def rel_fro(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def load_hf(model_dir, device):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "eager"}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    except TypeError:  # transformers 4.x spells it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kwargs)
    return model.to(device).eval()


def hf_logits(model, ids, device):
    import torch

    with torch.no_grad():
        x = torch.tensor([list(map(int, ids))], dtype=torch.long, device=device)
        return model(input_ids=x, use_cache=False).logits[0].float().cpu().numpy()


def hf_routing(model, config, ids, device):
    """Transformers' expert choices for one sequence: {block: (experts [seq, k], weights [seq, k])}
    for every MoE block, from forward hooks on the routers. The weights are the fp32 softmax of
    the router's input times its weight at the chosen experts (renormalised as the family does)."""
    import torch

    top_k = int(config["num_experts_per_tok"])
    num_experts = int(config.get("num_local_experts", config.get("num_experts", 0)))
    renormalize = config.get("model_type") == "mixtral" or bool(config.get("norm_topk_prob"))
    found = {}
    hooks = []

    def router_of(layer):
        for mlp_name in ("mlp", "block_sparse_moe"):
            mlp = getattr(layer, mlp_name, None)
            for name in ("gate", "router"):
                r = getattr(mlp, name, None) if mlp is not None else None
                w = getattr(r, "weight", None)
                if w is not None and w.dim() == 2 and w.shape[0] == num_experts:
                    return r
        return None

    def hook(block):
        def fn(module, inputs, output):
            # The probabilities from the router's input and weight (routers differ in what they
            # return across transformers versions: logits, scattered scores, indices).
            x = inputs[0].reshape(-1, module.weight.shape[1]).float()
            probs = torch.softmax(x @ module.weight.float().t(), dim=-1)
            outs = output if isinstance(output, (tuple, list)) else (output,)
            index = [t for t in outs if torch.is_tensor(t) and not t.is_floating_point()
                     and t.shape[-1] == top_k]
            top, experts = torch.topk(probs, top_k, dim=-1)
            if index:  # the router's own choice (transformers 5)
                experts = index[0].reshape(-1, top_k)
                top = torch.gather(probs, 1, experts)
            if renormalize:
                top = top / top.sum(dim=-1, keepdim=True)
            found[block] = (experts.cpu().numpy(), top.cpu().numpy())
        return fn

    for b, layer in enumerate(model.model.layers):
        r = router_of(layer)
        if r is not None:
            hooks.append(r.register_forward_hook(hook(b)))
    try:
        hf_logits(model, ids, device)
    finally:
        for h in hooks:
            h.remove()
    return found


def hf_greedy(model, bos, eos, n, device):
    """Greedy decoding from [bos] with a full forward per step; ties go to the lowest id (numpy
    argmax), stops at bos or eos (not included), like qcal's GenerateGreedy."""
    ids = [bos]
    generated = []
    for _ in range(n):
        logits = hf_logits(model, ids, device)[-1]
        best = int(np.argmax(logits))
        if best in (bos, eos):
            break
        generated.append(best)
        ids.append(best)
    return generated


def decode(model_dir, ids):
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=os.path.join(model_dir, "tokenizer.model"))
        return sp.decode(list(map(int, ids))), "sentencepiece"
    except Exception:  # noqa: BLE001 - fall back to transformers' tokenizer
        pass
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        return tok.decode(list(map(int, ids)), skip_special_tokens=False), "AutoTokenizer"
    except Exception as e:  # noqa: BLE001
        return None, f"no decoder ({type(e).__name__})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("qcal", help="path of the qcal binary")
    ap.add_argument("work_dir", help="directory for checkpoints, logits and summary.md")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--qcal-devices", default=None, help="default: cpu, plus cuda with a GPU")
    ap.add_argument("--hf-device", default=None, help="default: cuda with a GPU, else cpu")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    import torch
    import transformers

    # fp32 reference: no TF32 anywhere.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.set_float32_matmul_precision("highest")
    except Exception:  # noqa: BLE001
        pass
    gpu = torch.cuda.is_available()
    hf_device = args.hf_device or ("cuda" if gpu else "cpu")
    qcal_devices = (args.qcal_devices or ("cpu,cuda" if gpu else "cpu")).split(",")
    qcal = os.path.abspath(args.qcal)
    work = os.path.abspath(args.work_dir)
    os.makedirs(work, exist_ok=True)

    rows = []
    failures = []
    for family in args.families.split(","):
        seq_len = FAMILIES[family]
        ckpt = os.path.join(work, family)
        run([qcal, "synth", "--arch", family, "--out", ckpt, "--overwrite", "--no-sha256"])
        config = json.load(open(os.path.join(ckpt, "config.json")))
        bos, eos = int(config["bos_token_id"]), int(config["eos_token_id"])
        model = load_hf(ckpt, hf_device)

        row = {"family": family, "seq": seq_len}
        notes = []
        if "sliding_window" in config and config.get("model_type") == "mistral":
            notes.append(f"window {config['sliding_window']}")
        rs = config.get("rope_scaling") or {}
        if rs:
            notes.append(
                f"{rs.get('rope_type', rs.get('type'))} rope, original "
                f"{rs.get('original_max_position_embeddings')}"
            )
        row["notes"] = ", ".join(notes)

        # 1. Logits of the first evaluation window (and, for MoE families, its expert choices).
        moe = family in MOE_FAMILIES
        ref = None
        hf_route = None
        for dev in qcal_devices:
            out = os.path.join(work, f"{family}-{dev}-logits.safetensors")
            routing = os.path.join(work, f"{family}-{dev}-routing.safetensors")
            run([qcal, "eval", "--model", ckpt, "--text", os.path.join(ckpt, "eval.txt"),
                 "--seq-len", str(seq_len), "--max-windows", "1", "--device", dev,
                 "--logits-out", out] + (["--dump-routing", routing] if moe else []))
            t = read_safetensors(out)
            ids = t["input_ids"].astype(np.int64)
            if ref is None:
                ref = hf_logits(model, ids, hf_device)
            err = rel_fro(t["logits"], ref)
            row[f"err_{dev}"] = err
            if not err <= args.tolerance:
                failures.append(f"{family}: logits on {dev}: relative error {err:.3e}")
            if moe:
                if hf_route is None:
                    hf_route = hf_routing(model, config, ids, hf_device)
                q = read_safetensors(routing)
                blocks = sorted(int(k.split(".")[1]) for k in q if k.endswith(".experts"))
                if blocks != sorted(hf_route):
                    failures.append(f"{family}: MoE blocks differ on {dev}: qcal {blocks}, "
                                    f"transformers {sorted(hf_route)}")
                total = same = 0
                werr = 0.0
                for b in blocks:
                    if b not in hf_route:
                        continue
                    qe, qw = q[f"layers.{b}.experts"], q[f"layers.{b}.weights"]
                    he, hw = hf_route[b]
                    total += qe.shape[0]
                    same += int(np.sum(np.all(qe == he, axis=1)))
                    werr = max(werr, float(np.max(np.abs(qw - hw))))
                row[f"route_{dev}"] = f"{same}/{total}, weights {werr:.1e}"
                if same != total or total == 0:
                    failures.append(f"{family}: expert choices differ on {dev}: "
                                    f"{total - same} of {total} tokens")
                if not werr <= args.tolerance:
                    failures.append(f"{family}: routing weights differ on {dev} by {werr:.3e}")

        # 2. Greedy generation of 64 tokens.
        gen = hf_greedy(model, bos, eos, GENERATE_TOKENS, hf_device)
        row["generated"] = len(gen)
        seq = [bos] + gen
        ids_path = os.path.join(work, f"{family}-generated.json")
        with open(ids_path, "w") as f:
            json.dump(seq, f)
        hf_text, how = decode(ckpt, gen)
        for dev in qcal_devices:
            out = os.path.join(work, f"{family}-{dev}-generated.safetensors")
            run([qcal, "eval", "--model", ckpt, "--ids", ids_path, "--device", dev,
                 "--logits-out", out])
            logits = read_safetensors(out)["logits"]
            choices = [int(np.argmax(logits[i])) for i in range(len(gen))]
            same_ids = choices == gen
            row[f"gen_ids_{dev}"] = same_ids
            if not same_ids:
                first = next(i for i in range(len(gen)) if choices[i] != gen[i])
                failures.append(f"{family}: greedy ids differ on {dev} at step {first}")
            text = run([qcal, "generate", "--model", ckpt, "--max-new-tokens",
                        str(GENERATE_TOKENS), "--device", dev])
            if text.endswith("\n"):
                text = text[:-1]
            if hf_text is None:
                row[f"gen_text_{dev}"] = f"not compared: {how}"
            else:
                ok = text == hf_text
                row[f"gen_text_{dev}"] = "same" if ok else "DIFFERENT"
                if not ok:
                    failures.append(f"{family}: generated text differs on {dev} "
                                    f"(qcal {text[:60]!r} vs transformers {hf_text[:60]!r}, {how})")
        rows.append(row)
        del model
        if gpu:
            torch.cuda.empty_cache()

    lines = [
        "# qcal vs transformers: synthetic checkpoints of each family",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}; transformers on {hf_device} in fp32 (eager "
        f"attention, TF32 off); qcal on {', '.join(qcal_devices)}; tolerance {args.tolerance:g}.",
        "",
        "Logits: relative Frobenius error ||qcal - hf|| / ||hf|| over the first eval window of "
        "`seq` tokens. Generation: 64 greedy tokens from BOS; ids = qcal's argmax at every step of "
        "transformers' sequence matches, text = `qcal generate` prints transformers' decoded ids. "
        "Experts (MoE families): tokens of the window whose top-k experts are identical in every "
        "MoE block, out of tokens x blocks, and the largest routing-weight difference.",
        "",
    ]
    header = ["family", "seq", "notes"]
    for dev in qcal_devices:
        header += [f"logits err ({dev})", f"experts same ({dev})", f"gen ids ({dev})",
                   f"gen text ({dev})"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in rows:
        cells = [r["family"], str(r["seq"]), r["notes"]]
        for dev in qcal_devices:
            cells += [f"{r[f'err_{dev}']:.2e}",
                      r.get(f"route_{dev}", "-"),
                      "same" if r[f"gen_ids_{dev}"] else "DIFFERENT",
                      r[f"gen_text_{dev}"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Result: " + ("PASS" if not failures else "FAIL"))
    for f in failures:
        lines.append(f"- {f}")
    summary = "\n".join(lines) + "\n"
    with open(os.path.join(work, "summary.md"), "w") as f:
        f.write(summary)
    print(summary)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
