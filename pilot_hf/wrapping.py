"""Find target layers, swap masked layers in, and prune + merge back out to a plain Transformers model."""

from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ALL_LINEAR, PILoTConfig
from .layers import MaskedLinear
from .pruning import SparsityPattern, apply_keep_mask, full_tensor, is_sharded, keep_masks, shard_like

LINEAR_TYPES = (nn.Linear, Conv1D)
_IN_BLOCK = re.compile(r"\.\d+\.")  # decoder blocks live in numbered module lists: layers.3., h.0.


def masked_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, MaskedLinear)}


def is_wrapped(model: nn.Module) -> bool:
    return any(isinstance(module, MaskedLinear) for module in model.modules())


def find_target_layers(model: nn.Module, config: PILoTConfig | None = None) -> dict[str, nn.Module]:
    """The linear layers `config` selects, in module order. Raises ValueError if the selection is empty
    or names a module that does not exist."""
    config = config or PILoTConfig()
    linears = {name: m for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or Conv1D layer to sparsify.")
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = {}
    for name, module in linears.items():
        if config.target_modules == ALL_LINEAR:
            selected = _IN_BLOCK.search(f".{name}.") is not None and module is not output
            if selected and config.exclude_modules is not None:
                selected = not _excluded(config, name)
            if selected and config.layers_to_transform is not None:
                selected = bool(check_target_module_exists(_as_suffix_config(config, name), name))
        else:
            selected = bool(check_target_module_exists(config, name))
        if selected:
            targets[name] = module
    if isinstance(config.target_modules, list):
        missing = [t for t in config.target_modules
                   if not any(n == t or n.endswith("." + t) for n in linears)]
        if missing:
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(f"target_modules {missing} match no linear layer of {type(model).__name__}; "
                             f"its linear layers are named {suffixes}.")
    if not targets:
        raise ValueError(f"target_modules={config.target_modules!r} selects no linear layer of "
                         f"{type(model).__name__}; pass names among "
                         f"{sorted({n.rsplit('.', 1)[-1] for n in linears})} or a regex over full names.")
    return targets


def _excluded(config: PILoTConfig, name: str) -> bool:
    ex = config.exclude_modules
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return any(name == e or name.endswith("." + e) for e in ex)


def _as_suffix_config(config: PILoTConfig, name: str) -> PILoTConfig:
    # Let PEFT's matcher apply layers_to_transform / layers_pattern to an 'all-linear' selection.
    cfg = PILoTConfig(target_modules=[name.rsplit(".", 1)[-1]], layers_to_transform=config.layers_to_transform,
                      layers_pattern=config.layers_pattern)
    return cfg


def _shared_weight_owners(model: nn.Module) -> dict[int, list[str]]:
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is not None:
            owners.setdefault(id(weight), []).append(name)
    return owners


def _check_targets(model: nn.Module, targets: dict[str, nn.Module], action: str) -> None:
    """Refuse targets without a real weight, or whose weight is shared (tied) with another module."""
    owners = _shared_weight_owners(model)
    for name, module in targets.items():
        if module.weight is None or module.weight.is_meta:
            raise ValueError(f"{name} has no materialized weight (meta device or offloaded); load the model "
                             f"with its weights on CPU/GPU (no disk/CPU offload) before {action}.")
        sharing = [n for n in owners[id(module.weight)] if n != name]
        if sharing:
            raise ValueError(f"{name} shares its weight with {sharing} (tied weights); {action} it would change "
                             "those too. Exclude it from target_modules, or untie the weights first.")


def wrap_model(model: nn.Module, config: PILoTConfig | None = None) -> nn.Module:
    """Replace every target linear layer by a `MaskedLinear` with the PILoT initialization, in place.

    The wrapped model computes the same function (m0 ⊙ w0 = W up to fp32 rounding). Nothing is changed
    if any check fails.
    """
    config = config or PILoTConfig()
    if is_wrapped(model):
        raise ValueError("this model is already wrapped (it has MaskedLinear layers); wrap it once, or call "
                         "merge_and_unload(model) first to get the plain model back.")
    targets = find_target_layers(model, config)
    _check_targets(model, targets, "wrapping")
    for name, module in targets.items():
        masked = MaskedLinear(module, config.beta, config.torch_mask_dtype)
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:  # models loaded with device_map: keep Accelerate's device placement
            from accelerate.hooks import add_hook_to_module
            add_hook_to_module(masked, hook)
        model.set_submodule(name, masked)
    model.pilot_config = config
    return model


def _require_wrapped(model: nn.Module) -> dict[str, MaskedLinear]:
    layers = masked_layers(model)
    if not layers:
        raise ValueError("this model has no masked layers; call wrap_model(model) first, or use "
                         "magnitude_prune(model, ...) to prune a plain (dense) model.")
    return layers


def _layout(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """View a weight-shaped tensor in (out_features, in_features) layout."""
    return t.t() if transposed else t


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float | None = None,
                pattern: str | SparsityPattern = "unstructured") -> dict[str, torch.Tensor]:
    """Zero the smallest |mask ⊙ weight| of every masked layer to exactly the target sparsity.

    `sparsity` defaults as `SparsityPattern.resolve_sparsity` says (0.5, or (M − N)/M for N:M).
    Both mask and weight are zeroed at pruned entries. Returns the keep-masks (in each layer's
    weight layout), which recovery fine-tuning uses to keep the pattern frozen.
    """
    layers = _require_wrapped(model)
    return _prune(layers, None, sparsity, pattern)


def _prune(layers: dict[str, nn.Module], scores: dict[str, torch.Tensor] | None, sparsity: float | None,
           pattern: str | SparsityPattern) -> dict[str, torch.Tensor]:
    """Keep-masks from `scores` (default |effective weight|, (out, in) layout), applied in place.
    Every check runs before the first layer is touched.

    Sharded layers (FSDP2; every process must call this together): each layer's effective weight is gathered
    in turn, so every process computes the same keep-mask as one process would, and keeps only its shard of
    it (returned sharded like the weight). Per-layer patterns hold one full layer at a time; 'global' holds
    every layer's full scores (on CPU)."""
    pattern = SparsityPattern.parse(pattern)
    transposed = {n: is_transposed(m) for n, m in layers.items()}
    sharded = any(is_sharded(m.weight) for m in layers.values())

    def weight_score(name: str, layer: nn.Module) -> torch.Tensor:  # |mask ⊙ weight|, (out, in), gathered
        return _layout(full_tensor(effective_weight(layer)).abs(), transposed[name])

    if scores is not None:
        _check_scores(scores, layers, transposed)
        keep = keep_masks({n: scores[n] for n in layers}, sparsity, pattern)  # module order: 'global' ties
    elif not sharded:
        keep = keep_masks({n: weight_score(n, m) for n, m in layers.items()}, sparsity, pattern)
    elif pattern.kind == "global":  # every layer's full scores at once: on CPU
        keep = keep_masks({n: weight_score(n, m).cpu() for n, m in layers.items()}, sparsity, pattern)
    else:  # one gathered layer alive at a time; its keep-mask kept as a shard
        keep = {n: shard_like(_layout(keep_masks({n: weight_score(n, m)}, sparsity, pattern)[n], transposed[n]),
                              m.weight) for n, m in layers.items()}
    result = {}
    for name, layer in layers.items():
        mask = keep[name] if is_sharded(keep[name]) else _layout(keep[name], transposed[name])
        result[name] = shard_like(mask.to(layer.weight.device), layer.weight)
        for tensor in pruned_tensors(layer):
            apply_keep_mask(tensor, result[name])
    return result


def pruned_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """The tensors a keep-mask zeroes in `layer`: mask and weight of a MaskedLinear, else the weight."""
    return [layer.mask, layer.weight] if isinstance(layer, MaskedLinear) else [layer.weight]


def is_transposed(layer: nn.Module) -> bool:
    """Whether the layer stores its weight as (in, out), like GPT-2's Conv1D (wrapped or not)."""
    return layer.transposed if isinstance(layer, MaskedLinear) else isinstance(layer, Conv1D)


def out_in_layout(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """(out, in) view of a tensor shaped like `layer`'s weight."""
    return _layout(t, is_transposed(layer))


def effective_weight(layer: nn.Module) -> torch.Tensor:
    return layer.merged_weight() if isinstance(layer, MaskedLinear) else layer.weight


def _check_scores(scores: dict[str, torch.Tensor], layers: dict[str, nn.Module], transposed: dict[str, bool]) -> None:
    missing, extra = sorted(set(layers) - set(scores)), sorted(set(scores) - set(layers))
    if missing or extra:
        raise ValueError(f"scores must have exactly one entry per target layer; missing {missing}, "
                         f"not a target {extra}.")
    for name, layer in layers.items():
        shape = tuple(_layout(effective_weight(layer), transposed[name]).shape)
        if tuple(scores[name].shape) != shape:
            raise ValueError(f"scores[{name!r}] has shape {tuple(scores[name].shape)}; it must be {shape} "
                             "(out_features, in_features), also for Conv1D layers.")


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float | None = None, pattern: str | SparsityPattern = "unstructured",
                    config: PILoTConfig | None = None, scores: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Prune a plain model's target layers by |W| (the simplest baseline), or by given `scores`
    (name -> tensor in (out, in) layout, e.g. Wanda's). On a wrapped model the masked layers are the
    targets (`config` is not used) and the default score is |m ⊙ w|."""
    if is_wrapped(model):
        return _prune(masked_layers(model), scores, sparsity, pattern)
    targets = find_target_layers(model, config)
    _check_targets(model, targets, "pruning")
    return _prune(targets, scores, sparsity, pattern)


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge mask ⊙ weight into plain layers and remove every wrapper: a standard PreTrainedModel again."""
    layers = _require_wrapped(model)
    for name, layer in layers.items():
        model.set_submodule(name, layer.unwrap())
    if hasattr(model, "pilot_config"):
        del model.pilot_config
    return model


@torch.no_grad()
def weight_rms(model: nn.Module, config: PILoTConfig | None = None) -> float:
    """Root mean square of all target layers' weights together (mask ⊙ weight where wrapped)."""
    layers = masked_layers(model) or find_target_layers(model, config)
    total, count = 0.0, 0
    for layer in layers.values():
        weight = effective_weight(layer)
        total += float(weight.float().pow(2).sum())
        count += weight.numel()
    return (total / count) ** 0.5


@torch.no_grad()
def sparsity_report(model: nn.Module, config: PILoTConfig | None = None) -> dict:
    """Zeros per target layer and in total (JSON-serializable). Wrapped layers count zeros of mask ⊙ weight."""
    layers = masked_layers(model) or find_target_layers(model, config)
    report, zeros_total, numel_total = {}, 0, 0
    for name, layer in layers.items():
        W = layer.merged_weight() if isinstance(layer, MaskedLinear) else layer.weight
        zeros, numel = int((W == 0).sum()), W.numel()
        report[name] = {"shape": list(W.shape), "numel": numel, "zeros": zeros, "sparsity": zeros / numel}
        zeros_total += zeros
        numel_total += numel
    return {"layers": report,
            "total": {"numel": numel_total, "zeros": zeros_total, "sparsity": zeros_total / numel_total}}
