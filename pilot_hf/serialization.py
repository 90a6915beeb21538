"""Compressed sparse checkpoints: a packed bitmask and the non-zero values per sparse weight, in safetensors.

Dense safetensors (`model.save_pretrained`) stays the default everywhere; this module is the opt-in
smaller format for pruned models. Format version 1, for a checkpoint weight `K` (a key ending in
`.weight`) of shape S, dtype D and n = prod(S) entries, of which nnz are numerically non-zero:

    K_bitmask     uint8[ceil(n / 8)]          bit i = 1 <=> entry i (row-major) is != 0; bit order
                                              "little": entry i is bit (i % 8) of byte i // 8, i.e.
                                              `np.packbits(bits, bitorder="little")`; padding bits 0.
    K_values      D[nnz]                      the non-zero entries in row-major order, bit-exact
                                              (NaN and +-inf count as non-zero).
    K_shape       int64[len(S)]               S.
    K_zero_signs  uint8[ceil((n - nnz) / 8)]  only if some zero of K is -0.0 (and keep_zero_signs):
                                              bit j = 1 <=> the j-th zero (row-major) is -0.0.

Every other tensor is stored exactly as `save_pretrained` wrote it. A weight is compressed only if it
is a 2-D floating tensor named like a model parameter and the parts take at most (1 - min_saving) of
its dense bytes. `config.json` gets a `quantization_config` entry:

    {"quant_method": "pilot_sparse", "format_version": 1, "bit_order": "little",
     "compressed_weights": [sorted keys K], "dequantize": true}

Loading expands every weight back to the exact dense tensor (a plain Transformers model, no special
modules): `load_compressed(path)`, or `AutoModelForCausalLM.from_pretrained(path)` once `pilot_hf` is
imported (registered as a Transformers quantization method that decompresses at load time).

Why zero signs: pruning by `weight.mul_(keep)` leaves -0.0 at about half of the pruned entries. The
bitmask treats -0.0 as zero; restoring it as +0.0 would change those bits, so the signs are kept
(1 bit per zero, only for tensors that have any -0.0). `keep_zero_signs=False` drops them: every
value still compares equal (-0.0 == 0.0) and logits are unchanged, but those bits read back +0.0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

logger = logging.getLogger(__name__)

FORMAT_NAME = "pilot_sparse"  # the `quant_method` in config.json
FORMAT_VERSION = 1
BIT_ORDER = "little"
BITMASK, VALUES, SHAPE, ZERO_SIGNS = "_bitmask", "_values", "_shape", "_zero_signs"
PART_SUFFIXES = (BITMASK, VALUES, SHAPE, ZERO_SIGNS)
DEFAULT_MIN_SAVING = 0.1  # compress a weight only if that saves at least 10% of its bytes

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

_SHIFTS = torch.arange(8, dtype=torch.uint8)
_POPCOUNT = torch.tensor([i.bit_count() for i in range(256)], dtype=torch.int64)


class CorruptCheckpointError(ValueError):
    """A compressed tensor or file is inconsistent (bad lengths, counts, truncated file): never loaded."""


# ----------------------------------------------------------------------------------------------------
# Bits and single tensors
# ----------------------------------------------------------------------------------------------------

def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack booleans (any shape, read row-major) into uint8, little bit order, zero padding bits."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` booleans of a little-bit-order packed uint8 tensor."""
    bits = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.reshape(-1)[:count].bool()


def _popcount(packed: torch.Tensor) -> int:
    return int(_POPCOUNT.to(packed.device)[packed.long()].sum())


