"""Fine-tuning a sparse model without losing its zeros: LoRA merged through the keep-mask, and full fine-tuning
with keep_zeros, through the library and the `pilot-hf finetune` command."""

import copy
import json

import pytest
import torch
import transformers as T
from conftest import tiny_inputs, tiny_model
from helpers import pilot_hf

from pilot_hf.commands import main
from pilot_hf.lora import (
    KEEP_MASKS_ATTR,
    keep_masks_from_zeros,
    merge_sparse_lora,
    prepare_sparse_lora,
    sparse_lora_config,
)
from pilot_hf.wrapping import find_target_layers, magnitude_prune, out_in_layout

PATTERNS = {"unstructured": (0.5, "unstructured"), "2:4": (None, "2:4")}


def _weights(model):
    return {n: layer.weight.detach().clone() for n, layer in find_target_layers(model).items()}


def _train_lora(peft_model, steps=4, lr=5e-2):
    """A few Adam steps with a large learning rate: every adapter moves, so B·A is dense everywhere."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    peft_model.train()
    for step in range(steps):
        x = tiny_inputs(seed=step)
        peft_model(input_ids=x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()


def _sparse_peft(arch, pattern, r=4):
    model = tiny_model(arch)
    sparsity, spec = PATTERNS[pattern]
    magnitude_prune(model, sparsity, spec)
    base = _weights(model)
    peft_model = prepare_sparse_lora(model, sparse_lora_config(model, r=r))
    _train_lora(peft_model)
    return peft_model, base


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_sparse_merge_keeps_the_zeros_bit_for_bit(arch, pattern):
    peft_model, base = _sparse_peft(arch, pattern)
    lora_layers = {n: m for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A")}
    assert set(lora_layers) == set(base)  # default targets: exactly the layers pilot-hf sparsifies
    deltas = {n: m.get_delta_weight("default").detach().clone() for n, m in lora_layers.items()}
    for name, delta in deltas.items():  # the adapters moved, also where the base is pruned
        assert (delta[base[name] == 0] != 0).any(), name
    plain = copy.deepcopy(peft_model).merge_and_unload()  # PEFT's own merge fills the zeros
    plain_layers = find_target_layers(plain)
    assert not any(torch.equal(plain_layers[n].weight == 0, base[n] == 0) for n in base)

    merged = merge_sparse_lora(peft_model)
    assert isinstance(merged, T.PreTrainedModel) and not hasattr(peft_model, KEEP_MASKS_ATTR)
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    for name, layer in find_target_layers(merged).items():
        w, w0 = layer.weight.detach(), base[name]
        assert torch.equal(w == 0, w0 == 0), name  # the same zero set
        assert not torch.signbit(w[w == 0]).any()  # pruned entries are +0.0
        zero_bits = w[w0 == 0].view(torch.int32)
        assert torch.equal(zero_bits, torch.zeros_like(zero_bits))  # bit for bit
        keep = w0 != 0
        torch.testing.assert_close(w[keep], (w0 + deltas[name])[keep])  # the update lands on kept entries
        if pattern == "2:4":
            groups = out_in_layout(w, layer).reshape(w.numel() // 4, 4)
            assert bool(((groups == 0).sum(-1) >= 2).all()), name


def test_keep_masks_from_zeros_in_weight_layout():
    model = tiny_model("gpt2")  # Conv1D: weight is (in, out)
    magnitude_prune(model, 0.5, "2:4")
    masks = keep_masks_from_zeros(model)
    for name, layer in find_target_layers(model).items():
        assert masks[name].dtype == torch.bool and masks[name].shape == layer.weight.shape
        assert torch.equal(masks[name], layer.weight != 0)


def test_explicit_keep_masks_and_recorded_masks_are_not_saved(tmp_path):
    model = tiny_model("llama")
    magnitude_prune(model, 0.5)
    peft_model = prepare_sparse_lora(model, sparse_lora_config(model, r=2))
    assert all(KEEP_MASKS_ATTR not in n for n, _ in peft_model.named_parameters())
    assert all(KEEP_MASKS_ATTR not in n for n, _ in peft_model.named_buffers())
    _train_lora(peft_model, steps=2)
    peft_model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in k for k in saved)
    # A stricter keep-mask (only the first row of each layer is kept) is honored exactly.
    recorded = getattr(peft_model, KEEP_MASKS_ATTR)
    assert set(recorded) == set(find_target_layers(tiny_model("llama")))
    stricter = {}
    for name, keep in recorded.items():
        stricter[name] = torch.zeros_like(keep)
        stricter[name][0] = keep[0]
    merged = merge_sparse_lora(peft_model, stricter)
    for name, layer in find_target_layers(merged).items():
        assert torch.equal(layer.weight != 0, stricter[name])


def test_already_merged_adapter_is_refused():
    peft_model, _ = _sparse_peft("llama", "unstructured")
    peft_model.merge_adapter()
    with pytest.raises(ValueError, match="already has a merged adapter"):
        merge_sparse_lora(peft_model)


def test_adapter_folder_round_trip(tmp_path):
    from peft import PeftModel

    model = tiny_model("gpt2")
    magnitude_prune(model, None, "2:4")
    fresh_base = copy.deepcopy(model)
    zeros = {n: w == 0 for n, w in _weights(model).items()}
    peft_model = prepare_sparse_lora(model, sparse_lora_config(model, r=4))
    _train_lora(peft_model)
    x = tiny_inputs()
    with torch.no_grad():
        before = peft_model(input_ids=x).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, before, rtol=0, atol=0)
    # merged without recorded masks: the base's zeros now (it is frozen, so the same ones)
    merged = merge_sparse_lora(loaded)
    for name, layer in find_target_layers(merged).items():
        assert torch.equal(layer.weight == 0, zeros[name]), name


# ----- the command -------------------------------------------------------------------------------------


def _zero_sets(folder):
    model = T.AutoModelForCausalLM.from_pretrained(folder)  # plain transformers, no pilot_hf metadata
    return {n: layer.weight == 0 for n, layer in find_target_layers(model).items()}


@pytest.fixture(scope="module")
def pruned_dirs(tiny_dir):  # noqa: F811
    """The CLI's tiny Llama pruned outside pilot-hf: zeros set by hand (random 50%), and 2:4 by magnitude;
    both saved with plain save_pretrained (no pilot-hf metadata)."""
    tokenizer = T.AutoTokenizer.from_pretrained(tiny_dir / "model")
    dirs = {}
    for kind in ("by_hand", "2:4"):
        model = T.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
        if kind == "by_hand":
            generator = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for name, module in model.named_modules():
                    if isinstance(module, torch.nn.Linear) and ".layers." in name:
                        module.weight[torch.rand(module.weight.shape, generator=generator) < 0.5] = 0
        else:
            magnitude_prune(model, None, "2:4")
        folder = tiny_dir / f"pruned-{kind.replace(':', '-')}"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        dirs[kind] = folder
    return dirs


def finetune_flags(model_dir, train_file, out, *extra):
    return ["--model_name_or_path", model_dir, "--train_file", train_file, "--block_size", 32, "--output_dir", out,
            "--max_steps", 3, "--per_device_train_batch_size", 4, "--learning_rate", 1e-2, "--save_strategy", "no",
            "--report_to", "none", "--eval_texts", "pydoc", "--eval_max_tokens", 256, "--eval_max_length", 64,
            "--use_cpu", "--seed", 0, *extra]


def test_cli_full_finetune_keeps_zeros_of_a_model_pruned_by_hand(tiny_dir, pruned_dirs, tmp_path):  # noqa: F811
    out = tmp_path / "full"
    run = pilot_hf("finetune", *finetune_flags(pruned_dirs["by_hand"], tiny_dir / "train.txt", out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"saved to: {out}" in run.stdout
    before, after = _zero_sets(pruned_dirs["by_hand"]), _zero_sets(out)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    start = T.AutoModelForCausalLM.from_pretrained(pruned_dirs["by_hand"])
    tuned = T.AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "sparsity_report.json", "metrics.json", "run_config.json", "README.md"} <= files
    assert "training_args.bin" not in files and "adapter" not in files
    record = json.loads((out / "run_config.json").read_text())
    assert record["settings"]["method"] == "finetune" and record["settings"]["keep_zeros"] is True
    assert record["settings"]["lora"] is False
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "full" and metrics["zeros_before"] == metrics["zeros_after"] > 0


def test_cli_lora_end_to_end(tiny_dir, pruned_dirs, tmp_path):  # noqa: F811
    from peft import PeftModel

    out = tmp_path / "lora"
    run = pilot_hf("finetune", *finetune_flags(pruned_dirs["2:4"], tiny_dir / "train.txt", out, "--lora", "--lora_r",
                                               4, "--save_adapter"))
    assert run.returncode == 0, run.stderr[-3000:]
    before, after = _zero_sets(pruned_dirs["2:4"]), _zero_sets(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    start = T.AutoModelForCausalLM.from_pretrained(pruned_dirs["2:4"])
    tuned = T.AutoModelForCausalLM.from_pretrained(out)
    assert not torch.equal(start.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)
    for name, layer in find_target_layers(tuned).items():
        groups = layer.weight.reshape(-1, 4)
        assert bool(((groups == 0).sum(-1) == 2).all()), name
    record = json.loads((out / "run_config.json").read_text())
    assert record["settings"]["lora"] is True and record["settings"]["lora_r"] == 4
    assert record["settings"]["sparsity_pattern"] == "2:4"
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "lora" in card.data.tags and "keep-mask" in card.text
    adapter = PeftModel.from_pretrained(start, out / "adapter")
    assert any(hasattr(m, "lora_A") for m in adapter.modules())


def _main(capsys, *argv):
    code = main(["finetune", *map(str, argv)])
    return code, capsys.readouterr().err


def test_cli_dense_model_is_refused(tiny_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    code, err = _main(capsys, *finetune_flags(tiny_dir / "model", tiny_dir / "train.txt", out))
    assert code == 2 and "this model is dense" in err and "pilot-hf oneshot" in err, err
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


@pytest.mark.parametrize("extra,message", [
    (["--lora", "--distill_logit_weight", "1.0"], "needs a dense teacher"),
    (["--lora", "--weight_learning_rate", "1e-3"], "--lora does not support --weight_learning_rate"),
    (["--lora", "--ham", "true"], "--lora does not support --ham"),
    (["--sparsity", "0.5"], "--sparsity 0.5 does not apply"),
    (["--method", "pilot"], "--method pilot does not apply"),
    (["--warm_start", "magnitude", "--sparsity", "0.5"], "--warm_start magnitude"),
    (["--lora_r", "8"], "only apply with --lora"),
    (["--distill_logit_weight", "1.0"], "needs a dense teacher"),
])
def test_cli_refusals(tiny_dir, pruned_dirs, tmp_path, capsys, extra, message):  # noqa: F811
    out = tmp_path / "o"
    code, err = _main(capsys, *finetune_flags(pruned_dirs["2:4"], tiny_dir / "train.txt", out, *extra))
    assert code == 2 and message in err, err
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_full_finetune_with_distillation_keeps_zeros(tiny_dir, pruned_dirs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "kd"
    code, err = _main(capsys, *finetune_flags(pruned_dirs["2:4"], tiny_dir / "train.txt", out,
                                              "--distill_logit_weight", "1.0", "--skip_dense_eval",
                                              "--teacher_model_name_or_path", tiny_dir / "model"))
    assert code == 0, err[-3000:]
    before, after = _zero_sets(pruned_dirs["2:4"]), _zero_sets(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["distill_logit_weight"] == 1.0 and settings["sparsity_pattern"] == "2:4"


def test_lora_distils_from_a_dense_teacher_with_the_default_recipe(tiny_dir, pruned_dirs, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "lora-kd"
    code, err = _main(capsys, *finetune_flags(pruned_dirs["2:4"], tiny_dir / "train.txt", out, "--lora", "--lora_r", 4,
                                              "--skip_dense_eval", "--teacher_model_name_or_path", tiny_dir / "model"))
    assert code == 0, err[-3000:]
    before, after = _zero_sets(pruned_dirs["2:4"]), _zero_sets(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    settings = json.loads((out / "run_config.json").read_text())["settings"]
    assert settings["lora"] is True and settings["lm_loss_weight"] == 4.0
    assert settings["distill_logit_weight"] == 1.0 and settings["distill_feature_weight"] == 1.0
    # without a teacher the same command trains on the LM loss
    plain = tmp_path / "lora-lm"
    code, err = _main(capsys, *finetune_flags(pruned_dirs["2:4"], tiny_dir / "train.txt", plain, "--lora", "--lora_r",
                                              4, "--skip_dense_eval"))
    assert code == 0, err[-3000:]
    settings = json.loads((plain / "run_config.json").read_text())["settings"]
    assert settings["lm_loss_weight"] == 1.0 and settings["distill_logit_weight"] == 0.0
    a, b = _lora_weights(out), _lora_weights(plain)
    assert not all(torch.equal(a[n], b[n]) for n in a)  # the teacher changed what was learned


def test_the_parser_returns_the_keys_the_user_set(tmp_path):
    from pilot_hf.commands import command_module, parse_command_line

    config = tmp_path / "run.yaml"
    config.write_text("sparsity: 0.5\nlearning_rate: 1.0e-4\ndataset_name: builtin:kjv\n")
    _, command_line = parse_command_line("finetune", ["--config", str(config), "--lora-r=8", "--method", "finetune"],
                                         command_module("finetune").ARGUMENTS)
    assert command_line.given == {"sparsity", "learning_rate", "dataset_name", "lora_r", "method"}


def _lora_weights(folder):
    model = T.AutoModelForCausalLM.from_pretrained(folder)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_cli_lora_resume_is_bit_identical(tiny_dir, pruned_dirs, tmp_path):  # noqa: F811
    """LoRA checkpoints are plain Trainer checkpoints of the adapters: resuming from the middle of a run gives the
    uninterrupted run's merged model bit for bit (adapter init seeded, data order and optimizer state restored)."""
    flags = ["--lora", "--lora_r", 4, "--max_steps", 4, "--save_strategy", "steps", "--save_steps", 2,
             "--skip_dense_eval"]
    whole = tmp_path / "whole"
    run = pilot_hf("finetune", *finetune_flags(pruned_dirs["2:4"], tiny_dir / "train.txt", whole, *flags))
    assert run.returncode == 0, run.stderr[-3000:]
    middle = tmp_path / "whole-checkpoints" / "checkpoint-2"
    assert (middle / "adapter_model.safetensors").is_file()
    resumed = tmp_path / "resumed"
    run = pilot_hf("finetune", *finetune_flags(pruned_dirs["2:4"], tiny_dir / "train.txt", resumed, *flags,
                                               "--resume_from_checkpoint", middle))
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = _lora_weights(whole), _lora_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    start = _lora_weights(pruned_dirs["2:4"])
    assert not all(torch.equal(a[n], start[n]) for n in a)  # training moved the merged weights
    assert json.loads((resumed / "metrics.json").read_text())["peak_memory_bytes"] > 0
