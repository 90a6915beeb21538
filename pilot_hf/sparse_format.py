"""The pilot_sparse format: a packed bitmask and the non-zero values per sparse weight, in safetensors.

This module is the format itself (constants, packing, digests, checks, reading); `serialization.py` writes
and loads checkpoints with it and `_transformers_sparse.py` plugs it into `from_pretrained`.

Dense safetensors (`model.save_pretrained`) stays the default everywhere; this module is the opt-in
smaller format for pruned models. Format version 3, for a checkpoint weight `K` (a key ending in
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

    {"quant_method": "pilot_sparse", "format_version": 3, "bit_order": "little",
     "compressed_weights": [sorted keys K], "dequantize": true,
     "digests": {K: sha256 hex digest of the dense tensor K}}

and the top-level entry `"transformers_weights": LOADER_GUARD` (see "Never random weights" below).

The digest (version 3) is sha256 over the shape, written as JSON (`[64, 32]`) and a newline, followed by
the exact bytes of the dense tensor the parts expand to: row-major, in its stored dtype D, little-endian
as safetensors stores it (so it covers NaN payloads and the zero signs; with keep_zero_signs=False it is
the digest of the tensor with every -0.0 read back as +0.0). Version 2 hashed the bytes only, so two
weights of equal size whose `_shape` parts were swapped passed; version 2 checkpoints still load. Every
loader expands a weight, hashes it once and refuses it on a mismatch (CorruptCheckpointError): a
flipped byte in `K_values` or a bitmask whose bits moved without changing the popcount passes the
structural checks but not the digest. Dense (uncompressed) tensors carry no digest.

Why the digests live in config.json and not in the safetensors metadata: every load path reads
config.json before any tensor, and Transformers hands it to the quantizer as its config object, so the
digest is at hand where each weight is expanded without reopening files; there is one table for all
shards (the metadata is per shard); and a digest stored apart from the weight file cannot be damaged
together with it (a damaged safetensors header loses its metadata too). The cost is ~110 bytes of
JSON per compressed weight (about 25 KB for SmolLM2-135M's 210 linears; hashing adds ~15% to a load).

Format version 1 is version 2 without `digests`: it still loads, with a warning that nothing checks
its values. A version-2 or -3 checkpoint must carry a digest for every compressed weight.

Never random weights: Transformers skips a `quant_method` it does not know (with a warning) and would fill
every compressed weight, absent under its own name, with fresh random values. So config.json also sets
`transformers_weights` (the file Transformers must load the weights from) to LOADER_GUARD, which is no
weights file name: plain Transformers stops with a ValueError that quotes it, and it says how to load the
model. `import pilot_hf` registers the format, whose quantizer removes the guard before the weight files are
looked up; `load_compressed` removes it too. pilot-hf itself refuses weight files that hold compressed parts
without their `quantization_config` (`check_weight_files`).

Loading expands every weight back to the exact dense tensor (a plain Transformers model, no special
modules): `load_compressed(path)`, or `AutoModelForCausalLM.from_pretrained(path)` once `pilot_hf` is
imported (registered as a Transformers quantization method that decompresses at load time; the
registration lives in `pilot_hf._transformers_sparse`, the only module that imports private
Transformers APIs, and a Transformers that lacks them only disables that route, with a warning).

Why zero signs: pruning by `weight.mul_(keep)` leaves -0.0 at about half of the pruned entries. The
bitmask treats -0.0 as zero; restoring it as +0.0 would change those bits, so the signs are kept
(1 bit per zero, only for tensors that have any -0.0). `keep_zero_signs=False` drops them: every
value still compares equal (-0.0 == 0.0) and logits are unchanged, but those bits read back +0.0.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

logger = logging.getLogger(__name__)

FORMAT_NAME = "pilot_sparse"  # the `quant_method` in config.json
FORMAT_VERSION = 3  # 2: a sha256 digest per compressed weight in quantization_config["digests"]; 3: over the shape too
SHAPED_DIGESTS_SINCE = 3
# config.json's `transformers_weights` in a compressed checkpoint: no file name, so that Transformers without
# pilot_hf refuses the checkpoint (quoting this) instead of loading random weights.
LOADER_GUARD = ("pilot_sparse compressed checkpoint, not a weights file: to load it, `pip install pilot-hf` and "
                "`import pilot_hf` before from_pretrained (or use pilot_hf.load_compressed(path))")
TRANSFORMERS_WEIGHTS = "transformers_weights"
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
    """A compressed tensor or file is inconsistent (bad lengths, counts, digest, truncated file): never loaded."""


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
# Digests
# ----------------------------------------------------------------------------------------------------

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def tensor_digest(tensor: torch.Tensor, version: int = FORMAT_VERSION) -> str:
    """sha256 hex digest of a tensor: (version >= 3) its shape as JSON and a newline, then its exact bytes,
    row-major, in its own dtype (little-endian, as in safetensors). hashlib reads a contiguous CPU byte view:
    no float conversion, no copy on CPU."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest = hashlib.sha256()
    if version >= SHAPED_DIGESTS_SINCE:
        digest.update(json.dumps(list(tensor.shape)).encode() + b"\n")
    digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def expected_digest(tensor: torch.Tensor, keep_zero_signs: bool = True) -> str:
    """The digest of the tensor that `compress_tensor(tensor, keep_zero_signs)` expands back to."""
    if not keep_zero_signs:  # the zero signs are dropped: -0.0 reads back +0.0
        tensor = torch.where(tensor == 0, torch.zeros_like(tensor), tensor)
    return tensor_digest(tensor)