def _check_packed(name: str, part: str, packed: torch.Tensor, count: int) -> None:
    """`packed` must be a 1-D uint8 tensor of exactly ceil(count / 8) bytes whose padding bits are 0."""
    expected = (count + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise CorruptCheckpointError(
            f"{name}{part}: expected uint8[{expected}] (packed bits of {count} entries), found "
            f"{str(packed.dtype).removeprefix('torch.')}{list(packed.shape)}; the checkpoint is corrupted.")
    if count % 8 and int(packed[-1]) >> (count % 8):
        raise CorruptCheckpointError(f"{name}{part}: padding bits after entry {count} are set; "
                                     "the checkpoint is corrupted.")


def compress_tensor(tensor: torch.Tensor, keep_zero_signs: bool = True) -> dict[str, torch.Tensor]:
    """The parts (suffix -> tensor) storing `tensor`: bitmask, values, shape, and zero signs if needed."""
    if not tensor.is_floating_point():
        raise TypeError(f"only floating tensors are compressed, not {tensor.dtype}.")
    flat = tensor.detach().contiguous().reshape(-1)
    nonzero = flat != 0  # NaN != 0, so NaN is kept as a value
    parts = {
        BITMASK: pack_bits(nonzero),
        VALUES: flat[nonzero].clone(),
        SHAPE: torch.tensor(list(tensor.shape), dtype=torch.int64),
    }
    if keep_zero_signs:
        negative = torch.signbit(flat[~nonzero])
        if bool(negative.any()):
            parts[ZERO_SIGNS] = pack_bits(negative)
    return parts


def decompress_tensor(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the exact dense tensor from its parts; CorruptCheckpointError (a ValueError) if inconsistent."""
    missing = [s for s in (BITMASK, VALUES, SHAPE) if s not in parts]
    if missing:
        raise CorruptCheckpointError(f"{name}: compressed weight lacks {[name + s for s in missing]}; "
                                     "the checkpoint is incomplete or corrupted.")
    shape, bitmask, values = parts[SHAPE], parts[BITMASK], parts[VALUES]
    numel = _checked_numel(name, shape)
    _check_packed(name, BITMASK, bitmask, numel)
    nnz = _popcount(bitmask)
    _check_values(name, values.dtype, tuple(values.shape), nnz)
    nonzero = unpack_bits(bitmask, numel)
    dense = torch.zeros(numel, dtype=values.dtype, device=values.device)
    dense.masked_scatter_(nonzero, values)
    if ZERO_SIGNS in parts:
        signs = parts[ZERO_SIGNS]
        _check_packed(name, ZERO_SIGNS, signs, numel - nnz)
        negative = unpack_bits(signs, numel - nnz)
        zeros = torch.zeros(numel - nnz, dtype=values.dtype, device=values.device)
        zeros[negative] = -0.0
        dense.masked_scatter_(~nonzero, zeros)
    return dense.reshape([int(s) for s in shape.tolist()])


def _checked_numel(name: str, shape: torch.Tensor) -> int:
    if shape.dtype != torch.int64 or shape.dim() != 1 or bool((shape < 0).any()):
        raise CorruptCheckpointError(f"{name}{SHAPE}: expected a 1-D int64 tensor of non-negative sizes, found "
                                     f"{shape.dtype}{list(shape.shape)}; the checkpoint is corrupted.")
    return math.prod(int(s) for s in shape.tolist())


def _check_values(name: str, dtype: torch.dtype, shape: tuple, nnz: int) -> None:
    if not dtype.is_floating_point or len(shape) != 1 or shape[0] != nnz:
        raise CorruptCheckpointError(
            f"{name}{VALUES}: the bitmask marks {nnz} non-zero entries but {list(shape)} values "
            f"({str(dtype).removeprefix('torch.')}) are stored; the checkpoint is corrupted.")


def stored_nbytes(parts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


# ----------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------

def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (single file or sharded with an index)."""
    folder = Path(folder)
    index = folder / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CorruptCheckpointError(f"{index} lists shards that do not exist: {missing}.")
        return [folder / s for s in shards]
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        return [folder / SAFE_WEIGHTS_NAME]
    pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = (f" It has {pickles}: pickle files are never read here; re-save the model with "
            "`save_pretrained` (safetensors).") if pickles else ""
    raise FileNotFoundError(f"{folder} has no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}.{hint}")


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; it is not a saved Transformers model.")
    return json.loads(path.read_text(encoding="utf-8"))


def compression_config(folder: str | os.PathLike) -> dict | None:
    """The `quantization_config` of a compressed checkpoint folder, None for a plain (dense) one."""
    qc = _read_config(Path(folder)).get("quantization_config")
    if not qc:
        return None
    if qc.get("quant_method") != FORMAT_NAME:
        raise ValueError(f"{folder} is quantized with {qc.get('quant_method')!r}, not a pilot-hf checkpoint; "
                         "load it with transformers directly.")
    return PilotSparseConfig.from_dict(qc).to_dict()


def is_compressed(folder: str | os.PathLike) -> bool:
    return compression_config(folder) is not None


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as err:  # truncated or damaged header/data
        raise CorruptCheckpointError(f"{path} is not a readable safetensors file ({err}); it is truncated or "
                                     "corrupted. Re-save or re-download it.") from err


def _split_key(key: str) -> tuple[str, str] | None:
    """('X.weight', '_bitmask') for 'X.weight_bitmask', None for ordinary keys."""
    for suffix in PART_SUFFIXES:
        if key.endswith(".weight" + suffix):
            return key[: -len(suffix)], suffix
    return None


def verify_compressed(folder: str | os.PathLike | None, files: list[str | os.PathLike] | None = None,
                      compressed_weights: list[str] | None = None) -> dict[str, Any]:
    """Check every compressed weight of a checkpoint without expanding it: all parts present, bitmask
    lengths, padding bits, value counts == popcounts, zero-sign lengths, and exactly the weights listed
    in config.json (or `compressed_weights`). Raises CorruptCheckpointError (a ValueError) naming the
    tensor and file. `files` defaults to the folder's weight files."""
    if compressed_weights is None:
        compressed_weights = (compression_config(folder) or {}).get("compressed_weights", [])
    files = [Path(f) for f in files] if files is not None else weight_files(folder)
    found: dict[str, dict[str, tuple]] = {}
    for path in files:
        with _open(path) as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                split = _split_key(key) if compressed_weights else None  # a dense checkpoint has no parts
                if split is None:
                    continue
                base, suffix = split
                try:
                    sl = f.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    small = f.get_tensor(key) if suffix in (BITMASK, SHAPE, ZERO_SIGNS) else None
                except SafetensorError as err:
                    raise CorruptCheckpointError(f"{key} in {path} cannot be read ({err}).") from err
                found.setdefault(base, {})[suffix] = (path, shape, dtype, small)
    listed = set(compressed_weights)
    if listed - set(found):
        raise CorruptCheckpointError(f"compressed weights listed in config.json are missing from the weight files: "
                                     f"{sorted(listed - set(found))[:5]}; the checkpoint is incomplete or corrupted.")
    if set(found) - listed:
        raise CorruptCheckpointError(f"the weight files hold compressed weights config.json does not list (unlisted): "
                                     f"{sorted(set(found) - listed)[:5]}; the checkpoint is corrupted.")
    for base, parts in found.items():
        missing = [s for s in (BITMASK, VALUES, SHAPE) if s not in parts]
        if missing:
            raise CorruptCheckpointError(f"{base}: compressed weight lacks {[base + s for s in missing]}.")
        path = parts[BITMASK][0]
        try:
            numel = _checked_numel(base, parts[SHAPE][3])
            _check_packed(base, BITMASK, parts[BITMASK][3], numel)
            nnz = _popcount(parts[BITMASK][3])
            _, vshape, vdtype, _ = parts[VALUES]
            if vdtype not in _SAFETENSORS_FLOATS or len(vshape) != 1 or vshape[0] != nnz:
                raise CorruptCheckpointError(
                    f"{base}{VALUES}: the bitmask marks {nnz} non-zero entries but {list(vshape)} values "
                    f"({vdtype}) are stored; the checkpoint is corrupted.")
            if ZERO_SIGNS in parts:
                _check_packed(base, ZERO_SIGNS, parts[ZERO_SIGNS][3], numel - nnz)
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(f"{err} (file {path})") from None
    return {"files": [str(p) for p in files], "compressed_weights": sorted(found)}


_SAFETENSORS_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def load_compressed_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, compressed weights expanded to exact dense tensors (checked)."""
    folder = Path(folder)
    compressed = bool(verify_compressed(folder)["compressed_weights"])
    state_dict: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in weight_files(folder):
        with _open(path) as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                try:
                    tensor = f.get_tensor(key)
                except SafetensorError as err:
                    raise CorruptCheckpointError(f"{key} in {path} cannot be read ({err}).") from err
                split = _split_key(key) if compressed else None
                if split is None:
                    state_dict[key] = tensor
                else:
                    parts.setdefault(split[0], {})[split[1]] = tensor
    for base, p in parts.items():
        state_dict[base] = decompress_tensor(base, p)
    return state_dict


def _model_param_names(folder: Path) -> set[str]:
    """Parameter names of the model a folder's config describes, from a meta-device skeleton (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    return set(model.state_dict().keys())


def compress_checkpoint(src_dir: str | os.PathLike, output_dir: str | os.PathLike, *,
                        min_saving: float = DEFAULT_MIN_SAVING, keep_zero_signs: bool = True,
                        param_names: set[str] | None = None) -> dict[str, Any]:
    """Write a compressed copy of a saved (dense, safetensors) checkpoint folder; `src_dir` is only read.

    Top-level non-weight files (tokenizer, generation config, README...) are copied; sub-folders
    (e.g. trainer `checkpoint-*`) are not. Shards keep their names and the index is rewritten. If no
    weight pays to compress, the output is a plain dense checkpoint (no `quantization_config`).
    Returns sizes per compressed weight and in total (bytes).
    """
    src, out = Path(src_dir), Path(output_dir)
    if not 0 <= min_saving < 1:
        raise ValueError(f"min_saving={min_saving}: give the least fraction of bytes a weight must save, in [0, 1).")
    if out.exists() and src.resolve() == out.resolve():
        raise ValueError(f"output_dir is the source folder {src}; write the compressed copy to another folder.")
    config = _read_config(src)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"{src} is already {'compressed' if method == FORMAT_NAME else f'quantized ({method})'}; "
                         "compress a dense checkpoint.")
    files = weight_files(src)
    if param_names is None:
        param_names = _model_param_names(src)

    out.mkdir(parents=True, exist_ok=True)
    for stale in list(out.glob("model*.safetensors")) + [out / SAFE_WEIGHTS_INDEX_NAME]:
        if stale.is_file():
            stale.unlink()  # leftovers of an earlier save would shadow or mix with the new weights
    for item in src.iterdir():
        if item.is_file() and item.name != CONFIG_NAME and item not in files and item.name != SAFE_WEIGHTS_INDEX_NAME:
            shutil.copy2(item, out / item.name)

    stats: dict[str, Any] = {"weights": {}, "dense_bytes": 0, "stored_bytes": 0}
    weight_map: dict[str, str] = {}
    for path in files:
        tensors: dict[str, torch.Tensor] = {}
        with _open(path) as f:
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
        config["quantization_config"] = PilotSparseConfig(
            compressed_weights=sorted(stats["weights"])).to_dict()
    else:
        logger.info("no weight of %s is sparse enough to pay for a bitmask; wrote a plain dense checkpoint.", src)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return stats


def save_compressed(model: torch.nn.Module, output_dir: str | os.PathLike, tokenizer=None, *,
                    min_saving: float = DEFAULT_MIN_SAVING, keep_zero_signs: bool = True,
                    max_shard_size: str | int = "5GB") -> dict[str, Any]:
    """Save a (pruned, unwrapped) model as a compressed checkpoint: `save_pretrained` writes it dense to a
    temporary folder beside `output_dir`, then `compress_checkpoint` packs its sparse weights.

    `tokenizer` (optional) is saved alongside. Returns the sizes `compress_checkpoint` reports.
    """
    from .wrapping import is_wrapped

    if is_wrapped(model):
        raise ValueError("this model still has MaskedLinear layers; call merge_and_unload(model) before saving, "
                         "so the checkpoint is a plain Transformers model.")
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pilot-dense-", dir=out.parent) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        return compress_checkpoint(tmp, out, min_saving=min_saving, keep_zero_signs=keep_zero_signs,
                                   param_names=set(model.state_dict().keys()))


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

