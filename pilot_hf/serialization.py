"""Compressed sparse checkpoints: write (`compress_checkpoint`, `save_compressed`) and load
(`load_compressed`) checkpoints in the pilot_sparse format, and register that format with Transformers.

The format itself (layout, digests, the loader guard, the checks) is specified and implemented in
`sparse_format.py`; its names are importable from here too. `import pilot_hf` calls
`register_with_transformers()`, after which `AutoModelForCausalLM.from_pretrained(path)` reads compressed
checkpoints (through `_transformers_sparse`, the only module that imports private Transformers APIs).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .runs import OutputFolder
from .sparse_format import (  # noqa: F401  (the format's names stay importable from pilot_hf.serialization)
    BIT_ORDER,
    BITMASK,
    CONFIG_NAME,
    DEFAULT_MIN_SAVING,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOADER_GUARD,
    PART_SUFFIXES,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SHAPE,
    SHAPED_DIGESTS_SINCE,
    TRANSFORMERS_WEIGHTS,
    VALUES,
    ZERO_SIGNS,
    CorruptCheckpointError,
    _popcount,
    check_digest,
    check_weight_files,
    compress_tensor,
    compression_config,
    decompress_tensor,
    expected_digest,
    is_compressed,
    load_compressed_state_dict,
    open_weights,
    pack_bits,
    parse_compression_config,
    read_config,
    stored_nbytes,
    tensor_digest,
    unpack_bits,
    verify_compressed,
    weight_files,
)

logger = logging.getLogger(__name__)


def _model_param_names(folder: Path) -> set[str]:
    """Parameter names of the model a folder's config describes, from a meta-device skeleton (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return set(model.state_dict().keys())


def compress_checkpoint(src_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                        min_saving: float = DEFAULT_MIN_SAVING, keep_zero_signs: bool = True,
                        param_names: set[str] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write a compressed copy of a saved (dense, safetensors) checkpoint folder; `src_dir` is only read.

    Top-level non-weight files (tokenizer, generation config, README...) are copied; sub-folders
    (e.g. trainer `checkpoint-*`) are not. Shards keep their names and the index is rewritten. If no
    weight pays to compress, the output is a plain dense checkpoint (no `quantization_config`).
    `output_dir` follows the output protocol of every pilot-hf command (`runs.OutputFolder`): written
    completely or not at all; an existing, non-empty folder is refused unless pilot-hf wrote it and
    `overwrite` is given. Returns sizes per compressed weight and in total (bytes).
    """
    src, out = Path(src_dir), Path(output_dir)
    if not 0 <= min_saving < 1:
        raise ValueError(f"min_saving={min_saving}: give the least fraction of bytes a weight must save, in [0, 1).")
    if out.exists() and src.resolve() == out.resolve():
        raise ValueError(f"output_dir is the source folder {src}; write the compressed copy to another folder.")
    config = read_config(src)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"{src} is already {'compressed' if method == FORMAT_NAME else f'quantized ({method})'}; "
                         "compress a dense checkpoint.")
    files = weight_files(src)
    verify_compressed(src, files)  # every file readable; no compressed parts in a "dense" checkpoint
    if param_names is None:
        param_names = _model_param_names(src)
    with OutputFolder(out, overwrite) as folder:
        return _write_compressed(src, files, config, folder.staging, min_saving, keep_zero_signs, param_names)


def _write_compressed(src: Path, files: list[Path], config: dict, out: Path, min_saving: float,
                      keep_zero_signs: bool, param_names: set[str]) -> dict[str, Any]:
    for item in src.iterdir():  # not hidden files (.env, the marker): a compressed copy is made to be shared
        if item.is_file() and not item.name.startswith(".") \
                and item.name not in (CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME) and item not in files:
            shutil.copy2(item, out / item.name)

    stats: dict[str, Any] = {"weights": {}, "dense_bytes": 0, "stored_bytes": 0}
    digests: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for path in files:
        tensors: dict[str, torch.Tensor] = {}
        with open_weights(path) as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                tensor = f.get_tensor(key)
                dense_bytes = tensor.numel() * tensor.element_size()
                stats["dense_bytes"] += dense_bytes
                parts = None
                if (key.endswith(".weight") and key in param_names and tensor.dim() == 2
                        and tensor.is_floating_point()):
                    candidate = compress_tensor(tensor, keep_zero_signs)
                    if stored_nbytes(candidate) <= (1 - min_saving) * dense_bytes:
                        parts = candidate
                if parts is None:
                    tensors[key] = tensor
                    stats["stored_bytes"] += dense_bytes
                    continue
                nnz = parts[VALUES].numel()
                stats["weights"][key] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                                         "sparsity": 1 - nnz / tensor.numel(), "dense_bytes": dense_bytes,
                                         "stored_bytes": stored_nbytes(parts),
                                         "zero_signs": ZERO_SIGNS in parts}
                # Hash the tensor we mean to store, not our expansion of the parts: a packing bug is caught too.
                digests[key] = expected_digest(tensor, keep_zero_signs)
                stats["stored_bytes"] += stored_nbytes(parts)
                for suffix, part in parts.items():
                    tensors[key + suffix] = part
        metadata = {**metadata, "format": "pt"}
        save_file(tensors, str(out / path.name), metadata=metadata)
        weight_map.update({k: path.name for k in tensors})

    if (src / SAFE_WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((src / SAFE_WEIGHTS_INDEX_NAME).read_text())
        index["weight_map"] = dict(sorted(weight_map.items()))
        index.setdefault("metadata", {})["total_size"] = stats["stored_bytes"]
        (out / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if stats["weights"]:
        config["quantization_config"] = {
            "quant_method": FORMAT_NAME, "format_version": FORMAT_VERSION, "bit_order": BIT_ORDER,
            "compressed_weights": sorted(stats["weights"]), "dequantize": True,
            "digests": dict(sorted(digests.items()))}
        config[TRANSFORMERS_WEIGHTS] = LOADER_GUARD  # Transformers without pilot_hf refuses it, quoting this
        note_compressed_in_card(out)
    else:
        logger.info("no weight of %s is sparse enough to pay for a bitmask; wrote a plain dense checkpoint.", src)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return stats


COMPRESSED_CARD_TAG = "pilot_sparse"
COMPRESSED_CARD_SECTION = (
    "\n## Compressed checkpoint\n\nThe weights in this repository are stored in pilot-hf's compressed sparse format "
    "(`pilot_sparse`: a packed bitmask and the non-zero values per sparse weight). Run `pip install pilot-hf`, "
    "then `import pilot_hf` before `AutoModelForCausalLM.from_pretrained`; the weights are expanded to the exact "
    "dense tensors at load time (`pilot_hf.load_compressed(path)` does the same). Without pilot-hf, Transformers "
    "refuses to load it rather than fill the compressed layers with random weights.\n")


def note_compressed_in_card(folder: Path) -> None:
    """Tell readers of a copied README.md (a card written for the dense model) how to load the compressed copy."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return
    from huggingface_hub import ModelCard

    card = ModelCard.load(readme, ignore_metadata_errors=True)
    if COMPRESSED_CARD_TAG in (card.data.tags or []):
        return  # a card rendered for the compressed format says it already
    card.data.tags = list(card.data.tags or []) + [COMPRESSED_CARD_TAG]
    card.text += COMPRESSED_CARD_SECTION
    card.save(readme)


def save_compressed(model: torch.nn.Module, output_dir: str | os.PathLike, tokenizer=None, *,
                    min_saving: float = DEFAULT_MIN_SAVING, keep_zero_signs: bool = True,
                    max_shard_size: str | int = "5GB", overwrite: bool = False) -> dict[str, Any]:
    """Save a (pruned, unwrapped) model as a compressed checkpoint: `save_pretrained` writes it dense to a
    temporary folder beside `output_dir`, then `compress_checkpoint` packs its sparse weights (same output
    protocol: an existing folder pilot-hf did not write is refused; `overwrite` replaces one it wrote).

    `tokenizer` (optional) is saved alongside. Returns the sizes `compress_checkpoint` reports.
    """
    from .wrapping import is_wrapped

    if is_wrapped(model):
        raise ValueError("this model still has MaskedLinear layers; call merge_and_unload(model) before saving, "
                         "so the checkpoint is a plain Transformers model.")
    out = Path(output_dir)
    OutputFolder(out, overwrite)  # refused now, before the dense copy is written
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pilot-dense-", dir=out.parent) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return compress_checkpoint(tmp, out, min_saving=min_saving, keep_zero_signs=keep_zero_signs,
                                   param_names=set(model.state_dict().keys()), overwrite=overwrite)


