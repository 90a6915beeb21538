"""Compressed sparse checkpoints: bit-exact round trips, sizes, the from_pretrained hook, corruption, digests."""

import hashlib
import json
import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as T
from conftest import ARCHITECTURES, tiny_inputs, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pilot_hf
from pilot_hf import _transformers_sparse
from pilot_hf import serialization as S

SPARSITIES = [0.0, 0.5, "2:4", 0.9]
DTYPES = [torch.float32, torch.bfloat16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_bit_exact(reference: dict, loaded: dict):
    assert sorted(reference) == sorted(loaded)
    for name, ref in reference.items():
        assert loaded[name].dtype == ref.dtype, name
        assert torch.equal(bits(loaded[name]), bits(ref)), name


def pruned_model(arch="llama", sparsity=0.5, dtype=torch.float32, seed=0, negative_zeros=False):
    """A tiny pruned model; `negative_zeros` turns the pruned entries of negative weights into -0.0, as
    pruning by multiplication (`weight * keep`, common in other tools) leaves them."""
    model = tiny_model(arch, seed=seed, dtype=dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if sparsity == "2:4":
        pilot_hf.magnitude_prune(model, None, "2:4")
    elif sparsity:
        pilot_hf.magnitude_prune(model, sparsity)
    if negative_zeros:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.where((p == 0) & (before[n] < 0), torch.full_like(p, -0.0), p))
    return model


@pytest.fixture
def saved(tmp_path):
    """(model, dense folder, compressed folder) for a 50%-sparse fp32 tiny llama (with some -0.0 zeros)."""
    model = pruned_model(negative_zeros=True)
    model.save_pretrained(tmp_path / "dense")
    S.save_compressed(model, tmp_path / "packed")
    return model, tmp_path / "dense", tmp_path / "packed"


# --- bits and single tensors -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_is_numpy_packbits_little(n):
    flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = S.pack_bits(flags)
    assert np.array_equal(packed.numpy(), np.packbits(flags.numpy(), bitorder="little"))
    assert torch.equal(S.unpack_bits(packed, n), flags)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_round_trip_keeps_special_values_and_zero_signs(dtype):
    t = torch.tensor([[0.0, -0.0, 1.5, float("nan")], [float("inf"), -float("inf"), -0.0, 0.0]], dtype=dtype)
    parts = S.compress_tensor(t)
    assert parts[S.VALUES].numel() == 4 and S.ZERO_SIGNS in parts
    assert torch.equal(bits(S.decompress_tensor("w", parts)), bits(t))
    # Without zero signs: every -0.0 reads back +0.0, all other bits unchanged, values compare equal.
    canonical = S.decompress_tensor("w", S.compress_tensor(t, keep_zero_signs=False))
    assert torch.equal(bits(canonical), bits(torch.where(t == 0, torch.zeros_like(t), t)))
    # A tensor without -0.0 stores no zero signs.
    assert S.ZERO_SIGNS not in S.compress_tensor(t.abs())


def test_stored_bytes_match_the_format():
    t = torch.zeros(64, 128, dtype=torch.bfloat16)
    t[:, ::2] = 1.0  # 50% non-zero, no -0.0
    parts = S.compress_tensor(t)
    assert S.stored_nbytes(parts) == 64 * 128 // 8 + 64 * 64 * 2 + 2 * 8
    assert S.stored_nbytes(parts) / (t.numel() * 2) == pytest.approx(0.5625, abs=1e-3)


# --- whole checkpoints ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=["0", "50", "2of4", "90"])
def test_round_trip_bit_exact_and_same_logits(tmp_path, sparsity, dtype):
    """Both loaders (load_compressed, and AutoModelForCausalLM.from_pretrained after importing pilot_hf)
    give back every tensor bit for bit, and the logits of the plain dense round trip."""
    model = pruned_model("llama", sparsity, dtype)
    model.save_pretrained(tmp_path / "dense")
    stats = S.save_compressed(model, tmp_path / "packed")
    reference = T.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # the plain dense round trip
    x = tiny_inputs()
    with torch.no_grad():
        expected = reference(x).logits

    assert pilot_hf.HOOK_REGISTERED
    for loaded in (S.load_compressed(tmp_path / "packed"), T.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")):
        assert_bit_exact(model.state_dict(), loaded.state_dict())
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, expected)
        # A plain model again: no quantizer or quantization_config left.
        assert loaded.dtype == dtype and getattr(loaded.config, "quantization_config", None) is None
        assert not getattr(loaded, "is_quantized", False)

    targets = {n + ".weight" for n in pilot_hf.find_target_layers(model)}
    if sparsity == 0.0:  # nothing pays: a plain dense checkpoint
        assert stats["weights"] == {} and not S.is_compressed(tmp_path / "packed")
    else:
        assert set(stats["weights"]) == targets
        expected = 1 - pilot_hf.sparsity_report(model)["total"]["sparsity"]
        kept = sum(w["dense_bytes"] * (1 - w["sparsity"]) for w in stats["weights"].values())
        assert kept / sum(w["dense_bytes"] for w in stats["weights"].values()) == pytest.approx(expected)
        packed = (tmp_path / "packed/model.safetensors").stat().st_size
        assert packed < (tmp_path / "dense/model.safetensors").stat().st_size


def test_auto_model_result_saves_back_dense(saved, tmp_path):
    _, dense, packed = saved
    T.AutoModelForCausalLM.from_pretrained(packed).save_pretrained(tmp_path / "again")
    assert_bit_exact(load_file(dense / "model.safetensors"), load_file(tmp_path / "again/model.safetensors"))
    assert "quantization_config" not in json.loads((tmp_path / "again/config.json").read_text())


def test_auto_model_honours_requested_dtype(tmp_path):
    model = pruned_model("llama", 0.5, torch.bfloat16)
    S.save_compressed(model, tmp_path / "packed")
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    for name, ref in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], ref.float()), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_round_trips(tmp_path, arch):
    model = pruned_model(arch, 0.5, torch.bfloat16)
    stats = S.save_compressed(model, tmp_path / "packed")
    assert len(stats["weights"]) == len(pilot_hf.find_target_layers(model))
    for loaded in (S.load_compressed(tmp_path / "packed"),
                   T.AutoModelForCausalLM.from_pretrained(tmp_path / "packed")):
        assert_bit_exact(model.state_dict(), loaded.state_dict())