class PilotSparseConfig(QuantizationConfigMixin):
    """The `quantization_config` of a compressed checkpoint. Loading always expands to dense weights
    (`dequantize` is always True): the loaded model is a plain Transformers model."""

    def __init__(self, format_version: int = FORMAT_VERSION, bit_order: str = BIT_ORDER,
                 compressed_weights: list[str] | None = None, dequantize: bool = True, **kwargs):
        method = kwargs.pop("quant_method", FORMAT_NAME)
        if method != FORMAT_NAME:
            raise ValueError(f"quant_method {method!r} is not {FORMAT_NAME!r}.")
        if int(format_version) > FORMAT_VERSION:
            raise ValueError(f"this checkpoint uses pilot_sparse format version {format_version}; this pilot-hf "
                             f"reads up to version {FORMAT_VERSION}. Upgrade pilot-hf.")
        if bit_order != BIT_ORDER:
            raise ValueError(f"pilot_sparse bit_order {bit_order!r} is not supported (only {BIT_ORDER!r}).")
        if not dequantize:
            raise ValueError("pilot_sparse checkpoints always load as dense weights; dequantize must be True.")
        self.quant_method = FORMAT_NAME
        self.format_version = int(format_version)
        self.bit_order = bit_order
        self.compressed_weights = list(compressed_weights or [])
        self.dequantize = True


