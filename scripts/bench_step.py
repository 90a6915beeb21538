"""Cost of a training step, variant against variant: wall-time and peak-memory ratios.

Same model, batch, optimizer (AdamW, fp32) and Trainer loop in every variant; ratios are against the first
variant listed. Each variant runs in its own process so its peak resident memory is its own.

    python scripts/bench_step.py                      # dense vs PILoT, Llama configs of growing width
    python scripts/bench_step.py --model smollm2      # the real SmolLM2-135M (slow on CPU)
    python scripts/bench_step.py --plain-autograd     # also PILoT with plain autograd (keeps mask ⊙ weight)
    python scripts/bench_step.py --variants pilot pilot-kd-logit pilot-kd      # cost of distillation
    python scripts/bench_step.py --variants finetune lora                      # sparse fine-tuning: full vs LoRA
    python scripts/bench_step.py --model smollm2 --variants finetune finetune-ham   # the cost of HAM

Variants: dense (transformers.Trainer), pilot (PILoTTrainer), pilot-plain (`MaskedLinear.recompute_product
= False`: the autograd graph keeps mask ⊙ weight of every layer from forward to backward), pilot-kd-logit
(+ logit distillation from the dense model), pilot-kd (+ logit and SquareHead feature distillation),
pilot-kd-pure (logit and SquareHead with LM loss weight 0: the recommended recipe, docs/BENCHMARKS.md section 8),
finetune (full fine-tuning of a 50% magnitude-pruned copy, zeros kept: `keep_zeros`), lora (PEFT LoRA,
r = 16, on every target layer of the same pruned copy, base frozen: `pilot-hf finetune --lora`) and gmp
(gradual magnitude pruning to 50%, an event every 2 steps). A `-ham` suffix adds HAM's step after every
optimizer step (`ham=True`, docs/METHOD.md section 11): finetune-ham, gmp-ham, pilot-ham.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

SMOLLM2 = ("smollm2", "smollm2-135m")  # the real SmolLM2-135M-Instruct (pilot_hf.assets.load_demo_model)
VARIANTS = {"dense": "dense", "pilot": "PILoT", "pilot-plain": "PILoT plain", "pilot-kd-logit": "PILoT+KD logit",
            "pilot-kd": "PILoT+KD", "pilot-kd-pure": "PILoT+KD pure", "finetune": "full FT", "lora": "LoRA",
            "gmp": "GMP", "finetune-ham": "full FT+HAM", "gmp-ham": "GMP+HAM", "pilot-ham": "PILoT+HAM"}


def run_variant(variant: str, model_spec: str, batch: int, seq: int, steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainerCallback, TrainingArguments

    from pilot_hf import MaskedLinear, PILoTTrainer, PILoTTrainingArguments
    from pilot_hf.assets import load_demo_model

    rss_libs = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # interpreter + libraries, before the model
    ham = variant.endswith("-ham")
    variant = variant.removesuffix("-ham")
    torch.manual_seed(0)
    MaskedLinear.recompute_product = variant != "pilot-plain"
    if model_spec in SMOLLM2:
        model, _ = load_demo_model()
    elif not model_spec.isdigit():  # a local model folder, e.g. outputs/models/gemma-3-270m
        model = AutoModelForCausalLM.from_pretrained(model_spec, dtype=torch.float32)
    else:
        width = int(model_spec)
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            vocab_size=8192, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64 or 64, num_hidden_layers=4,
            num_attention_heads=max(width // 64, 1), num_key_value_heads=max(width // 64, 1)))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch * (steps + warmup), seq), generator=g).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    common = dict(output_dir="/tmp/pilot-bench-step", max_steps=steps + warmup, per_device_train_batch_size=batch,
                  learning_rate=1e-4, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                  disable_tqdm=True, dataloader_num_workers=0,
                  # the variant's own work only: no warm start, recovery or teacher unless the variant names one
                  # (the library's defaults are the compression recipe: a Wanda start and a teacher)
                  **({} if variant in ("dense", "lora") else dict(
                      warm_start=None, recovery_steps=0, lm_loss_weight=1.0, distill_logit_weight=0.0,
                      distill_feature_weight=0.0)))
    times: list[float] = []
    cpu_times: list[float] = []  # this process's CPU time: less sensitive than wall time to busy neighbours
    faults: list[int] = []  # minor page faults: fresh memory the allocator had to map and zero during the step

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.cpu = time.perf_counter(), time.process_time()
            self.faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)
            cpu_times.append(time.process_time() - self.cpu)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self.faults)

    ham_times: list[float] = []  # HAM's own step, timed inside the run: its cost without run-to-run noise
    if ham:
        from pilot_hf import schedule

        def timed_ham_step(*a, _step=schedule.ham_step, **k):
            started = time.perf_counter()
            _step(*a, **k)
            ham_times.append(time.perf_counter() - started)

        schedule.ham_step = timed_ham_step

    if variant in ("finetune", "lora"):  # an already sparse model: 50% by magnitude, per layer
        from pilot_hf import magnitude_prune

        magnitude_prune(model, sparsity=0.5)
    if variant == "dense":
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=data, callbacks=[Clock()])
    elif variant == "lora":
        from pilot_hf.lora import prepare_sparse_lora, sparse_lora_config

        peft_model = prepare_sparse_lora(model, sparse_lora_config(model, r=16, lora_alpha=32))
        trainer = Trainer(model=peft_model, args=TrainingArguments(**common), train_dataset=data, callbacks=[Clock()])
    elif variant == "finetune":
        args = PILoTTrainingArguments(**common, method="finetune", sparsity=0.0, keep_zeros=True, ham=ham)
        trainer = PILoTTrainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
    elif variant == "gmp":
        args = PILoTTrainingArguments(**common, method="gmp", sparsity=0.5, gmp_interval=2, ham=ham)
        trainer = PILoTTrainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
    else:
        kd = {"pilot-kd-logit": dict(distill_logit_weight=1.0),
              "pilot-kd": dict(distill_logit_weight=1.0, distill_feature_weight=1.0),
              "pilot-kd-pure": dict(distill_logit_weight=1.0, distill_feature_weight=1.0, lm_loss_weight=0.0),
              }.get(variant, {})
        args = PILoTTrainingArguments(**{**common, **kd}, sparsity=0.5, alpha_init=1e-4, alpha_update_interval=2, ham=ham)
        trainer = PILoTTrainer(model=model, args=args, train_dataset=data, callbacks=[Clock()])
    trainer.train()
    step_s = statistics.median(times[warmup:])  # median: robust to a noisy neighbour
    return {"variant": variant + ("-ham" if ham else ""), "model": model_spec, "params": sum(p.numel() for p in model.parameters()),
            "step_s": step_s, "step_cpu_s": statistics.median(cpu_times[warmup:]), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "libs_rss_mb": rss_libs / 1024, "step_minor_faults": statistics.median(faults[warmup:]), "ham_s": statistics.median(ham_times[warmup:]) if ham_times else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["256", "512", "768"],
                        help="Llama widths to build from configs, 'smollm2' (the real SmolLM2-135M), or a local model folder.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["dense", "pilot"],
                        help="what to compare (module docstring); ratios are against the first one")
    parser.add_argument("--plain-autograd", action="store_true",
                        help="also run PILoT with plain autograd (the baseline that keeps mask ⊙ weight)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="processes per variant, run interleaved; the table shows medians over them")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one run, JSON out
    a = parser.parse_args()
    if a.variant:
        print(json.dumps(run_variant(a.variant, a.model[0], a.batch, a.seq, a.steps, a.warmup)))
        return
    variants = a.variants + (["pilot-plain"] if a.plain_autograd and "pilot-plain" not in a.variants else [])
    base = variants[0]
    print(f"batch {a.batch} x {a.seq} tokens, AdamW fp32, median step over {a.steps} steps after {a.warmup} warm-up")
    print("peak MB = peak resident memory minus the interpreter and libraries (model + optimizer + activations)")
    print(f"ratios are against {VARIANTS[base]}; the variants are described in this script's docstring")
    names = [VARIANTS[v] for v in variants]
    cols = ([f"{n} step s" for n in names] + [f"{n} time ratio" for n in names[1:]]
            + [f"{n} CPU time ratio" for n in names[1:]]
            + [f"{n} peak MB" for n in names] + [f"{n} memory ratio" for n in names[1:]])
    print("| model | params | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    spreads = []
    for spec in a.model:
        res: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(a.repeats):
            for variant in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate the order
                cmd = [sys.executable, __file__, "--variant", variant, "--model", spec, "--batch", str(a.batch),
                       "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                res[variant].append(json.loads(out.strip().splitlines()[-1]))
        step = {v: statistics.median(r["step_s"] for r in runs) for v, runs in res.items()}
        cpu = {v: statistics.median(r["step_cpu_s"] for r in runs) for v, runs in res.items()}
        peak = {v: statistics.median(r["peak_rss_mb"] - r["libs_rss_mb"] for r in runs) for v, runs in res.items()}
        spreads.append(f"{spec}: " + ", ".join(
            f"{v} step s {min(r['step_s'] for r in runs):.3f}-{max(r['step_s'] for r in runs):.3f}, "
            f"peak MB {min(r['peak_rss_mb'] - r['libs_rss_mb'] for r in runs):.0f}-"
            f"{max(r['peak_rss_mb'] - r['libs_rss_mb'] for r in runs):.0f}" for v, runs in res.items()))
        cells = ([f"{step[v]:.3f}" for v in variants] + [f"{step[v] / step[base]:.3f}" for v in variants[1:]]
                 + [f"{cpu[v] / cpu[base]:.3f}" for v in variants[1:]]
                 + [f"{peak[v]:.0f}" for v in variants] + [f"{peak[v] / peak[base]:.3f}" for v in variants[1:]])
        print(f"| {spec} | {res[base][0]['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |", flush=True)
        print(f"{spec}: minor page faults per step (median; memory mapped afresh and zeroed by the kernel): " + ", ".join(
            f"{VARIANTS[v]} {statistics.median(r['step_minor_faults'] for r in runs):,.0f}" for v, runs in res.items()))
        for v in variants:
            if v.endswith("-ham"):  # the firm figure: HAM's step against the step it is added to, in one process
                ham_s = statistics.median(r["ham_s"] for r in res[v])
                print(f"{spec}: {VARIANTS[v]}: HAM's own step takes {ham_s:.3f} s of the {step[v]:.3f} s step, a cost "
                      f"of {step[v] / (step[v] - ham_s):.3f}x over the same step without it")
    if a.repeats > 1:
        print(f"\nrange over the {a.repeats} runs of each variant:")
        print("\n".join(spreads))


if __name__ == "__main__":
    main()