def check_digest(name: str, dense: torch.Tensor, digests: dict[str, str] | None,
                 version: int = FORMAT_VERSION) -> None:
    """Refuse an expanded weight whose shape and bytes do not hash to its recorded digest (no-op for version 1,
    which records none). The structural checks cannot see a changed value, moved bitmask bits or swapped shapes."""
    if digests is None:
        return
    expected = digests.get(name)
    if expected is None:
        raise CorruptCheckpointError(f"{name}: config.json records no digest for this compressed weight, so it "
                                     "cannot be checked; the checkpoint is corrupt. Re-download or re-write it.")
    actual = tensor_digest(dense, version)
    if actual != expected:
        raise CorruptCheckpointError(
            f"{name}: the expanded weight (shape {list(dense.shape)}) does not match its sha256 digest in config.json "
            f"(expected {expected[:16]}..., got {actual[:16]}...): the checkpoint file is corrupt. Re-download it, or "
            "re-write it from the dense model (save_compressed / compress_checkpoint).")


# ----------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------

def check_weight_files(folder: str | os.PathLike) -> None:
    """Before a local checkpoint is loaded: each safetensors weight file is whole (a cut-off file is refused, not
    a traceback halfway through loading), and compressed parts come with the config that describes them. A
    folder without safetensors weights is left to Transformers."""
    try:
        files = weight_files(folder)
    except FileNotFoundError:
        return
    verify_compressed(folder, files)


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


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; it is not a saved Transformers model.")
    return json.loads(path.read_text(encoding="utf-8"))


