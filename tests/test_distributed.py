"""Multi-process runs, executed: DDP and FSDP2 over two CPU processes (gloo), each against one process.

Slow tests (`scripts/test.sh -m slow tests/test_distributed.py`, the second command of .ci/run): a tiny Llama
with tied embeddings (like SmolLM2), PILoT with recovery: plain, with distillation, and with HAM (whose
per-tensor gradient RMS must be summed over FSDP2's shards). One process trains on 8
blocks per step, two processes on 4 each; 8 training blocks make one global batch per step, so both see the
same samples at every step whatever the sampler's order. The α history, the exact sparsity and the merged
weights must then match (allclose: only the summation order of the reductions differs), and the result must
load without pilot_hf.

FSDP runs through `tests/launch_fsdp_on_cpu.py`, which keeps Accelerate's FSDP plugin on CPU processes (all
it changes) and prints per process what was sharded; the tests check those lines, so a run that silently fell
back to unsharded training fails. The fast tests at the end shard a wrapped model with torch's `fully_shard`
directly (no Accelerate) and compare pruning and keep-masks with one process.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
CONFIGS = REPO / "configs" / "accelerate"
LAUNCHERS = {  # name -> (Accelerate config, script)
    "ddp": (CONFIGS / "cpu_2proc.yaml", REPO / "scripts" / "compress.py"),
    "fsdp": (CONFIGS / "cpu_fsdp_2proc.yaml", REPO / "tests" / "launch_fsdp_on_cpu.py"),
}
VARIANTS = {"off": [], "logit": ["--distill_logit_weight", 1.0], "ham": ["--ham", "--ham_alpha", 10.0]}
DIAGNOSTICS = ("loss", "alpha", "l1_ratio", "balance", "sparsity", "prune_damage")
MAX_STEPS, RECOVERY_STEPS = 24, 6


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("distributed"), tie_word_embeddings=True)


def flags(assets: Path, out: Path, per_device_batch: int, *extra) -> list[str]:
    return list(map(str, [
        "--model_name_or_path", assets / "model", "--train_file", assets / "train.txt", "--block_size", 32,
        "--max_train_samples", 8, "--per_device_train_batch_size", per_device_batch, "--output_dir", out,
        "--max_steps", MAX_STEPS, "--recovery_steps", RECOVERY_STEPS, "--alpha_update_interval", 2,
        "--learning_rate", 1e-3, "--sparsity", 0.5, "--save_strategy", "no", "--logging_steps", 4,
        "--report_to", "none", "--eval_texts", "pydoc", "--eval_max_tokens", 512, "--eval_max_length", 64,
        "--use_cpu", "--seed", 0,
        # stated, not the defaults' recipe: from the dense model, on the LM loss unless `extra` adds a teacher,
        # without HAM unless `extra` turns it on
        "--warm_start", "none", "--lm_loss_weight", 1, "--distill_logit_weight", 0, "--distill_feature_weight", 0,
        "--lr_scheduler_type", "linear", "--ham", "false", *extra]))


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-4000:])
    return done


def logged(done: subprocess.CompletedProcess) -> list[dict[str, float]]:
    """The diagnostics of every training log line the main process printed."""
    lines = re.findall(r"\{'loss':[^}]*\}", done.stdout + done.stderr)
    return [{k: float(v) for k, v in ast.literal_eval(line).items() if k in DIAGNOSTICS} for line in lines]


@pytest.fixture(scope="module")
def one_process(assets, tmp_path_factory):
    """The one-process reference run for each variant, made once."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            out = tmp_path_factory.mktemp("one") / "result"
            done = run([sys.executable, "-m", "pilot_hf", "compress", *flags(assets, out, 8, *VARIANTS[variant])])
            cache[variant] = (out, done)
        return cache[variant]
    return get


def launch(launcher: str, assets: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    config, script = LAUNCHERS[launcher]
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(script),
                *flags(assets, out, 4, *extra)])


