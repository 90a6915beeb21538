"""LoRA (PEFT) fine-tuning of a sparse model, merged back exactly sparse (SQFT / PERP style).

A LoRA adapter's update B·A is dense, so PEFT's own `merge_and_unload` fills the zeros of a pruned model.
Here the update is multiplied by the base layer's keep-mask before it is added:

    merged W = W + (B·A·scaling) ⊙ keep,   keep = (W != 0) as recorded before training

so the merged model has exactly the base model's zeros (the same zero set, bit for bit; pruned entries are
+0.0) and an N:M pattern stays valid. During training the base is frozen (PEFT freezes it), so it stays
sparse without any mask; only the merge needs the keep-masks.

    peft_model = prepare_sparse_lora(model, sparse_lora_config(model))   # records the keep-masks
    ... train peft_model with transformers.Trainer ...
    model = merge_sparse_lora(peft_model)                               # a plain, exactly sparse model

or all of it in one call: `model, trainer, output = train_sparse_lora(model, lora_config, training_args, ...)`.

The layout of every tensor here is the weight's own (Conv1D keeps (in, out)); PEFT's `get_delta_weight`
already returns the delta in that layout (its fan_in_fan_out handling), so masks and deltas line up.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .config import PILoTConfig
from .pruning import apply_keep_mask
from .wrapping import find_target_layers

# What a model card says about fine-tuning a sparse model (full, or LoRA): its title and description by `lora`,
# and the PILoT settings such a run does not use (in its run record, not in the card's table).
FINETUNE_UNUSED_SETTINGS = {
    "warm_start", "num_calibration_samples", "alpha_init", "alpha_schedule", "alpha_final", "alpha_min", "alpha_max",
    "delta", "alpha_update_interval", "l1_ratio_threshold", "loss_tolerance", "regularization", "mask_learning_rate",
    "recovery_steps", "gmp_interval", "gmp_start_step", "gmp_initial_sparsity", "beta", "init"}
FINETUNE_CARDS = {
    False: ("Sparse fine-tuning (every zero kept)",
            "Fine-tuned from an already sparse model: every weight of the sparsified layers that was zero stayed "
            "exactly zero (re-applied after each optimizer step, Adam's state included); nothing else was pruned."),
    True: ("Sparse LoRA fine-tuning, merged through the keep-mask (every zero kept)",
           "Fine-tuned from an already sparse model with LoRA adapters on its frozen weights, merged through the "
           "model's keep-mask, W + (B·A·scaling) ⊙ (W ≠ 0) (as in SQFT / PERP): the merged model has exactly "
           "the zeros of the model it started from.")}
KEEP_MASKS_ATTR = "pilot_keep_masks"  # a plain attribute of the PeftModel: never a parameter or buffer
DEFAULT_ADAPTER = "default"
ADAPTER_LEARNING_RATE = 1e-4  # adapters start at zero: the weights' scale says nothing about their step


def keep_masks_from_zeros(model: nn.Module, config: PILoTConfig | None = None) -> dict[str, torch.Tensor]:
    """{target layer name: keep-mask (weight != 0)} in each weight's own layout (Conv1D: (in, out))."""
    with torch.no_grad():
        return {name: layer.weight != 0 for name, layer in find_target_layers(model, config).items()}


def count_zeros(model: nn.Module, config: PILoTConfig | None = None) -> tuple[int, int]:
    """(zeros, numel) over the target layers' weights."""
    zeros = numel = 0
    with torch.no_grad():
        for layer in find_target_layers(model, config).values():
            zeros += int((layer.weight == 0).sum())
            numel += layer.weight.numel()
    return zeros, numel


def check_sparse(model: nn.Module, config: PILoTConfig | None = None, command: str = "pilot-hf oneshot") -> float:
    """The target layers' sparsity; ValueError if they hold no zero at all (a dense model)."""
    zeros, numel = count_zeros(model, config)
    if zeros == 0:
        raise ValueError(f"this model is dense: its {numel:,} target weights hold no zero, so there is no sparsity "
                         f"to keep. Prune it first, e.g. `{command} --model_name_or_path MODEL --method wanda "
                         "--sparsity 0.5 --output_dir pruned/`, then fine-tune the pruned folder.")
    return zeros / numel


