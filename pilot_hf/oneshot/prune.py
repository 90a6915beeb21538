"""`oneshot_prune`: prune a plain causal LM without training, by magnitude, Wanda or SparseGPT."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import PILoTConfig
from ..data import FILE_BUILDERS
from ..pruning import SparsityPattern, apply_keep_mask
from ..wrapping import find_target_layers, is_wrapped, magnitude_prune, out_in_layout, sparsity_report
from .calibration import sequential_blocks
from .magnitude import MagnitudeConfig
from .owl import OWLConfig, owl_block_sparsities
from .sparsegpt import SparseGPTConfig
from .wanda import WandaConfig

logger = logging.getLogger(__name__)

METHODS = {cls.name: cls for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig)}
MethodConfig = MagnitudeConfig | WandaConfig | SparseGPTConfig


@dataclass
class OneShotReport:
    """What `oneshot_prune` did. `masks` (name -> bool keep-mask in the layer's weight layout) freeze the
    pattern for recovery fine-tuning; `to_dict()` is the JSON-serializable rest."""

    method: str
    method_config: dict
    sparsity: float
    pattern: str
    num_samples: int
    seqlen: int
    prune_time_s: float
    layers: dict[str, dict]
    total: dict
    block_sparsity: dict[int, float] | None = None
    block_outlier_ratio: dict[int, float] | None = None
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["masks"]
        return out


@dataclass
class OneShotArguments:
    """One-shot pruning (no training) and its calibration data."""

    method: str = field(default="sparsegpt", metadata={"help": "magnitude, wanda or sparsegpt."})
    sparsity: float | None = field(default=None, metadata={
        "help": "Fraction of target weights removed; default 0.5, and N:M patterns fix it to (M-N)/M."})
    sparsity_pattern: str = field(default="unstructured", metadata={
        "help": "unstructured, row, N:M (e.g. 2:4), or global (magnitude only)."})
    calibration_dataset: str = field(default="builtin:kjv", metadata={
        "help": "Calibration text for wanda/sparsegpt: a dataset_name (e.g. 'builtin:kjv', its training part) or "
                "a local text/json/csv/parquet file."})
    num_calibration_samples: int = field(default=32, metadata={"help": "Calibration blocks."})
    calibration_seqlen: int = field(default=256, metadata={"help": "Tokens per calibration block."})
    seed: int = field(default=0, metadata={"help": "Seed for choosing calibration blocks."})

    def __post_init__(self):
        resolve_method(self.method)
        pattern = SparsityPattern.parse(self.sparsity_pattern)
        self.sparsity_pattern = str(pattern)
        self.sparsity = pattern.resolve_sparsity(self.sparsity)
        pattern.check_method(resolve_method(self.method).name, self.method)
        if self.num_calibration_samples < 1 or self.calibration_seqlen < 2:
            raise ValueError(f"num_calibration_samples={self.num_calibration_samples} must be ≥ 1 and "
                             f"calibration_seqlen={self.calibration_seqlen} ≥ 2.")

    @property
    def calibrates(self) -> bool:
        return resolve_method(self.method).needs_calibration

    def calibration_data(self):
        """The DataArguments of the calibration text (a file path or a dataset_name)."""
        from ..data import DataArguments

        source = self.calibration_dataset
        as_file = os.path.isfile(source) or os.path.splitext(source)[1].lower() in FILE_BUILDERS
        return DataArguments(**({"train_file": source} if as_file else {"dataset_name": source}),
                             validation_split_percentage=0)

    def check_sources(self) -> None:
        if self.calibrates:
            self.calibration_data().check_sources()

    def run_settings(self) -> dict:
        """This run's settings record (what the card, run_config.json and the sweep store)."""
        settings = {"method": self.method, "sparsity": self.sparsity, "sparsity_pattern": self.sparsity_pattern}
        if self.calibrates:
            settings.update(calibration_dataset=self.calibration_dataset, seed=self.seed,
                            num_calibration_samples=self.num_calibration_samples,
                            calibration_seqlen=self.calibration_seqlen)
        return {**settings, **asdict(resolve_method(self.method))}


def resolve_method(method: str | MethodConfig) -> MethodConfig:
    if isinstance(method, tuple(METHODS.values())):
        return method
    if isinstance(method, str) and method.lower() in METHODS:
        return METHODS[method.lower()]()
    raise ValueError(f"method={method!r} is not known; use one of {sorted(METHODS)} or a config object "
                     f"({', '.join(c.__name__ for c in METHODS.values())}).")


@torch.no_grad()
def oneshot_prune(model: nn.Module, calibration_ids: torch.Tensor | None = None,
                  method: str | MethodConfig = "sparsegpt", sparsity: float | None = None,
                  pattern: str | SparsityPattern = "unstructured", config: PILoTConfig | None = None, *,
                  batch_size: int = 8, owl: OWLConfig | None = None) -> OneShotReport:
    """Prune the target layers of a plain (unwrapped) causal LM in place, without training.

    Args:
        model: a Transformers causal LM (any architecture with an nn.ModuleList of decoder blocks).
        calibration_ids: token ids (num_samples, seqlen) for Wanda / SparseGPT / OWL; unused by magnitude.
        method: 'sparsegpt', 'wanda', 'magnitude', or a `SparseGPTConfig` / `WandaConfig` / `MagnitudeConfig`.
        sparsity: fraction of each target layer's weights set to 0; default 0.5 (N:M patterns imply it).
        pattern: 'unstructured' (exact count per layer), 'row' (exact count per output row), 'N:M'
            (keep N of every M consecutive inputs); 'global' for magnitude only.
        config: which layers (`PILoTConfig.target_modules` etc.); default every linear layer of the blocks.
        batch_size: calibration samples per forward pass (memory vs speed).
        owl: non-uniform block sparsities (OWL) around `sparsity`; off by default.

    Blocks are pruned in sequence with inputs propagated through the already pruned blocks
    (`pilot_hf.oneshot.calibration`). Pruned weights are exactly 0; SparseGPT also updates the kept ones.
    """
    method = resolve_method(method)
    pattern = SparsityPattern.parse(pattern)
    sparsity = pattern.resolve_sparsity(sparsity)
    if is_wrapped(model):
        raise ValueError("this model is wrapped (MaskedLinear layers); one-shot methods prune plain models. Use "
                         "prune_model(model, ...) for a wrapped model, or merge_and_unload(model) first.")
    pattern.check_method(method.name)
    if owl is not None and pattern.kind not in ("unstructured", "row"):
        raise ValueError(f"OWL varies the sparsity per block; pattern {pattern} fixes it. Use 'unstructured' or 'row'.")
    if hasattr(method, "check_pattern"):
        method.check_pattern(pattern)
    needs_calibration = method.needs_calibration or owl is not None
    if needs_calibration and calibration_ids is None:
        raise ValueError(f"{method.name}{' with OWL' if owl else ''} needs calibration_ids, token ids of shape "
                         "(num_samples, seqlen), e.g. 32-128 samples of 256-2048 tokens of text like the target use.")
    targets = find_target_layers(model, config)
    for name, layer in targets.items():
        pattern.check_shape(name, tuple(out_in_layout(layer.weight, layer).shape))

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    block_sparsity = ratios = None
    try:
        if owl is not None:
            block_sparsity, ratios = owl_block_sparsities(model, targets, calibration_ids, sparsity, owl, batch_size)
            logger.info("OWL block sparsities: %s", {i: round(s, 4) for i, s in block_sparsity.items()})
        if method.name == "magnitude" and owl is None:
            masks = magnitude_prune(model, sparsity, pattern, config)
        elif not method.needs_calibration:
            masks = _prune_without_calibration(method, model, targets, sparsity, pattern, block_sparsity)
        else:
            masks = _prune_blockwise(method, model, targets, calibration_ids, sparsity, pattern, block_sparsity,
                                     batch_size)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start

    report = sparsity_report(model, config)
    num_samples, seqlen = tuple(calibration_ids.shape) if needs_calibration else (0, 0)
    return OneShotReport(method=method.name, method_config=asdict(method), sparsity=sparsity, pattern=str(pattern),
                         num_samples=num_samples, seqlen=seqlen, prune_time_s=elapsed, layers=report["layers"],
                         total=report["total"], block_sparsity=block_sparsity, block_outlier_ratio=ratios,
                         masks=masks)


def _apply(method, layer: nn.Module, stat, sparsity: float, pattern: SparsityPattern) -> torch.Tensor:
    weight = out_in_layout(layer.weight, layer)
    new_weight, keep = method.prune_weight(weight, stat, sparsity, pattern)  # SparseGPT also updates kept weights
    keep = out_in_layout(keep, layer)
    layer.weight.copy_(out_in_layout(new_weight, layer))
    apply_keep_mask(layer.weight, keep)
    return keep


def _prune_without_calibration(method, model, targets, sparsity, pattern, block_sparsity):
    from .calibration import blocks_of_layers

    _, per_block = blocks_of_layers(model, targets)
    masks = {}
    for index, layers in enumerate(per_block):
        for name, layer in layers.items():
            masks[name] = _apply(method, layer, None, block_sparsity.get(index, sparsity), pattern)
    return masks


def _prune_blockwise(method, model, targets, calibration_ids, sparsity, pattern, block_sparsity, batch_size):
    masks = {}
    for index, layers, collect in sequential_blocks(model, targets, calibration_ids, batch_size):
        block_start = time.perf_counter()
        stats = collect(method.new_statistic)
        layer_sparsity = block_sparsity.get(index, sparsity) if block_sparsity else sparsity
        for name, layer in layers.items():
            masks[name] = _apply(method, layer, stats[name], layer_sparsity, pattern)
        del stats
        logger.info("%s: block %d pruned (%d layers, sparsity %.4f) in %.1f s", method.name, index, len(layers),
                    layer_sparsity, time.perf_counter() - block_start)
    return masks
