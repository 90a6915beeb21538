"""Disk size of compressed vs dense checkpoints of a magnitude-pruned model (default: SmolLM2-135M in bf16).

    flock /tmp/pilot-heavy.lock .venv/bin/python scripts/bench_serialization.py [--sparsity 0.5 0.9] [--verify]

For each sparsity it prunes every linear layer in the decoder blocks (magnitude_prune's default
targets; embeddings / tied lm_head stay dense), saves the dense checkpoint and the compressed one
(with zero signs, the bit-exact default, and without), and prints:
- whole-file ratio: compressed model*.safetensors bytes / dense bytes (embeddings count in both);
- pruned-weights ratio: bytes stored for the pruned weights / their dense bytes
  (bf16 theory: (2(1 - s) + 1/8) / 2, i.e. 0.5625 at 50%, 0.1625 at 90%; zero signs add s/16).
With --verify it also reloads the compressed checkpoint and checks every tensor bit for bit.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from pilot_hf import find_target_layers, magnitude_prune
from pilot_hf.assets import load_demo_model
from pilot_hf.serialization import load_compressed_state_dict, save_compressed


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model*.safetensors"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--verify", action="store_true", help="reload and compare every tensor bit for bit")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    rows = []
    for sparsity in args.sparsity:
        model, _ = load_demo_model()
        # load_demo_model drops config.quantization_config but the GGUF quantizer object stays attached,
        # and save_pretrained refuses models that have one; the weights are plain dense tensors already.
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        model = model.to(getattr(torch, args.dtype))
        magnitude_prune(model, sparsity)
        pruned = {name + ".weight" for name in find_target_layers(model)}
        with tempfile.TemporaryDirectory() as tmp:
            dense_dir = Path(tmp) / "dense"
            model.save_pretrained(dense_dir)
            dense_total = _weights_bytes(dense_dir)
            for keep_zero_signs in (True, False):
                comp_dir = Path(tmp) / f"compressed-{keep_zero_signs}"
                start = time.perf_counter()
                stats = save_compressed(model, comp_dir, keep_zero_signs=keep_zero_signs)
                save_s = time.perf_counter() - start
                weights = stats["weights"]
                pruned_dense = sum(w["dense_bytes"] for n, w in weights.items() if n in pruned)
                pruned_stored = sum(w["stored_bytes"] for n, w in weights.items() if n in pruned)
                row = {
                    "sparsity": sparsity, "dtype": args.dtype, "keep_zero_signs": keep_zero_signs,
                    "dense_file_bytes": dense_total, "compressed_file_bytes": _weights_bytes(comp_dir),
                    "whole_file_ratio": _weights_bytes(comp_dir) / dense_total,
                    "pruned_weights": len(pruned), "compressed_weights": len(weights),
                    "compressed_not_pruned": sorted(set(weights) - pruned),
                    "pruned_weights_ratio": pruned_stored / pruned_dense if pruned_dense else float("nan"),
                    "tensors_with_zero_signs": sum(w["zero_signs"] for w in weights.values()),
                    "save_s": round(save_s, 2),
                }
                if args.verify:
                    start = time.perf_counter()
                    loaded = load_compressed_state_dict(comp_dir)
                    row["load_s"] = round(time.perf_counter() - start, 2)
                    reference = load_compressed_state_dict(dense_dir)
                    row["bit_exact"] = loaded.keys() == reference.keys() and all(
                        torch.equal(_bits(loaded[k]), _bits(reference[k])) for k in reference)
                    if not keep_zero_signs:  # zeros read back +0.0: equal as numbers, not all bits
                        row["values_equal"] = all(torch.equal(loaded[k], reference[k]) for k in reference)
                rows.append(row)
        del model

    print(f"{'sparsity':>8} {'zero signs':>10} {'dense MB':>9} {'packed MB':>9} {'whole file':>10} "
          f"{'pruned W':>9} {'save s':>7}" + ("  bit-exact" if args.verify else ""))
    for r in rows:
        extra = f"  {r['bit_exact']}" + (f" (values equal: {r['values_equal']})" if "values_equal" in r else "") \
            if args.verify else ""
        print(f"{r['sparsity']:>8.2f} {('kept' if r['keep_zero_signs'] else 'dropped'):>10} "
              f"{r['dense_file_bytes'] / 1e6:>9.2f} {r['compressed_file_bytes'] / 1e6:>9.2f} "
              f"{r['whole_file_ratio']:>10.4f} {r['pruned_weights_ratio']:>9.4f} {r['save_s']:>7.2f}{extra}")
    print(f"({rows[0]['pruned_weights']} pruned weights; ratios are compressed / dense bytes)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