def test_sharded_checkpoint_round_trips(tmp_path):
    model = pruned_model("llama", 0.9)
    S.save_compressed(model, tmp_path / "packed", max_shard_size="20KB", tokenizer=None)
    index = json.loads((tmp_path / "packed" / S.SAFE_WEIGHTS_INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "packed" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for s in shards for t in load_file(tmp_path / "packed" / s).values())
    assert_bit_exact(model.state_dict(), S.load_compressed(tmp_path / "packed").state_dict())
    assert_bit_exact(model.state_dict(), T.AutoModelForCausalLM.from_pretrained(tmp_path / "packed").state_dict())


def test_format_on_disk(saved):
    model, _, packed = saved
    config = json.loads((packed / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "pilot_sparse" and config["bit_order"] == "little"
    assert config["format_version"] == 3 and config["dequantize"] is True
    assert json.loads((packed / "config.json").read_text())["transformers_weights"] == S.LOADER_GUARD
    name = "model.layers.0.mlp.up_proj.weight"
    assert name in config["compressed_weights"]
    # One sha256 per compressed weight: of its shape (JSON, newline) and the dense tensor's bytes, row-major, in
    # its stored dtype.
    assert sorted(config["digests"]) == config["compressed_weights"]
    for key in config["compressed_weights"]:
        dense = model.state_dict()[key]
        shape = json.dumps(list(dense.shape)).encode() + b"\n"
        assert config["digests"][key] == hashlib.sha256(shape + dense.numpy().tobytes()).hexdigest()
    with safe_open(packed / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert name not in keys
        mask, values = f.get_tensor(name + "_bitmask"), f.get_tensor(name + "_values")
        assert f.get_tensor(name + "_shape").tolist() == [64, 32]
    dense = model.state_dict()[name]
    assert mask.dtype == torch.uint8 and mask.numel() == dense.numel() // 8
    assert np.array_equal(mask.numpy(), np.packbits((dense != 0).numpy().reshape(-1), bitorder="little"))
    assert torch.equal(values, dense[dense != 0])
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys  # dense tensors stay as they are


def test_dropping_zero_signs_is_smaller_and_numerically_equal(tmp_path):
    model = pruned_model("llama", 0.5, torch.bfloat16, negative_zeros=True)
    kept = S.save_compressed(model, tmp_path / "kept")
    dropped = S.save_compressed(model, tmp_path / "dropped", keep_zero_signs=False)
    assert any(w["zero_signs"] for w in kept["weights"].values())
    assert dropped["stored_bytes"] < kept["stored_bytes"]
    for loaded in (S.load_compressed(tmp_path / "dropped").state_dict(),  # digests of the +0.0 tensors match
                   T.AutoModelForCausalLM.from_pretrained(tmp_path / "dropped").state_dict()):
        for name, ref in model.state_dict().items():
            assert torch.equal(loaded[name], ref), name  # -0.0 == 0.0
            assert not torch.signbit(loaded[name][loaded[name] == 0]).any()


def test_tokenizer_and_extra_files_are_copied(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")))
    S.save_compressed(pruned_model(), tmp_path / "packed", tokenizer=tok)
    assert (tmp_path / "packed" / "tokenizer.json").is_file()
    assert (tmp_path / "packed" / "generation_config.json").is_file()
    assert not any(p.name.startswith(".pilot-dense-") for p in tmp_path.iterdir())  # temp folder removed


def test_compress_checkpoint_never_touches_source(saved, tmp_path):
    _, dense, _ = saved
    before = {p.name: p.read_bytes() for p in dense.iterdir()}
    S.compress_checkpoint(dense, tmp_path / "copy")
    assert {p.name: p.read_bytes() for p in dense.iterdir()} == before
    with pytest.raises(ValueError, match="source folder"):
        S.compress_checkpoint(dense, dense)
    with pytest.raises(ValueError, match="already compressed"):
        S.compress_checkpoint(tmp_path / "copy", tmp_path / "copy2")


def test_wrapped_model_is_refused(tmp_path):
    model = pilot_hf.wrap_model(tiny_model())
    with pytest.raises(ValueError, match="merge_and_unload"):
        S.save_compressed(model, tmp_path / "packed")


def test_pickle_only_folder_is_refused(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pickle files are never read"):
        S.load_compressed(tmp_path)


def test_remote_code_is_refused(saved):
    with pytest.raises(ValueError, match="remote code"):
        S.load_compressed(saved[2], trust_remote_code=True)


# --- corruption ------------------------------------------------------------------------------------------

NAME = "model.layers.0.mlp.up_proj.weight"


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _drop_value(t):
    t[NAME + "_values"] = t[NAME + "_values"][:-1].clone()


def _short_mask(t):
    t[NAME + "_bitmask"] = t[NAME + "_bitmask"][:-1].clone()


def _flip_bit(t):
    mask = t[NAME + "_bitmask"].clone()
    mask[0] ^= 1  # one more or one less marked entry than stored values
    t[NAME + "_bitmask"] = mask


def _wrong_shape(t):
    t[NAME + "_shape"] = torch.tensor([64, 64])


def _missing_part(t):
    del t[NAME + "_values"]


def _zero_signs_length(t):
    t[NAME + "_zero_signs"] = t[NAME + "_zero_signs"][:-1].clone()


def _int_values(t):
    t[NAME + "_values"] = t[NAME + "_values"].to(torch.int32)


def _unlisted(t):
    t["model.layers.7.mlp.up_proj.weight_bitmask"] = torch.zeros(8, dtype=torch.uint8)


CORRUPTIONS = {
    "value count != popcount": (_drop_value, "non-zero entries"),
    "bitmask too short": (_short_mask, "expected uint8"),
    "bit flipped": (_flip_bit, "non-zero entries"),
    "shape disagrees": (_wrong_shape, "expected uint8"),
    "part missing": (_missing_part, "lacks"),
    "zero signs too short": (_zero_signs_length, "_zero_signs"),
    "values not floating": (_int_values, "non-zero entries"),
    "unlisted compressed weight": (_unlisted, "unlisted"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupted_tensor_raises_value_error(saved, corruption):
    _, _, packed = saved
    edit, message = CORRUPTIONS[corruption]
    _rewrite(packed, edit)
    with pytest.raises(ValueError, match=message):
        S.load_compressed(packed)
    with pytest.raises(ValueError, match=message):  # the from_pretrained route checks before loading
        T.AutoModelForCausalLM.from_pretrained(packed)


def test_padding_bits_set_is_detected():
    parts = S.compress_tensor(torch.randn(3, 3))  # 9 entries: 7 padding bits in the last byte
    parts[S.BITMASK][-1] |= 0x80
    with pytest.raises(ValueError, match="padding bits"):
        S.decompress_tensor("w", parts)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_file_raises_value_error(saved, keep):
    _, _, packed = saved
    path = packed / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: math.floor(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated"):
        S.load_compressed(packed)


def test_listed_weight_missing_from_files(saved):
    _, _, packed = saved
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"]["compressed_weights"].append("model.layers.9.mlp.up_proj.weight")
    (packed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        S.load_compressed(packed)


def test_newer_format_version_is_refused(saved):
    _, _, packed = saved
    config = json.loads((packed / "config.json").read_text())
    config["quantization_config"]["format_version"] = S.FORMAT_VERSION + 1
    (packed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="Upgrade pilot-hf"):
        S.load_compressed(packed)


@pytest.mark.slow
def test_real_smollm2_round_trip_and_size(tmp_path):
    """SmolLM2-135M in bf16 at 50%: bit-exact through both loaders; pruned weights at the format's size."""
    from pilot_hf.assets import load_demo_model

    model, _ = load_demo_model()
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model = model.to(torch.bfloat16)
    pilot_hf.magnitude_prune(model, 0.5)
    stats = S.save_compressed(model, tmp_path / "packed", keep_zero_signs=False)
    ratio = sum(w["stored_bytes"] for w in stats["weights"].values()) / sum(
        w["dense_bytes"] for w in stats["weights"].values())
    assert ratio <= 0.57
    exact = S.save_compressed(model, tmp_path / "exact")
    # Pruning writes +0.0, so the bit-exact default stores no zero signs: same size as without them.
    assert exact["stored_bytes"] == stats["stored_bytes"]
    for loaded in (S.load_compressed(tmp_path / "exact"),
                   T.AutoModelForCausalLM.from_pretrained(tmp_path / "exact")):
        assert_bit_exact(model.state_dict(), loaded.state_dict())


def test_import_pilot_hf_registers_the_format():
    """`import pilot_hf` alone must register the format: its __init__ has to import pilot_hf.serialization
    (registration runs at that module's import)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(pilot_hf.__file__).read_text())
    imports = any(isinstance(node, ast.ImportFrom) and node.level == 1 and (
        node.module == "serialization" or (node.module is None and any(a.name == "serialization" for a in node.names)))
        for node in ast.walk(tree))
    if not imports:
        pytest.skip("pilot_hf/__init__.py does not import pilot_hf.serialization yet")
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    assert pilot_hf.HOOK_REGISTERED and AUTO_QUANTIZER_MAPPING["pilot_sparse"] is _transformers_sparse.PilotSparseHfQuantizer


# --- digests (format version 2) ----------------------------------------------------------------------------

LOADERS = {
    "load_compressed": lambda p: S.load_compressed(p).state_dict(),
    "load_compressed_state_dict": S.load_compressed_state_dict,
    "from_pretrained": lambda p: T.AutoModelForCausalLM.from_pretrained(p).state_dict(),
}
NO_CHECKSUMS = "carries no checksums"


def test_tensor_digest_is_sha256_of_the_stored_bytes():
    t = torch.tensor([[0.0, -0.0, 1.5, float("nan")], [float("inf"), -2.0, -0.0, 0.0]], dtype=torch.bfloat16)
    assert S.tensor_digest(t) == hashlib.sha256(b"[2, 4]\n" + t.view(torch.int16).numpy().tobytes()).hexdigest()
    assert S.tensor_digest(t, version=2) == hashlib.sha256(t.view(torch.int16).numpy().tobytes()).hexdigest()
    assert S.tensor_digest(t.reshape(4, 2)) != S.tensor_digest(t)  # the same bytes in another shape
    assert S.tensor_digest(t.T) == S.tensor_digest(t.T.contiguous())  # row-major, whatever the strides
    # -0.0 is part of the bytes: the digest tells it from +0.0, unless the zero signs are dropped on purpose.
    positive = torch.where(t == 0, torch.zeros_like(t), t)
    assert S.tensor_digest(t) != S.tensor_digest(positive)
    assert S.expected_digest(t) == S.tensor_digest(S.decompress_tensor("w", S.compress_tensor(t)))
    dropped = S.decompress_tensor("w", S.compress_tensor(t, keep_zero_signs=False))
    assert S.expected_digest(t, keep_zero_signs=False) == S.tensor_digest(dropped) == S.tensor_digest(positive)


@pytest.mark.parametrize("loader", LOADERS)
def test_intact_checkpoint_loads_bit_exact_without_warning(saved, loader, caplog):
    model, _, packed = saved
    assert torch.signbit(model.state_dict()[NAME][model.state_dict()[NAME] == 0]).any()  # has -0.0 to check
    with caplog.at_level(logging.WARNING):
        assert_bit_exact(model.state_dict(), LOADERS[loader](packed))
    assert NO_CHECKSUMS not in caplog.text
    report = S.verify_compressed(packed, check_digests=True)
    assert report["digests"] and NAME in report["compressed_weights"]


def _flip_value_byte(t):
    values = t[NAME + "_values"].clone()
    values.view(torch.uint8)[5] ^= 0xFF  # one byte of the second value
    t[NAME + "_values"] = values


def _swap_mask_bits(t):
    mask = t[NAME + "_bitmask"]
    n = math.prod(t[NAME + "_shape"].tolist())
    flags = S.unpack_bits(mask, n)
    on, off = int(flags.nonzero()[0]), int((~flags).nonzero()[0])
    flags[on], flags[off] = False, True  # a value moves to another entry: same popcount, same padding
    swapped = S.pack_bits(flags)
    assert swapped.shape == mask.shape and S._popcount(swapped) == S._popcount(mask) and not torch.equal(swapped, mask)
    t[NAME + "_bitmask"] = swapped


def _flip_zero_sign(t):
    signs = t[NAME + "_zero_signs"].clone()
    signs[0] ^= 1  # the first zero of the weight changes sign: +0.0 <-> -0.0
    t[NAME + "_zero_signs"] = signs


SILENT_CORRUPTIONS = {"value byte flipped": _flip_value_byte, "bitmask bits swapped": _swap_mask_bits,
                      "zero sign flipped": _flip_zero_sign}


@pytest.mark.parametrize("loader", [*LOADERS, "verify_compressed"])
@pytest.mark.parametrize("corruption", SILENT_CORRUPTIONS)
def test_corruption_only_the_digest_sees_is_refused(saved, corruption, loader):
    _, _, packed = saved
    _rewrite(packed, SILENT_CORRUPTIONS[corruption])
    S.verify_compressed(packed)  # every structural check still passes: only the digest tells
    message = rf"{re.escape(NAME)}: .*sha256 digest.*corrupt.*Re-download"
    with pytest.raises(S.CorruptCheckpointError, match=message):
        if loader == "verify_compressed":
            S.verify_compressed(packed, check_digests=True)
        else:
            LOADERS[loader](packed)


def _write_v1(packed):
    """What pilot-hf wrote before digests: format version 1, no `digests`."""
    config = json.loads((packed / "config.json").read_text())
    del config["quantization_config"]["digests"]
    config["quantization_config"]["format_version"] = 1
    (packed / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("loader", LOADERS)
def test_version_1_checkpoint_loads_with_one_warning(saved, loader, caplog):
    model, _, packed = saved
    _write_v1(packed)
    with caplog.at_level(logging.WARNING, logger="pilot_hf.serialization"):
        assert_bit_exact(model.state_dict(), LOADERS[loader](packed))
    warned = [r for r in caplog.records if NO_CHECKSUMS in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING and "version 1" in warned[0].getMessage()


def _no_digests(qc):
    del qc["digests"]


def _digest_missing(qc):
    del qc["digests"][NAME]


def _digest_extra(qc):
    qc["digests"]["model.layers.9.mlp.up_proj.weight"] = "0" * 64


def _digest_malformed(qc):
    qc["digests"][NAME] = "not-a-digest"


BAD_DIGEST_TABLES = {"version 2 without digests": (_no_digests, "has no digests"),
                     "a weight without digest": (_digest_missing, "do not match"),
                     "digest of an unknown weight": (_digest_extra, "do not match"),
                     "malformed digest": (_digest_malformed, "sha256 hex")}


@pytest.mark.parametrize("table", BAD_DIGEST_TABLES)
def test_bad_digest_table_is_refused(saved, table):
    _, _, packed = saved
    edit, message = BAD_DIGEST_TABLES[table]
    config = json.loads((packed / "config.json").read_text())
    edit(config["quantization_config"])
    (packed / "config.json").write_text(json.dumps(config))
    with pytest.raises(S.CorruptCheckpointError, match=message):
        S.load_compressed(packed)
    with pytest.raises(ValueError, match=message):
        T.AutoModelForCausalLM.from_pretrained(packed)


# --- the Transformers integration is optional -----------------------------------------------------------

PRIVATE_TRANSFORMERS = ("transformers.core_model_loading", "transformers.quantizers",
                        "transformers.utils.quantization_config")


def test_serialization_imports_only_public_transformers():
    """Private Transformers modules are imported only by _transformers_sparse, behind the import guard."""
    import ast

    imported = set()
    for node in ast.walk(ast.parse(Path(S.__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    private = sorted(m for m in imported if m.startswith(PRIVATE_TRANSFORMERS))
    assert not private, f"serialization.py imports private Transformers modules: {private}"


@pytest.mark.parametrize("error", [ImportError, AttributeError, TypeError])
def test_failed_registration_warns_instead_of_raising(monkeypatch, error):
    def broken():
        raise error("renamed in this release")

    monkeypatch.setattr(_transformers_sparse, "register_with_transformers", broken)
    message = (r"pilot_sparse could not be registered with transformers \S+ "
               rf"\({error.__name__}: renamed in this release\); "
               r"AutoModelForCausalLM.from_pretrained cannot read .*pilot_hf.load_compressed\(path\)")
    with pytest.warns(UserWarning, match=message):
        assert S.register_with_transformers() is False


def test_transformers_without_load_operations_is_not_registered(monkeypatch):
    from transformers.quantizers.base import HfQuantizer

    monkeypatch.delattr(HfQuantizer, "get_load_operations")
    with pytest.warns(UserWarning, match="could not be registered.*get_load_operations"):
        assert S.register_with_transformers() is False


NO_HOOK_SCRIPT = """
import builtins, sys, warnings
import transformers

real_import = builtins.__import__


def import_as_after_a_rename(name, globals=None, locals=None, fromlist=(), level=0):
    # Only pilot_hf loses the module. (sys.modules[name] = None would not do: Transformers itself imports
    # core_model_loading lazily, e.g. with each model class, so it would break Transformers, not only us.)
    if name == sys.argv[1] and (globals or {}).get("__name__", "").startswith("pilot_hf"):
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return real_import(name, globals, locals, fromlist, level)


builtins.__import__ = import_as_after_a_rename
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import pilot_hf
import torch
from pilot_hf import serialization as S
sys.path.insert(0, sys.argv[3])
from conftest import tiny_inputs, tiny_model

assert pilot_hf.HOOK_REGISTERED is False
warned = [str(w.message) for w in caught if "pilot_sparse could not be registered" in str(w.message)]
assert len(warned) == 1, [str(w.message) for w in caught]
assert f"with transformers {transformers.__version__} (" in warned[0] and sys.argv[1] in warned[0], warned[0]
assert "use pilot_hf.load_compressed(path)" in warned[0], warned[0]

model = tiny_model()
pilot_hf.magnitude_prune(model, 0.5)
assert pilot_hf.save_compressed(model, sys.argv[2])["weights"]
loaded = pilot_hf.load_compressed(sys.argv[2]).state_dict()
assert sorted(loaded) == sorted(model.state_dict())
for name, ref in model.state_dict().items():
    assert torch.equal(loaded[name].view(torch.int32), ref.view(torch.int32)), name

wrapped = pilot_hf.wrap_model(tiny_model())
assert pilot_hf.is_wrapped(wrapped)
with torch.no_grad():
    assert torch.isfinite(wrapped(tiny_inputs()).logits).all()
print("NO-HOOK-OK")
"""


@pytest.mark.parametrize("module", ["transformers.core_model_loading", "transformers.quantizers.auto"])
def test_pilot_hf_works_when_transformers_private_api_is_gone(tmp_path, module):
    """A Transformers rename must cost only the from_pretrained route: core_model_loading fails the import of
    _transformers_sparse, quantizers.auto fails inside register_with_transformers."""
    tests = Path(__file__).resolve().parent
    result = subprocess.run([sys.executable, "-c", NO_HOOK_SCRIPT, module, str(tmp_path / "packed"), str(tests)],
                            cwd=tests.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "NO-HOOK-OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
