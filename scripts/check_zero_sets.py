"""Reload sparse results with plain Transformers (pilot_hf is never imported) and compare their zero sets with
the model they were fine-tuned from: the same zeros, bit for bit, in every block linear layer; with --nm N:M,
every group of M consecutive input weights also holds at least M-N zeros.

    python scripts/check_zero_sets.py outputs/ft-bench/sparsegpt-2of4 outputs/ft-bench/ft-full-2of4 --nm 2:4
"""

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM


def zero_sets(folder: str) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="the sparse model the results started from")
    parser.add_argument("results", nargs="+", help="fine-tuned result folders")
    parser.add_argument("--nm", help="an N:M pattern the results must satisfy, e.g. 2:4")
    a = parser.parse_args()
    base = zero_sets(a.base)
    numel = sum(z.numel() for z in base.values())
    ok = True
    for folder in a.results:
        zeros = zero_sets(folder)
        same = zeros.keys() == base.keys() and all(torch.equal(base[n], zeros[n]) for n in base)
        nm = None
        if a.nm:
            n, m = map(int, a.nm.split(":"))
            nm = all(bool((z.reshape(-1, m).sum(-1) >= m - n).all()) for z in zeros.values())
        ok &= same and nm is not False
        print(f"{folder}: {len(zeros)} layers, sparsity {sum(int(z.sum()) for z in zeros.values()) / numel:.6f}, "
              f"zero sets identical to the base: {same}" + (f", {a.nm} valid: {nm}" if a.nm else "")
              + f", pilot_hf imported: {'pilot_hf' in sys.modules}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