def load_without_pilot_hf(*folders: Path) -> list[dict]:
    """Load each result with plain Transformers in a fresh interpreter that never imports pilot_hf."""
    code = """
import json, sys, torch, transformers as T
x = torch.arange(2, 66).reshape(2, 32)
out = []
for folder in sys.argv[1:]:
    model = T.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = model(x).logits
    torch.save(logits, folder + "/logits.pt")
    out.append({"tied": model.lm_head.weight is model.model.embed_tokens.weight,
                "pilot_hf": any(m.split(".")[0] == "pilot_hf" for m in sys.modules)})
print(json.dumps(out))
"""
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code, *map(str, folders)], capture_output=True, text=True,
                          env=env, cwd=folders[0], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_same_run(one: Path, done_one, many: Path, done_many) -> None:
    from safetensors.torch import load_file

    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, many))
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["alpha_history"] and m1["alpha_history"] == m2["alpha_history"]
    assert len({entry[1] for entry in m1["alpha_history"]}) > 1  # the controller moved α, not only its start
    target = m1["sparsity_report_total"]
    assert target["zeros"] == target["numel"] // 2 and m2["sparsity_report_total"] == target
    r1, r2 = (json.loads((d / "sparsity_report.json").read_text())["layers"] for d in (one, many))
    assert r1 == r2
    w1, w2 = load_file(one / "model.safetensors"), load_file(many / "model.safetensors")
    assert sorted(w1) == sorted(w2)
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-6)
        if name in r1 or name.removesuffix(".weight") in r1:
            assert torch.equal(w1[name] == 0, w2[name] == 0), name  # the same pruned entries, not only as many
    # The diagnostics each step logged (under FSDP: sums over shards, prune_damage from gathered layers).
    l1, l2 = logged(done_one), logged(done_many)
    assert len(l1) == len(l2) == MAX_STEPS // 4 and all(set(d) == set(DIAGNOSTICS) for d in l1)
    for a, b in zip(l1, l2):
        for key in DIAGNOSTICS:
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), (key, a, b)
    assert any(d["sparsity"] == 0.5 and d["alpha"] == 0 for d in l1)  # the recovery phase was logged
    loaded = load_without_pilot_hf(one, many)
    assert loaded == [{"tied": True, "pilot_hf": False}] * 2
    torch.testing.assert_close(torch.load(many / "logits.pt"), torch.load(one / "logits.pt"), rtol=1e-4, atol=1e-5)


def assert_sharded(done: subprocess.CompletedProcess) -> None:
    """Both processes trained FSDP2 shards (half the rows of the first mask each) and re-applied sharded
    keep-masks during recovery."""
    out = done.stdout
    for rank in (0, 1):
        begin = re.search(rf"\[fsdp-on-cpu\] rank {rank}: FSDP\w+, (\S+)\.mask sharded=True local=\((\d+), (\d+)\) "
                          r"full=\((\d+), (\d+)\)", out)
        assert begin, out[-3000:]
        local_rows, cols, full_rows, full_cols = map(int, begin.groups()[1:])
        assert (local_rows * 2, cols) == (full_rows, full_cols)
        assert re.search(rf"\[fsdp-on-cpu\] rank {rank}: step {MAX_STEPS - RECOVERY_STEPS} keep-masks sharded=True "
                         rf"first local=\({local_rows}, {cols}\)", out), out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_match_one(assets, one_process, tmp_path, launcher, variant):
    one, done_one = one_process(variant)
    many = tmp_path / "result"
    done = launch(launcher, assets, many, *VARIANTS[variant])
    assert done.stdout.count("saved to:") == 1  # the summary (and every file) comes from the main process only
    if launcher == "fsdp":
        assert_sharded(done)
    else:
        assert "[fsdp-on-cpu]" not in done.stdout
    if variant == "logit":
        assert "'logit_loss'" in done.stdout + done.stderr
    m1, m2 = (json.loads((d / "run_config.json").read_text())["settings"] for d in (one, many))
    assert m1.get("ham") == m2.get("ham") == (variant == "ham" or None)
    assert_same_run(one, done_one, many, done)