class PilotSparseDecompress(ConversionOps):
    """Load operation: the collected parts of one weight -> the exact dense weight, in the param's dtype."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer  # marks this op as reading raw checkpoint tensors (no dtype cast first)

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs):
        parts = {}
        for pattern, tensors in input_dict.items():
            suffix = pattern[len("weight"):]
            if suffix not in PART_SUFFIXES or len(tensors) != 1:
                raise CorruptCheckpointError(f"{full_layer_name}: unexpected checkpoint entries {pattern!r} "
                                             f"x{len(tensors)}.")
            parts[suffix] = tensors[0]
        dense = decompress_tensor(full_layer_name or "weight", parts)
        if model is not None and full_layer_name is not None:
            try:
                dense = dense.to(model.get_parameter(full_layer_name).dtype)
            except AttributeError:
                pass
        return {"weight": dense}


class PilotSparseHfQuantizer(HfQuantizer):
    """Reads pilot_sparse checkpoints: checks the files before loading, then expands each compressed
    weight with `PilotSparseDecompress` as Transformers streams the checkpoint in. Nothing is quantized:
    the model keeps its ordinary modules and ends up without a quantization_config."""

    requires_calibration = False
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": ["weight" + s for s in PART_SUFFIXES]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError("PilotSparseConfig describes a saved checkpoint and cannot compress a model on load; "
                             "load the dense model and call pilot_hf.serialization.save_compressed(model, dir).")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if checkpoint_files:
            verify_compressed(None, checkpoint_files, self.quantization_config.compressed_weights)
        return model

    def update_weight_conversions(self, weight_conversions, model):
        # Compressed keys are exactly the model's own parameter names (see compress_checkpoint), so the
        # model's converters never see them: keep those as they are and add ours for the compressed parts.
        return list(weight_conversions) + self.get_weight_conversions()

    def get_load_operations(self):
        return {"dequantize": PilotSparseDecompress, "deserialize": PilotSparseDecompress}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return True


def register_with_transformers() -> bool:
    """Register pilot_sparse with Transformers' quantizer registry (idempotent). False if this
    Transformers lacks the load-operation API (then only `load_compressed` reads these checkpoints)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    if not hasattr(HfQuantizer, "get_load_operations"):
        logger.info("transformers %s has no quantizer load operations; use load_compressed().",
                    __import__("transformers").__version__)
        return False
    if FORMAT_NAME not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(FORMAT_NAME)(PilotSparseConfig)
    if FORMAT_NAME not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(FORMAT_NAME)(PilotSparseHfQuantizer)
    return True


HOOK_REGISTERED = register_with_transformers()
