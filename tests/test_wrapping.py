"""Wrapping: target selection, the exact function at step 0, ties, device maps, merge/save/reload in a
process that never imports pilot_hf, and bad input that must leave the model untouched."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from accelerate.hooks import attach_align_device_hook
from conftest import ARCHITECTURES, TINY_CONFIGS, tiny_inputs, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from pilot_hf import (
    MaskedLinear,
    PILoTConfig,
    find_target_layers,
    is_wrapped,
    magnitude_prune,
    masked_layers,
    merge_and_unload,
    prune_model,
    wrap_model,
)

EPS32 = torch.finfo(torch.float32).eps

# The linear layers of one decoder block, per architecture (written out, not derived from the code under test).
BLOCK_LINEARS = {
    **{arch: frozenset({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})
       for arch in ["llama", "mistral", "qwen2", "gemma"]},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "opt": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"},
    "phi": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"},
}
BLOCKS = {"gpt2": "transformer.h", "opt": "model.decoder.layers"}  # default: model.layers
N_LAYERS = 2


def expected_default_targets(arch, layers=range(N_LAYERS)):
    prefix = BLOCKS.get(arch, "model.layers")
    return {f"{prefix}.{i}.{suffix}" for i in layers for suffix in BLOCK_LINEARS[arch]}


def snapshot(model):
    """Everything a failed call must leave as it was: tensors, module types, trainable flags."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            {n: p.requires_grad for n, p in model.named_parameters()})


