"""The pilot_sparse format as a Transformers quantization method, so that
`AutoModelForCausalLM.from_pretrained(path)` reads compressed checkpoints once `pilot_hf` is imported
(see sparse_format.py for the format).

This is the only pilot-hf module that imports private Transformers APIs (`core_model_loading`, `quantizers`,
`utils.quantization_config`). `serialization.register_with_transformers`, which `import pilot_hf` calls, imports
it inside a guard: if a Transformers release renames them, only this route is lost (with a warning); training,
saving and `load_compressed` do not depend on it. It imports the format from `sparse_format`, never from
`serialization` (no circle).
"""

from __future__ import annotations

import logging
from typing import ClassVar

from transformers.core_model_loading import ConversionOps
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .sparse_format import (
    BIT_ORDER,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOADER_GUARD,
    PART_SUFFIXES,
    TRANSFORMERS_WEIGHTS,
    CorruptCheckpointError,
    check_digest,
    decompress_tensor,
    parse_compression_config,
    verify_compressed,
)

logger = logging.getLogger(__name__)


class PilotSparseConfig(QuantizationConfigMixin):
    """The `quantization_config` of a compressed checkpoint. Loading always expands to dense weights
    (`dequantize` is always True): the loaded model is a plain Transformers model."""

    def __init__(self, format_version: int = FORMAT_VERSION, bit_order: str = BIT_ORDER,
                 compressed_weights: list[str] | None = None, dequantize: bool = True,
                 digests: dict[str, str] | None = None, **kwargs):
        checked = parse_compression_config({
            "quant_method": kwargs.pop("quant_method", FORMAT_NAME), "format_version": format_version,
            "bit_order": bit_order, "compressed_weights": compressed_weights, "dequantize": dequantize,
            "digests": digests})
        self.quant_method = FORMAT_NAME
        self.format_version = checked["format_version"]
        self.bit_order = checked["bit_order"]
        self.compressed_weights = checked["compressed_weights"]
        self.dequantize = True
        self.digests = checked["digests"]  # None for format version 1


class _DigestLog:
    """What the digest checks of one `from_pretrained` found. Transformers deep-copies the load op (and the
    quantizer it holds) once per weight, so the copies must share this log rather than each keep its own."""

    def __init__(self):
        self.errors: list[CorruptCheckpointError] = []
        self.checked: set[str] = set()

    def __deepcopy__(self, memo):
        return self


class PilotSparseDecompress(ConversionOps):
    """Load operation: the collected parts of one weight -> the exact dense weight (digest checked), in the
    param's dtype."""

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
        name = full_layer_name or "weight"
        dense = decompress_tensor(name, parts)
        self.hf_quantizer.check_digest(name, dense)  # on the stored dtype, before any cast
        if model is not None and full_layer_name is not None:
            try:
                dense = dense.to(model.get_parameter(full_layer_name).dtype)
            except AttributeError:
                pass
        return {"weight": dense}


class PilotSparseHfQuantizer(HfQuantizer):
    """Reads pilot_sparse checkpoints: checks the files before loading, then expands each compressed
    weight with `PilotSparseDecompress` as Transformers streams the checkpoint in, comparing its digest.
    Nothing is quantized: the model keeps its ordinary modules and ends up without a quantization_config."""

    requires_calibration = False
    serialized_names: ClassVar[dict[str, list[str]]] = {"weight": ["weight" + s for s in PART_SUFFIXES]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized:
            raise ValueError("PilotSparseConfig describes a saved checkpoint and cannot compress a model on load; "
                             "load the dense model and call pilot_hf.serialization.save_compressed(model, dir).")
        self._digest_log = _DigestLog()  # a quantizer serves one from_pretrained call

    def update_attn_implementation(self, config):
        # Called with the model config after this quantizer was chosen and before the weight files are looked up:
        # the guard that stops Transformers without pilot_hf (sparse_format.LOADER_GUARD) is no file to load.
        if getattr(config, TRANSFORMERS_WEIGHTS, None) == LOADER_GUARD:
            delattr(config, TRANSFORMERS_WEIGHTS)
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if checkpoint_files:  # the shapes too: Transformers would stop at a swapped shape with a generic error
            verify_compressed(None, checkpoint_files, self.quantization_config.to_dict(),
                              shapes={n: tuple(p.shape) for n, p in model.named_parameters()})
        return model

    def check_digest(self, name, dense):
        # Transformers turns any exception raised in a conversion op into a generic RuntimeError after
        # loading (the tensor name only in a logged report), so record the mismatch and raise it ourselves,
        # as a CorruptCheckpointError, once the weights are in (_process_model_after_weight_loading).
        try:
            check_digest(name, dense, self.quantization_config.digests, self.quantization_config.format_version)
        except CorruptCheckpointError as err:
            self._digest_log.errors.append(err)
        self._digest_log.checked.add(name)

    def _process_model_after_weight_loading(self, model, **kwargs):
        log = self._digest_log
        if log.errors:
            more = len(log.errors) - 1
            raise CorruptCheckpointError(f"{log.errors[0]}" + (f" ({more} more weights fail their digests too.)"
                                                               if more else ""))
        unchecked = set(self.quantization_config.digests or ()) - log.checked
        if unchecked:  # e.g. weights this process does not load (pipeline stages); never seen in our tests
            logger.warning("%d compressed weights were not checked against their digests: %s", len(unchecked),
                           sorted(unchecked)[:5])
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
    """Register pilot_sparse with Transformers' quantizer registry (idempotent); True once registered.
    Raises ImportError / AttributeError if this Transformers lacks the API (serialization.py catches them
    and warns: then only `load_compressed` reads these checkpoints)."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    for hook in ("get_load_operations", "update_attn_implementation"):  # the load ops; the guard's removal
        if not hasattr(HfQuantizer, hook):
            raise AttributeError(f"HfQuantizer has no {hook} (the quantizer API pilot_sparse loads through)")
    if FORMAT_NAME not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(FORMAT_NAME)(PilotSparseConfig)
    if FORMAT_NAME not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(FORMAT_NAME)(PilotSparseHfQuantizer)
    return True