@pytest.mark.slow
def test_fsdp_feature_distillation_matches_ddp(assets, tmp_path):
    """SquareHead divides by each micro-batch's teacher mean square, so 2 processes × 4 blocks differ from
    1 × 8 (measured: 5e-5 in a weight) the way gradient accumulation does; FSDP must equal DDP, which
    normalizes per process alike."""
    from safetensors.torch import load_file

    extra = ["--distill_logit_weight", 1.0, "--distill_feature_weight", 1.0]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    launch("ddp", assets, ddp, *extra)
    assert_sharded(launch("fsdp", assets, fsdp, *extra))
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (ddp, fsdp))
    assert m1["alpha_history"] == m2["alpha_history"] and m1["sparsity_report_total"] == m2["sparsity_report_total"]
    w1, w2 = load_file(ddp / "model.safetensors"), load_file(fsdp / "model.safetensors")
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], rtol=1e-4, atol=1e-6)


# ----- fast: sharded pruning with torch's fully_shard directly (2 CPU processes, gloo) -----------------------

PATTERNS = ("unstructured", "global", "row", "2:4")


def _shard_and_prune(rank: int, init_file: str, out_file: str) -> None:
    import copy

    import torch.distributed as dist
    from conftest import tiny_model
    from torch.distributed.fsdp import fully_shard

    from pilot_hf.pruning import is_sharded, local_tensor, shard_like
    from pilot_hf.wrapping import masked_layers, prune_model, wrap_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = {}
    for pattern in PATTERNS:
        model = wrap_model(tiny_model("llama"))
        with torch.no_grad():  # masks away from their init, so the ranking is not |W| alone
            for layer in masked_layers(model).values():
                layer.mask.mul_(torch.rand(layer.mask.shape, generator=torch.Generator().manual_seed(3)) + 0.5)
        reference = copy.deepcopy(model)
        expected = prune_model(reference, 0.5 if pattern != "2:4" else None, pattern)
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        keep = prune_model(model, 0.5 if pattern != "2:4" else None, pattern)
        layers, ref_layers = masked_layers(model), masked_layers(reference)
        results[pattern] = {
            "sharded": all(is_sharded(k) and k.placements == layers[n].weight.placements for n, k in keep.items()),
            "local_rows": [tuple(local_tensor(k).shape) for k in keep.values()][:1],
            "keep_equal": all(torch.equal(k.full_tensor(), expected[n]) for n, k in keep.items()),
            "weights_equal": all(torch.equal(layers[n].merged_weight().full_tensor(), ref_layers[n].merged_weight())
                                 for n in layers),
            "shard_like_no_op": shard_like(keep[next(iter(keep))], torch.zeros(1)) is keep[next(iter(keep))],
        }
    if rank == 0:
        Path(out_file).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_sharded_pruning_equals_one_process(tmp_path):
    """prune_model on FSDP2-sharded layers (every pattern, 'global' across layers) gives the keep-masks and
    pruned weights of one process, and returns keep-masks sharded like the weights (half the rows each)."""
    import torch.multiprocessing as mp

    out = tmp_path / "results.json"
    sys.path.insert(0, str(Path(__file__).parent))
    mp.start_processes(_shard_and_prune, args=(str(tmp_path / "init"), str(out)), nprocs=2, start_method="spawn")
    results = json.loads(out.read_text())
    assert set(results) == set(PATTERNS)
    for pattern, r in results.items():
        assert r["sharded"] and r["keep_equal"] and r["weights_equal"] and r["shard_like_no_op"], (pattern, r)
        assert r["local_rows"][0][0] * 2 == 32  # q_proj of the tiny Llama: 32 rows, 16 on each process


def test_ram_efficient_loading_is_refused(monkeypatch):
    from conftest import tiny_model

    from pilot_hf import PILoTTrainer, PILoTTrainingArguments

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading: false"):
        PILoTTrainer(tiny_model("llama"), PILoTTrainingArguments(output_dir="unused", use_cpu=True, report_to="none"))