def sparse_lora_config(model: nn.Module, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                       target_modules: list[str] | str | None = None, config: PILoTConfig | None = None, **kwargs):
    """A `peft.LoraConfig` for a causal LM. Default targets: the layers pilot-hf sparsifies (every linear
    layer of the decoder blocks, as `find_target_layers(model, config)` names them). GPT-2's Conv1D layers
    get fan_in_fan_out=True (PEFT's own flag for them)."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    if target_modules is None:
        target_modules = list(find_target_layers(model, config))
    if r < 1 or lora_alpha <= 0 or not 0 <= lora_dropout < 1:
        raise ValueError(f"LoRA needs r ≥ 1, lora_alpha > 0 and 0 ≤ lora_dropout < 1; got r={r}, "
                         f"lora_alpha={lora_alpha}, lora_dropout={lora_dropout}.")
    if "fan_in_fan_out" not in kwargs:
        kwargs["fan_in_fan_out"] = any(isinstance(m, Conv1D) for m in model.modules())
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM", **kwargs)


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name in the base model: LoRA layer} (names as the plain model has them, e.g. model.layers.0.mlp.up_proj)."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _base_model(peft_model: nn.Module) -> nn.Module:
    return peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model


def prepare_sparse_lora(model: nn.Module, lora_config, adapter_name: str = DEFAULT_ADAPTER):
    """`peft.get_peft_model(model, lora_config)`, with the keep-mask (weight != 0) of every LoRA-wrapped
    layer recorded before training as `peft_model.pilot_keep_masks` (a plain dict attribute, so it never
    goes into the adapter file). Refuses LoRA variants whose merge is not W + B·A·scaling (DoRA, ...)."""
    from peft import get_peft_model

    for flag in ("use_dora", "use_rslora_dora"):
        if getattr(lora_config, flag, False):
            raise ValueError(f"{flag}=True: DoRA rescales whole weight columns, which a keep-mask cannot make "
                             "exactly sparse here; use plain LoRA (use_dora=False).")
    peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    layers = _lora_layers(_base_model(peft_model))
    if not layers:
        raise ValueError("the LoRA config wraps no layer of this model; check lora_target_modules.")
    with torch.no_grad():
        keep = {name: layer.get_base_layer().weight != 0 for name, layer in layers.items()}
    object.__setattr__(peft_model, KEEP_MASKS_ATTR, keep)
    return peft_model


@torch.no_grad()
def merge_sparse_lora(peft_model: nn.Module, keep_masks: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Merge every active LoRA adapter into its base layer through the keep-mask, W += (B·A·scaling) ⊙ keep,
    then remove the adapters (`unload()`): the plain base model, with exactly the base's zeros.

    keep_masks: {layer name in the base model: bool tensor in the weight's layout}; default: the ones
    `prepare_sparse_lora` recorded, else the base weights' zeros now (the base is frozen, so the same).
    A layer with no entry keeps the zeros its base weight has now. Nothing is changed if a check fails."""
    base = _base_model(peft_model)
    layers = _lora_layers(base)
    if not layers:
        raise ValueError("this model has no LoRA layers to merge.")
    recorded = keep_masks if keep_masks is not None else getattr(peft_model, KEEP_MASKS_ATTR, None) or {}
    plan = []  # (base layer, keep, [(delta, bias delta)]) checked in full before any weight changes
    for name, layer in layers.items():
        if getattr(layer, "merged", False):
            raise ValueError(f"{name} already has a merged adapter (PEFT's merge ignores the zeros); call "
                             "unmerge_adapter() first, then merge_sparse_lora.")
        base_layer = layer.get_base_layer()
        weight = base_layer.weight
        keep = recorded.get(name)
        keep = (weight != 0) if keep is None else keep.to(weight.device, torch.bool)
        if tuple(keep.shape) != tuple(weight.shape):
            raise ValueError(f"keep_masks[{name!r}] has shape {tuple(keep.shape)}; the weight has "
                             f"{tuple(weight.shape)} (masks are in the weight's own layout).")
        updates = []
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                variant = type(layer.lora_variant[adapter]).__name__
                raise ValueError(f"{name}: adapter {adapter!r} is a LoRA variant ({variant}) whose merge is not "
                                 "W + B·A·scaling; merge_sparse_lora supports plain LoRA only.")
            delta = layer.get_delta_weight(adapter)
            if tuple(delta.shape) != tuple(weight.shape):
                raise ValueError(f"{name}: the LoRA delta has shape {tuple(delta.shape)}, the weight "
                                 f"{tuple(weight.shape)}; this layer type cannot be merged sparsely.")
            delta = delta.to(weight.dtype).masked_fill(~keep, 0.0)
            if not torch.isfinite(delta).all():
                raise ValueError(f"{name}: adapter {adapter!r} holds NaN or inf; nothing was merged.")
            bias = None
            if getattr(layer, "lora_bias", {}).get(adapter):
                if getattr(base_layer, "bias", None) is None:
                    raise ValueError(f"{name}: lora_bias=True but the base layer has no bias to merge into.")
                bias = (layer.lora_B[adapter].bias * layer.scaling[adapter]).to(base_layer.bias.dtype)
            updates.append((delta, bias))
        plan.append((base_layer, keep, updates))
    for base_layer, keep, updates in plan:
        for delta, bias in updates:
            base_layer.weight.data.add_(delta)
            if bias is not None:
                base_layer.bias.data.add_(bias)
        apply_keep_mask(base_layer.weight.data, keep)  # pruned entries exactly +0.0 (a base -0.0 too)
    if hasattr(peft_model, "unload"):
        model = peft_model.unload()
    else:  # a plain model with LoRA layers injected (inject_adapter_in_model): swap the base layers back
        for name, layer in layers.items():
            base.set_submodule(name, layer.get_base_layer())
        model = base
    if hasattr(peft_model, KEEP_MASKS_ATTR):
        object.__delattr__(peft_model, KEEP_MASKS_ATTR)
    return model