def load_compressed(path: str | os.PathLike, **from_pretrained_kwargs):
    """Load a compressed (or plain) checkpoint as an ordinary dense causal LM, every weight bit-exact.

    This path does not depend on the Transformers quantizer hook: it checks and expands the weights
    itself, then calls `from_pretrained(None, config=..., state_dict=...)` (peak memory: about twice
    the dense model). `path` is a local folder or a Hub repo id (downloaded with `snapshot_download`;
    `revision`, `token`, `cache_dir` are passed on). Remote code is never trusted.
    """
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig

    if from_pretrained_kwargs.pop("trust_remote_code", False):
        raise ValueError("load_compressed never runs remote code (trust_remote_code=True is refused).")
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        hub = {k: from_pretrained_kwargs.pop(k) for k in ("revision", "token", "cache_dir") if k in from_pretrained_kwargs}
        folder = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"], **hub))
    state_dict = load_compressed_state_dict(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dense now
    if getattr(config, TRANSFORMERS_WEIGHTS, None) == LOADER_GUARD:
        delattr(config, TRANSFORMERS_WEIGHTS)
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"{folder}: {type(config).__name__} is not a causal LM config Transformers knows.") from None
    model = model_class.from_pretrained(None, config=config, state_dict=state_dict, **from_pretrained_kwargs)
    model.config.name_or_path = str(path)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model


# ----------------------------------------------------------------------------------------------------
# Transformers integration: `AutoModelForCausalLM.from_pretrained(path)` after `import pilot_hf`
# ----------------------------------------------------------------------------------------------------

def register_with_transformers() -> bool:
    """Register pilot_sparse with Transformers' from_pretrained without ever failing `import pilot_hf`, which
    calls this (`pilot_hf.HOOK_REGISTERED` holds the answer): the quantizer needs private Transformers APIs
    (see _transformers_sparse) that a release may rename, and training, saving and load_compressed need none
    of them. True once registered; False, with a warning, when this Transformers lacks them."""
    try:
        from . import _transformers_sparse

        return _transformers_sparse.register_with_transformers()
    except (ImportError, AttributeError, TypeError) as err:
        try:
            from importlib.metadata import version

            transformers_version = version("transformers")
        except Exception:  # only for the message
            transformers_version = "(unknown version)"
        warnings.warn(f"pilot_sparse could not be registered with transformers {transformers_version} "
                      f"({type(err).__name__}: {err}); AutoModelForCausalLM.from_pretrained cannot read compressed "
                      "pilot-hf checkpoints, use pilot_hf.load_compressed(path).", stacklevel=3)
        return False