def assert_untouched(model, snap):
    state, types, trainable = snapshot(model)
    assert types == snap[1]
    assert trainable == snap[2]
    assert state.keys() == snap[0].keys()
    for key, value in state.items():
        assert value.dtype == snap[0][key].dtype and torch.equal(value, snap[0][key]), key


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# --- the function at step 0 -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("init,beta", [("pilot", 1.0), ("pilot", 0.05), ("spred", 0.0)])
def test_wrap_keeps_logits_and_solves_init(arch, init, beta):
    model = tiny_model(arch)
    x = tiny_inputs()
    dense = logits(model, x)
    targets = find_target_layers(model)
    originals = {n: m.weight.detach().clone() for n, m in targets.items()}
    biases = {n: m.bias for n, m in targets.items()}
    other = {n: p for n, p in model.named_parameters() if not any(n.startswith(t + ".") for t in targets)}

    wrap_model(model, PILoTConfig(init=init, beta=beta if init == "pilot" else 1.0))

    assert (logits(model, x) - dense).abs().max() <= 1e-5
    layers = masked_layers(model)
    assert layers.keys() == originals.keys() == expected_default_targets(arch)
    for name, layer in layers.items():
        W, m, w = originals[name], layer.mask.detach(), layer.weight.detach()
        assert layer.beta == beta
        assert m.dtype == w.dtype == torch.float32 and m.shape == w.shape == W.shape
        assert torch.all((m * w - W).abs() <= 2 * EPS32 * W.abs()), name
        assert torch.all(((m * m - w * w) - beta).abs() <= 8 * EPS32 * (m * m + w * w)), name
        if init == "spred":
            assert torch.allclose(m, W.abs().sqrt(), rtol=1e-6, atol=0)
        else:
            assert torch.all(m > 0)
        assert layer.bias is biases[name]  # the same Parameter object, untouched
    # Every non-target parameter is still the very same object.
    now = dict(model.named_parameters())
    assert all(now[n] is p for n, p in other.items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_gives_back_a_plain_model(arch):
    model = tiny_model(arch)
    x = tiny_inputs()
    types = [(n, type(m)) for n, m in model.named_modules()]
    keys = set(model.state_dict())
    biases = {n: (m.bias, m.bias.detach().clone()) for n, m in find_target_layers(model).items()
              if m.bias is not None}
    assert biases or arch == "llama"
    wrap_model(model)
    assert is_wrapped(model) and hasattr(model, "pilot_config")
    assert {k for k in model.state_dict() if k.endswith(".mask")} == {f"{n}.mask" for n in masked_layers(model)}
    prune_model(model, 0.5)
    wrapped = logits(model, x)
    merge_and_unload(model)
    assert not is_wrapped(model) and not hasattr(model, "pilot_config")
    assert [(n, type(m)) for n, m in model.named_modules()] == types
    assert set(model.state_dict()) == keys
    assert torch.equal(logits(model, x), wrapped)
    for name, module in find_target_layers(model).items():
        if name in biases:  # the same Parameter, never pruned or changed
            assert module.bias is biases[name][0] and torch.equal(module.bias, biases[name][1])
    with pytest.raises(ValueError, match="wrap_model"):
        merge_and_unload(model)


# --- targeting --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_default_targets_every_block_linear_never_head_or_embeddings(arch):
    model = tiny_model(arch)
    targets = find_target_layers(model)
    assert set(targets) == expected_default_targets(arch)
    assert all(isinstance(m, (nn.Linear, Conv1D)) for m in targets.values())
    head = model.get_output_embeddings()
    assert all(m is not head for m in targets.values())
    assert not any(n.endswith("lm_head") for n in targets)
    head_type, emb_type = type(head), type(model.get_input_embeddings())
    wrap_model(model)
    assert type(model.get_output_embeddings()) is head_type is nn.Linear
    assert type(model.get_input_embeddings()) is emb_type
    assert isinstance(model.get_input_embeddings(), nn.Embedding)


@pytest.mark.parametrize("target_modules,expected", [
    (["q_proj", "v_proj"], {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                            "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}),
    (["model.layers.1.mlp.down_proj"], {"model.layers.1.mlp.down_proj"}),
    (r"model\.layers\.1\.mlp\..*", {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                                    "model.layers.1.mlp.down_proj"}),
    (r".*(k|o)_proj", {"model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.o_proj",
                       "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.o_proj"}),
    (["lm_head"], {"lm_head"}),  # llama's head is untied: explicitly targeting it is allowed
])
def test_target_modules_names_and_regex(target_modules, expected):
    model = tiny_model("llama")
    x = tiny_inputs()
    dense = logits(model, x)
    wrap_model(model, PILoTConfig(target_modules=target_modules))
    assert set(masked_layers(model)) == expected
    assert (logits(model, x) - dense).abs().max() <= 1e-5


@pytest.mark.parametrize("target_modules,exclude,expected_suffixes", [
    ("all-linear", ["down_proj", "q_proj"], {"k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"}),
    ("all-linear", r".*\.mlp\..*", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    (["q_proj", "k_proj", "up_proj"], ["k_proj"], {"q_proj", "up_proj"}),
    (r".*_proj", ["gate_proj", "up_proj", "down_proj"], {"q_proj", "k_proj", "v_proj", "o_proj"}),
])
def test_exclude_modules(target_modules, exclude, expected_suffixes):
    model = tiny_model("llama")
    wrap_model(model, PILoTConfig(target_modules=target_modules, exclude_modules=exclude))
    names = set(masked_layers(model))
    assert {n.rsplit(".", 1)[-1] for n in names} == expected_suffixes
    assert len(names) == N_LAYERS * len(expected_suffixes)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("layers", [1, [0], [0, 1]])
def test_layers_to_transform(arch, layers):
    idx = [layers] if isinstance(layers, int) else layers
    model = tiny_model(arch)
    wrap_model(model, PILoTConfig(layers_to_transform=layers))
    assert set(masked_layers(model)) == expected_default_targets(arch, idx)
    # Also with a list of names and an explicit layers_pattern.
    model = tiny_model(arch)
    suffix = min(BLOCK_LINEARS[arch]).rsplit(".", 1)[-1]
    pattern = BLOCKS.get(arch, "model.layers").rsplit(".", 1)[-1]  # 'layers' or 'h'
    wrap_model(model, PILoTConfig(target_modules=[suffix], layers_to_transform=layers, layers_pattern=pattern))
    prefix = BLOCKS.get(arch, "model.layers")
    assert set(masked_layers(model)) == {f"{prefix}.{i}.{full}" for i in idx
                                         for full in BLOCK_LINEARS[arch] if full.endswith(suffix)}


def test_layers_to_transform_with_regex_or_pattern_alone_is_rejected():
    with pytest.raises(ValueError, match="layers_to_transform cannot be combined with a regex"):
        PILoTConfig(target_modules=r".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="set layers_to_transform too"):
        PILoTConfig(layers_pattern="layers")


def test_layers_to_transform_that_selects_nothing_raises():
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="selects no linear layer"):
        wrap_model(model, PILoTConfig(layers_to_transform=[7]))
    assert_untouched(model, snap)


# --- tied embeddings --------------------------------------------------------------------------------------


def tied_llama():
    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    return T.AutoModelForCausalLM.from_config(config).eval()


def assert_tied(model):
    head, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is emb or head.data_ptr() == emb.data_ptr()


@pytest.mark.parametrize("make", [lambda: tiny_model("gpt2"), tied_llama, lambda: tiny_model("gemma")],
                         ids=["gpt2", "llama-tied", "gemma"])
def test_tied_embeddings_survive_wrap_prune_merge_save_load(make, tmp_path):
    model = make()
    x = tiny_inputs()
    assert_tied(model)
    embedding = model.get_input_embeddings().weight.detach().clone()
    wrap_model(model)
    assert_tied(model)
    prune_model(model, 0.5)
    merge_and_unload(model)
    assert_tied(model)
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # never pruned
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_tied(loaded)
    assert torch.equal(loaded.get_input_embeddings().weight, embedding)
    assert torch.equal(logits(loaded, x), expected)


@pytest.mark.parametrize("make", [lambda: tiny_model("gpt2"), tied_llama, lambda: tiny_model("gemma")],
                         ids=["gpt2", "llama-tied", "gemma"])
@pytest.mark.parametrize("target_modules", [["lm_head"], r"lm_head|.*\.0\.mlp\..*"])
def test_targeting_a_tied_head_raises_and_changes_nothing(make, target_modules):
    model = make()
    snap = snapshot(model)
    config = PILoTConfig(target_modules=target_modules)
    with pytest.raises(ValueError, match=r"lm_head shares its weight with .*tied.*Exclude it"):
        wrap_model(model, config)
    assert_untouched(model, snap)
    # A dense magnitude prune of a tied head would prune the embeddings too: refused the same way.
    with pytest.raises(ValueError, match=r"lm_head shares its weight"):
        magnitude_prune(model, 0.5, config=config)
    assert_untouched(model, snap)
    assert_tied(model)


# --- device maps and Accelerate hooks ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_loaded_with_device_map_cpu_wraps_and_runs(arch, tmp_path):
    tiny_model(arch).save_pretrained(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu").eval()
    x = tiny_inputs()
    dense = logits(model, x)
    wrap_model(model)
    assert set(masked_layers(model)) == expected_default_targets(arch)
    assert (logits(model, x) - dense).abs().max() <= 1e-5
    assert all(p.device.type == "cpu" for p in model.parameters())
    model(x, labels=x).loss.backward()
    assert all(layer.mask.grad is not None for layer in masked_layers(model).values())
    prune_model(model, 0.5)
    merge_and_unload(model)
    assert logits(model, x).shape == (2, 16, 128)


def test_accelerate_hooks_move_to_the_masked_layer():
    model = tiny_model("llama")
    attach_align_device_hook(model, execution_device="cpu")  # what dispatch_model puts on each module
    x = tiny_inputs()
    dense = logits(model, x)
    targets = find_target_layers(model)
    hooks = {n: m._hf_hook for n, m in targets.items()}
    assert all(h is not None for h in hooks.values())
    wrap_model(model)
    for name, layer in masked_layers(model).items():
        assert layer._hf_hook is hooks[name]
    assert (logits(model, x) - dense).abs().max() <= 1e-5
    merge_and_unload(model)
    for name, module in find_target_layers(model).items():
        assert type(module) is nn.Linear and module._hf_hook is hooks[name]


def test_meta_weights_are_refused_before_anything_changes():
    model = tiny_model("llama")
    model.model.layers[1].mlp.down_proj.to("meta")  # e.g. left offloaded by a device_map
    snap_types = [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(ValueError, match="no materialized weight"):
        wrap_model(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == snap_types
    assert not is_wrapped(model)


# --- save -> load in a process that never imports pilot_hf ------------------------------------------------

RELOAD_SCRIPT = textwrap.dedent("""
    import json, sys
    class NoPilot:  # any attempt to import pilot_hf fails loudly
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "pilot_hf":
                raise ImportError("the reloaded model must not need pilot_hf")
    sys.meta_path.insert(0, NoPilot())
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    jobs = json.loads(sys.argv[1])
    for folder, ids in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            out = {"logits": model(torch.tensor(ids)).logits.contiguous()}
        for name, p in model.named_parameters():
            out["zeros." + name] = (p == 0).contiguous()
        save_file(out, folder + "/reloaded.safetensors")
    assert "pilot_hf" not in sys.modules, "pilot_hf was imported"
    print("ok", len(jobs))
""")


def test_save_load_in_fresh_process_without_pilot_hf(tmp_path):
    x = tiny_inputs()
    cases = [(arch, "unstructured") for arch in ARCHITECTURES] + [("gpt2", "2:4"), ("llama", "row")]
    expected, jobs = {}, []
    for arch, pattern in cases:
        model = tiny_model(arch)
        wrap_model(model)
        prune_model(model, None if pattern == "2:4" else 0.5, pattern)
        merge_and_unload(model)
        folder = tmp_path / f"{arch}-{pattern.replace(':', '_')}"
        model.save_pretrained(folder)
        files = sorted(os.listdir(folder))
        assert "model.safetensors" in files, files
        assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))], files
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert not [k for k in f.keys() if k.endswith(".mask")]  # noqa: SIM118
        config = json.loads((folder / "config.json").read_text())
        assert "pilot" not in json.dumps(config).lower()
        expected[str(folder)] = (logits(model, x), {n: p == 0 for n, p in model.named_parameters()})
        jobs.append((str(folder), x.tolist()))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps(jobs)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(f"ok {len(jobs)}")

    for folder, (want_logits, want_zeros) in expected.items():
        got = load_file(folder + "/reloaded.safetensors")
        assert torch.equal(got["logits"], want_logits), folder
        got_zeros = {k[len("zeros."):]: v for k, v in got.items() if k.startswith("zeros.")}
        # Tied parameters are listed once by named_parameters; compare every name both sides have.
        assert set(got_zeros) == set(want_zeros), folder
        for name, zeros in want_zeros.items():
            assert torch.equal(got_zeros[name], zeros), (folder, name)
        assert sum(int(z.sum()) for z in got_zeros.values()) > 0  # the pruned zeros did arrive


# --- bad input: a clear ValueError and an untouched model -------------------------------------------------


class EmbeddingOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.embed(x))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_wrapping_twice_raises_and_changes_nothing(arch):
    model = tiny_model(arch)
    wrap_model(model)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"already wrapped.*merge_and_unload"):
        wrap_model(model)
    assert_untouched(model, snap)
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_model(model, PILoTConfig(target_modules=["lm_head"]))
    assert_untouched(model, snap)


@pytest.mark.parametrize("target_modules,message", [
    (["q_proj", "nope_proj"], r"\['nope_proj'\] match no linear layer.*named \[.*'q_proj'"),
    (["embed_tokens"], r"\['embed_tokens'\] match no linear layer"),
    (r"nothing\.matches", r"selects no linear layer.*regex"),
])
def test_unknown_targets_raise_and_change_nothing(target_modules, message):
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        wrap_model(model, PILoTConfig(target_modules=target_modules))
    assert_untouched(model, snap)
    with pytest.raises(ValueError, match=message):
        find_target_layers(model, PILoTConfig(target_modules=target_modules))


def test_everything_excluded_raises():
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(ValueError, match="selects no linear layer"):
        wrap_model(model, PILoTConfig(exclude_modules=r".*"))
    assert_untouched(model, snap)


def test_model_without_linear_layers_raises():
    model = EmbeddingOnly()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="EmbeddingOnly has no nn.Linear or Conv1D layer"):
        wrap_model(model)
    assert_untouched(model, snap)
    with pytest.raises(ValueError, match="no nn.Linear"):
        magnitude_prune(model, 0.5)
    assert_untouched(model, snap)


@pytest.mark.parametrize("kwargs,message", [
    ({"target_modules": []}, "non-empty module names"),
    ({"target_modules": 3}, "list of names or a regex"),
    ({"target_modules": "(unclosed"}, "not a valid regex"),
    ({"exclude_modules": "[bad"}, "not a valid regex"),
    ({"init": "kaiming"}, "init='kaiming' is not known"),
    ({"beta": -1.0}, "finite β > 0"),
    ({"beta": float("inf")}, "finite β > 0"),
    ({"mask_dtype": "int8"}, "mask_dtype='int8'"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PILoTConfig(**kwargs)


def test_masked_layer_types_after_wrap():
    model = tiny_model("gpt2")
    wrap_model(model)
    for layer in masked_layers(model).values():
        assert isinstance(layer, MaskedLinear) and layer.transposed
        assert type(layer.base_layer) is Conv1D
        assert layer.base_layer.weight is None  # the dense copy is not kept around


# --- the real model (slow: run alone, under flock /tmp/pilot-heavy.lock) ----------------------------------


@pytest.mark.slow
def test_real_model_wrap_prune_merge_save_reload(tmp_path):
    from pilot_hf.assets import load_demo_model

    model, tokenizer = load_demo_model()
    model.eval()
    ids = tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    dense = logits(model, ids)
    wrap_model(model)
    assert len(masked_layers(model)) == 30 * 7
    assert (logits(model, ids) - dense).abs().max() <= 1e-4  # logits of size ~20; fp32 rounding only

    scores = {n: layer.merged_weight().abs() for n, layer in masked_layers(model).items()}
    keep = prune_model(model, 0.5)
    ties_split = 0
    for name, k in keep.items():
        assert int((~k).sum()) == round(0.5 * k.numel()), name
        threshold = scores[name][~k].max()
        assert bool((scores[name][k] >= threshold).all()), name
        ties_split += int((scores[name][k] == threshold).sum() > 0)
    assert ties_split > 0  # the 4-bit weights tie at the cut: tie-breaking was really exercised
    del scores
    merge_and_unload(model)
    expected = logits(model, ids)
    zeros = {n: p == 0 for n, p in model.named_parameters()}
    folder = tmp_path / "smollm2-50"
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    del model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", RELOAD_SCRIPT, json.dumps([(str(folder), ids.tolist())])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(folder / "reloaded.safetensors")
    assert torch.equal(got["logits"], expected)
    for name, z in zeros.items():
        assert torch.equal(got["zeros." + name], z), name