def parse_compression_config(qc: dict) -> dict:
    """Check a pilot_sparse `quantization_config` and return it with every field: quant_method,
    format_version, bit_order, compressed_weights, dequantize, digests (None when absent, as in version 1).
    Unknown extra keys are ignored. Whether the digests cover the compressed weights is verify_compressed's job."""
    method = qc.get("quant_method", FORMAT_NAME)
    if method != FORMAT_NAME:
        raise ValueError(f"quant_method {method!r} is not {FORMAT_NAME!r}.")
    version = int(qc.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise ValueError(f"this checkpoint uses pilot_sparse format version {version}; this pilot-hf "
                         f"reads up to version {FORMAT_VERSION}. Upgrade pilot-hf.")
    bit_order = qc.get("bit_order", BIT_ORDER)
    if bit_order != BIT_ORDER:
        raise ValueError(f"pilot_sparse bit_order {bit_order!r} is not supported (only {BIT_ORDER!r}).")
    if not qc.get("dequantize", True):
        raise ValueError("pilot_sparse checkpoints always load as dense weights; dequantize must be True.")
    digests = qc.get("digests")
    if digests is not None and not (isinstance(digests, dict) and all(
            isinstance(k, str) and isinstance(v, str) and _HEX_DIGEST.fullmatch(v) for k, v in digests.items())):
        raise CorruptCheckpointError("config.json: quantization_config.digests must map weight names to sha256 hex "
                                     "digests; the checkpoint is corrupt. Re-download or re-write it.")
    return {"quant_method": FORMAT_NAME, "format_version": version, "bit_order": bit_order,
            "compressed_weights": list(qc.get("compressed_weights") or []), "dequantize": True,
            "digests": dict(digests) if digests is not None else None}


def compression_config(folder: str | os.PathLike) -> dict | None:
    """The `quantization_config` of a compressed checkpoint folder (checked, see parse_compression_config),
    None for a plain (dense) one."""
    config = read_config(Path(folder))
    qc = config.get("quantization_config")
    if not qc:
        if config.get(TRANSFORMERS_WEIGHTS) == LOADER_GUARD:
            raise CorruptCheckpointError(f"{folder} is a pilot_sparse compressed checkpoint whose config.json lost its "
                                         "quantization_config, so its compressed weights cannot be expanded; loading "
                                         "it would give random weights. Re-download or re-write it.")
        return None
    if qc.get("quant_method") != FORMAT_NAME:
        raise ValueError(f"{folder} is quantized with {qc.get('quant_method')!r}, not a pilot-hf checkpoint; "
                         "load it with transformers directly.")
    return parse_compression_config(qc)


def is_compressed(folder: str | os.PathLike) -> bool:
    return compression_config(folder) is not None


def open_weights(path: Path):
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
                      config: dict | None = None, *, check_digests: bool = False,
                      shapes: dict[str, tuple] | None = None) -> dict[str, Any]:
    """Check every compressed weight of a checkpoint without expanding it: all parts present, bitmask
    lengths, padding bits, value counts == popcounts, zero-sign lengths, exactly the weights listed in
    config.json, and (format version 2 and later) a digest for each of them. Raises CorruptCheckpointError (a
    ValueError) naming the tensor and file. `config` is the `quantization_config` (default: the folder's
    config.json); `files` defaults to the folder's weight files. Logs a warning for a version-1
    checkpoint, which has no digests.

    The digests themselves need the expanded weights: the loaders compare them as they expand each
    weight. `check_digests=True` does it here too (expands one weight at a time, reads every value). `shapes`
    (name -> the model's parameter shape) also compares each stored shape with the model's."""
    config = parse_compression_config(config) if config is not None else compression_config(folder) or {}
    compressed_weights, digests = config.get("compressed_weights", []), config.get("digests")
    version = config.get("format_version", FORMAT_VERSION)
    files = [Path(f) for f in files] if files is not None else weight_files(folder)
    found: dict[str, dict[str, tuple]] = {}
    for path in files:
        with open_weights(path) as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                split = _split_key(key)  # parts in a "dense" checkpoint are refused below, never skipped
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
    if found and not listed:
        where = folder if folder is not None else files[0].parent
        raise CorruptCheckpointError(
            f"{where}: the weight files hold pilot_sparse compressed weights (e.g. {sorted(found)[0]}_bitmask) but "
            "config.json has no pilot_sparse quantization_config that describes them, so they cannot be expanded: "
            "loading would leave those weights random. Restore the checkpoint's own config.json (re-download it), "
            "or re-write it with save_compressed / compress_checkpoint.")
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
            stored = tuple(int(x) for x in parts[SHAPE][3].tolist())
            if shapes is not None and base in shapes and stored != tuple(shapes[base]):
                raise CorruptCheckpointError(f"{base}{SHAPE}: the checkpoint stores shape {list(stored)} but the model's "
                                             f"weight is {list(shapes[base])}; the checkpoint is corrupt. Re-download "
                                             "or re-write it.")
        except CorruptCheckpointError as err:
            raise CorruptCheckpointError(f"{err} (file {path})") from None
    if found:
        _check_digest_table(folder if folder is not None else files, config, sorted(found))
    if found and digests is not None and check_digests:
        with ExitStack() as stack:
            paths = {part[0] for parts in found.values() for part in parts.values()}
            handles = {path: stack.enter_context(open_weights(path)) for path in paths}
            for base, parts in sorted(found.items()):
                path = parts[VALUES][0]
                try:
                    tensors = {s: handles[p[0]].get_tensor(base + s) for s, p in parts.items()}
                    check_digest(base, decompress_tensor(base, tensors), digests, version)
                except SafetensorError as err:
                    raise CorruptCheckpointError(f"{base} in {path} cannot be read ({err}).") from err
                except CorruptCheckpointError as err:
                    raise CorruptCheckpointError(f"{err} (file {path})") from None
    return {"files": [str(p) for p in files], "compressed_weights": sorted(found),
            "digests": digests is not None}  # carries digests (compared only with check_digests)


def _check_digest_table(where, config: dict, compressed_weights: list[str]) -> None:
    """Version 2: exactly one digest per compressed weight. Version 1 (no digests): a warning."""
    digests = config.get("digests")
    if digests is None:
        if config.get("format_version", FORMAT_VERSION) >= 2:
            raise CorruptCheckpointError(f"{where}: config.json is pilot_sparse format version "
                                         f"{config['format_version']} but has no digests; the checkpoint is corrupt. "
                                         "Re-download or re-write it.")
        logger.warning("%s is a pilot_sparse format version 1 checkpoint: it carries no checksums, so a damaged value "
                       "or bitmask would load unnoticed. Re-write it with save_compressed / compress_checkpoint to "
                       "add them.", where)
        return
    missing, extra = set(compressed_weights) - set(digests), set(digests) - set(compressed_weights)
    if missing or extra:
        raise CorruptCheckpointError(
            f"{where}: config.json's digests do not match the compressed weights (no digest for "
            f"{sorted(missing)[:5]}, digests of unknown weights {sorted(extra)[:5]}); the checkpoint is corrupt. "
            "Re-download or re-write it.")


_SAFETENSORS_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def load_compressed_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, compressed weights expanded to exact dense tensors (checked)."""
    folder = Path(folder)
    config = compression_config(folder)
    compressed = bool(verify_compressed(folder, config=config or {})["compressed_weights"])
    digests, version = (config or {}).get("digests"), (config or {}).get("format_version", FORMAT_VERSION)
    state_dict: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for path in weight_files(folder):
        with open_weights(path) as f:
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
        dense = decompress_tensor(base, p)
        check_digest(base, dense, digests, version)  # once per weight, on the tensor we return
        state_dict[base] = dense
    return state_dict