def train_sparse_lora(model: nn.Module, lora_config, args, *, teacher=None, resume_from_checkpoint: str | None = None,
                      adapter_dir: str | None = None, **trainer_kwargs):
    """Train LoRA adapters on the frozen sparse `model` with a `transformers.Trainer` (`args`: its
    TrainingArguments; `trainer_kwargs`: train_dataset, data_collator, ...), then merge them through the
    keep-mask. Returns (the merged, exactly sparse model, the trainer, train()'s output). The adapters' random
    init is seeded with `args.seed`, so a run (and its resume) is reproducible. `teacher`: a
    `distillation.Teacher` to distil from, with `args`' weights (PILoTTrainingArguments' distillation fields;
    a plain TrainingArguments gets the recipe: RECIPE_LOSS_WEIGHTS). `adapter_dir`: also save the trained adapter
    there (PeftModel.from_pretrained), before the merge."""
    from transformers import Trainer, set_seed

    set_seed(args.seed)
    if getattr(args, "learning_rate", None) is None:  # PILoTTrainingArguments' default scales weights, not adapters
        args = copy.copy(args)
        args.learning_rate = ADAPTER_LEARNING_RATE
    if teacher is not None:
        teacher.check_compatible(model, need_hidden=getattr(args, "distill_feature_weight", 1.0) > 0)
    peft_model = prepare_sparse_lora(model, lora_config)
    trainer_class = Trainer if teacher is None else _distilling_trainer_class()
    trainer = trainer_class(model=peft_model, args=args, **trainer_kwargs)
    if teacher is not None:
        trainer.teacher = teacher.to(trainer.args.device)
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    if teacher is not None:
        trainer.teacher = None  # its memory is free again
    if adapter_dir is not None and trainer.is_world_process_zero():
        peft_model.save_pretrained(adapter_dir)
    return merge_sparse_lora(peft_model), trainer, output


def _distilling_trainer_class():
    from transformers import Trainer

    from .distillation import RECIPE_LOSS_WEIGHTS, distillation_loss

    class DistillingTrainer(Trainer):
        """A plain Trainer whose training loss is lm_loss_weight · LM + the distillation terms (METHOD.md
        section 10): PILoTTrainer's loss without its fused LM pass (the model computes its own LM loss)."""

        teacher = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.teacher is None or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            a = self.args
            lm_weight, logit_weight, feature_weight = (getattr(a, name, default)
                                                       for name, default in RECIPE_LOSS_WEIGHTS.items())
            student_inputs = {**inputs, "output_hidden_states": True} if feature_weight > 0 else inputs
            if lm_weight > 0:
                lm, outputs = super().compute_loss(model, student_inputs, True, num_items_in_batch)
            else:  # without labels the model computes no LM loss
                outputs = model(**{k: v for k, v in student_inputs.items() if k != "labels"})
            mask = inputs.get("attention_mask")
            teacher_logits, teacher_hidden = self.teacher(inputs["input_ids"], mask, feature_weight > 0)
            terms = distillation_loss(outputs, teacher_logits, teacher_hidden, inputs.get("labels"),
                                      logit_weight=logit_weight, feature_weight=feature_weight,
                                      temperature=getattr(a, "distill_temperature", 1.0),
                                      token_mask=None if mask is None else mask.bool())
            # An LM loss normalized over the accumulated batch is not divided by Trainer; the distillation terms
            # (means over this micro-batch) then take their share here, as in PILoTTrainer.
            share = self.current_gradient_accumulation_steps if (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None) else 1
            loss = terms["loss"] / share + (lm_weight * lm if lm_weight > 0 else 0)
            return (loss, outputs) if return_outputs else loss

    return DistillingTrainer

