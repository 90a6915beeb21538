"""Cost of the logit distillation loss alone (forward + backward), by chunk size, on random logits.

    python scripts/bench_distill_loss.py                   # 4 x 256 positions, SmolLM2's 49,152 vocabulary
    python scripts/bench_distill_loss.py --vocab 262144    # a Gemma-3-sized vocabulary

Prints the best of --repeats timings per chunk size ("auto" is the default: distillation.CHUNK_BYTES per
float32 temporary); compare with cross-entropy over the same logits, which the LM loss pays anyway. Then the KL
plus the LM loss: computed apart, and in the one pass of `logit_and_lm_loss` that the trainer uses.
"""

from __future__ import annotations

import argparse
import time

import torch


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    from pilot_hf.distillation import logit_and_lm_loss, logit_distillation_loss

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--chunks", nargs="+", default=["auto", "128", "512", "1024"])
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    student = torch.randn(a.batch, a.seq, a.vocab, generator=g).requires_grad_(True)
    teacher = torch.randn(a.batch, a.seq, a.vocab, generator=g)
    labels = torch.randint(0, a.vocab, (a.batch, a.seq), generator=g)

    def run(loss_fn):
        def step():
            loss_fn().backward()
            student.grad = None
        return step

    print(f"{a.batch} x {a.seq} positions, vocab {a.vocab}, float32, best of {a.repeats}, forward + backward")
    ce = best_time(run(lambda: torch.nn.functional.cross_entropy(student.flatten(0, 1), labels.flatten())),
                   a.repeats)
    print(f"| chunk | KL s | KL / cross-entropy |\n|---|---|---|\n| (cross-entropy) | {ce:.3f} | 1.00 |")
    for chunk in a.chunks:
        size = chunk if chunk == "auto" else int(chunk)
        kl = best_time(run(lambda size=size: logit_distillation_loss(student, teacher, labels, chunk_size=size)), a.repeats)
        print(f"| {chunk} | {kl:.3f} | {kl / ce:.2f} |", flush=True)
    # KL and LM loss together (chunks "auto"): computed apart, as two autograd terms, or in one pass.
    apart = best_time(run(lambda: logit_distillation_loss(student, teacher, labels) + torch.nn.functional.cross_entropy(
        student[:, :-1].flatten(0, 1), labels[:, 1:].flatten())), a.repeats)
    fused = best_time(run(lambda: logit_and_lm_loss(student, teacher, labels, lm_weight=1.0)["loss"]), a.repeats)
    print(f"\n| KL + LM loss | s | / cross-entropy |\n|---|---|---|\n| apart (KL, then cross-entropy) | {apart:.3f} | "
          f"{apart / ce:.2f} |\n| one pass (`logit_and_lm_loss`) | {fused:.3f} | {fused / ce:.2f} |")


if __name__ == "__main__":
    main()
