#!/usr/bin/env bash
# `make demo`: synthesize a small Llama-architecture model, quantize it with GPTQ W4 g128, and show
# what changed (per-layer output error RTN vs GPTQ, size, perplexity before and after).
set -euo pipefail
BUILD=${1:-build}
QCAL="$BUILD/bin/qcal"
DEMO="$BUILD/demo"
mkdir -p "$DEMO"

echo "== 1. qcal synth: a synthetic model with a tokenizer trained on generated text" >&2
"$QCAL" synth --out "$DEMO/model" --preset tiny --seed 0 --overwrite

cat > "$DEMO/gptq-w4g128.yaml" <<'YAML'
method: gptq
weights:
  bits: 4
  group_size: 128
YAML

echo "== 2. qcal quantize: GPTQ W4 g128, 64 calibration samples of 256 tokens" >&2
"$QCAL" quantize --model "$DEMO/model" --recipe "$DEMO/gptq-w4g128.yaml" \
  --calib "$DEMO/model/calib.txt" --samples 64 --seq-len 256 \
  --eval-text "$DEMO/model/eval.txt" --out "$DEMO/model-gptq-w4g128" --overwrite --table

echo "== 3. qcal eval on the exported checkpoint, loaded from disk" >&2
"$QCAL" eval --model "$DEMO/model-gptq-w4g128" --text "$DEMO/model/eval.txt" --seq-len 256
echo "demo output: $DEMO/model-gptq-w4g128 (GPTQ v1 checkpoint, qcal_report.json)" >&2
