"""PILoTTrainer: a thin transformers.Trainer that trains mask ⊙ weight with a time-varying regularization.

What it adds to Trainer, and where (docs/METHOD.md, sections 2-6 and 10):
- `__init__`: takes a frozen teacher copy if distilling, applies a one-shot warm start if asked, then swaps
  target layers for `MaskedLinear` (pilot/spred) before Trainer sees the model;
- `compute_loss`: LM loss plus the distillation terms (logit KL, SquareHead), each logged;
- the sparsity schedule (`pilot_hf.schedule.SparsitySchedule`: the target layers, α_t, GMP, prune-and-freeze,
  recovery, HAM, diagnostics) is driven from a callback and two optimizer hooks;
- optimizer: `create_optimizer` gives masks their own learning rate, takes masks and target weights out of
  `weight_decay`, and registers the schedule's hooks: before each step the regularization, after it the
  frozen pruning pattern and HAM;
- `log` adds alpha, balance, l1_ratio, prune_damage and sparsity to the Trainer's own logs;
- checkpoints carry `pilot_state.json` (controller state + the run settings record), checked and restored on
  resume;
- `train` ends by pruning (unless recovery already did), and merging: `self.model` is then a plain model.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from .card import CardInfo, card_info_for_run, write_model_card
from .config import PILoTConfig
from .data import (
    calibration_blocks,
    check_mixable,
    check_same_data,
    data_fingerprint,
    mix_teacher_samples,
    teacher_sample_split,
)
from .distillation import Teacher, distillation_loss, lm_loss_value
from .loading import check_same_vocabulary
from .oneshot import OneShotReport, oneshot_prune
from .optim import TensorwiseAdamW
from .pruning import SparsityPattern, full_tensor
from .runs import CHECKPOINT_FILES, PILOT_STATE_NAME, latest_checkpoint  # noqa: F401 (CHECKPOINT_FILES: kept importable from here)
from .schedule import SparsitySchedule
from .training_args import PILoTTrainingArguments
from .wrapping import (
    effective_weight,
    find_target_layers,
    is_wrapped,
    masked_layers,
    merge_and_unload,
    out_in_layout,
    sparsity_report,
    wrap_model,
)

logger = logging.getLogger(__name__)

# Prefixes that DDP, FSDP and activation checkpointing add to parameter names.
_WRAPPER_PREFIX = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def _clean_name(name: str) -> str:
    while True:
        cleaned = _WRAPPER_PREFIX.sub(r"\1", name)
        if cleaned == name:
            return name
        name = cleaned


class PILoTTrainer(Trainer):
    """Trainer for PILoT compression. Use it like `transformers.Trainer`, with `PILoTTrainingArguments`.

    After `train()`, `self.model` is a plain sparse Transformers model that `save_model()` writes and
    `AutoModelForCausalLM.from_pretrained` loads without pilot_hf. `self.sparsity_report` tells the result.
    """

    def __init__(self, model: nn.Module | None = None, args: PILoTTrainingArguments | None = None, **kwargs):
        if model is None:
            raise ValueError("PILoTTrainer needs a model instance (model_init is not supported).")
        if args is None:
            args = PILoTTrainingArguments(output_dir="pilot-output")
        elif not isinstance(args, PILoTTrainingArguments):
            if not isinstance(args, TrainingArguments):
                raise TypeError(f"PILoTTrainer takes (PILoT)TrainingArguments, got {type(args).__name__}.")
            args = PILoTTrainingArguments.from_training_args(args)  # PILoT fields at their defaults
        _refuse_peft(model)
        # A model the user wrapped keeps its own targets and β; otherwise the arguments say what to wrap.
        user_config = getattr(model, "pilot_config", None) if is_wrapped(model) else None
        if user_config is not None:
            args = args.for_wrapping(user_config)  # the run settings record the targets and β that ran
        self.pilot_config = user_config or args.pilot_config()
        args = args.for_model(model, self.pilot_config)  # learning_rate from the weights' scale unless given
        self.check_pattern(model, args, self.pilot_config)
        _check_fsdp_loading()
        if args.distills and args.teacher_model_name_or_path:  # equal vocabulary sizes are not the same vocabulary
            check_same_vocabulary(kwargs.get("processing_class"), args.teacher_model_name_or_path)
        self.teacher = _teacher(model, args) if args.distills else None  # the model as given: before warm start
        if args.warm_start:
            if is_wrapped(model):
                raise ValueError(f"warm_start={args.warm_start!r} prunes the plain model before wrapping it, but "
                                 "this model is already wrapped; pass the unwrapped model.")
            self.warm_start_report = _warm_start(model, args, self.pilot_config, kwargs.get("train_dataset"))
        if args.reparameterized and not is_wrapped(model):
            wrap_model(model, self.pilot_config)
        elif not args.reparameterized and is_wrapped(model):
            raise ValueError(f"method={args.method!r} trains the plain weights, but this model is wrapped; pass the "
                             "unwrapped model or use method='pilot'/'spred'.")
        super().__init__(model=model, args=args, **kwargs)
        if self.is_fsdp_enabled and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError("PILoTTrainer under FSDP needs FSDP2 (fsdp_version: 2 in the Accelerate config, as in "
                             "configs/accelerate/fsdp.yaml): FSDP1 flattens a unit's parameters into one buffer, so a "
                             "layer's mask and weight are no whole tensors that pruning, keep-masks and merging "
                             "could address; FSDP2 shards each parameter on its own.")
        frozen_pattern = [f for f, on in (("recovery_steps", args.recovery_steps), ("method='gmp'", args.method == "gmp"),
                                          ("keep_zeros", args.keep_zeros)) if on]
        if self.is_deepspeed_enabled and frozen_pattern:
            raise ValueError(f"{', '.join(frozen_pattern)} under DeepSpeed: ZeRO steps its own fp32 copies of the "
                             "parameters and writes them back after every step, so pruned entries come back (seen in "
                             "a ZeRO-2 run on CPU: docs/DESIGN.md, 'Verified where'). Use FSDP2 or DDP for a frozen "
                             "pattern, or recovery_steps=0 with method='pilot' (pruning at the end works).")
        if self.is_deepspeed_enabled and args.ham:
            raise ValueError("ham under DeepSpeed: ZeRO steps its own flat fp32 copies of the parameters and writes "
                             "them over ours, so a step after the optimizer's would be lost (and its gradients are "
                             "partitioned flat buffers, not per-matrix). Use FSDP2 or DDP with ham, or ham=False "
                             "(--ham false; it is on by default when a run prunes).")
        if self.teacher is not None:
            if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise ValueError("distillation under ZeRO-3 was never run (its teacher would be a full, unsharded "
                                 "copy outside the DeepSpeed engine); it is not supported there. Use FSDP2, DDP or "
                                 "ZeRO-2 (a full teacher per process; teacher_dtype='bfloat16' halves it), or train "
                                 "without distillation.")
            self.teacher.to(self.args.device)  # unsharded, one per process (also under FSDP2: docs/DESIGN.md)
            if self.args.teacher_sample_share > 0 and self.train_dataset is not None:  # after the warm start's calibration
                self.train_dataset = _with_teacher_samples(self.train_dataset, self.teacher, self.args,
                                                           kwargs.get("processing_class"))
        self.schedule = SparsitySchedule(model, self.args, self.pilot_config, self.accelerator)
        self.sparsity_report: dict | None = None
        self.gathered = False  # FSDP2: finish() replaced the sharded model by a plain one on every process
        self._term_sums: dict[str, float] = {}  # distillation and LM loss terms since the last log
        self._term_count = 0
        self.add_callback(_PILoTCallback(self))

    # ----- targets and parameters -----------------------------------------------------------------

    @staticmethod
    def check_pattern(model: nn.Module, args: PILoTTrainingArguments, config: PILoTConfig | None = None) -> None:
        """Fail before any step if the pattern does not fit the target shapes (e.g. N:M vs in_features)."""
        if not args.prunes:
            return
        pattern = SparsityPattern.parse(args.sparsity_pattern)
        layers = masked_layers(model) or find_target_layers(model, config or args.pilot_config())
        for name, layer in layers.items():
            pattern.check_shape(name, tuple(out_in_layout(effective_weight(layer), layer).shape))

    # The schedule's state, read through (the run's commands, sweeps and tests look at these).
    controller = property(lambda self: self.schedule.controller)
    frozen = property(lambda self: self.schedule.frozen)
    pruned = property(lambda self: self.schedule.pruned)
    regularized = property(lambda self: self.schedule.regularized)
    _regularized_ids = property(lambda self: self.schedule.regularized_ids)
    alpha = property(lambda self: self.schedule.alpha)

    def _targets(self) -> dict[str, nn.Module]:
        return self.schedule.layers

    # ----- optimizer: parameter groups and regularization hooks -------------------------------------

    def get_decay_parameter_names(self, model) -> list[str]:
        # Masks and target weights get α_t only; everything else keeps the ordinary weight_decay.
        return [n for n in super().get_decay_parameter_names(model) if _clean_name(n) not in self.regularized]

    def create_optimizer(self, model=None):
        created = self.optimizer is None
        optimizer = super().create_optimizer(model)
        schedule = self.schedule
        schedule.refresh_parameters()
        inner = getattr(optimizer, "optimizer", optimizer)
        if created and schedule.masks and self.args.mask_learning_rate is not None:
            _move_to_own_group(inner, {id(m.mask) for m in schedule.layers.values()}, lr=self.args.mask_learning_rate)
        target_weight_ids = {id(m.weight) for m in schedule.layers.values()}
        if created and self.args.weight_learning_rate is not None:
            _move_to_own_group(inner, target_weight_ids, lr=self.args.weight_learning_rate)
        if created and self.args.tensorwise_second_moment:  # masks and weights; the plain weights for dense
            _move_to_own_group(inner, schedule.regularized_ids or target_weight_ids, tensorwise=True)
        if not getattr(inner, "_pilot_hooks", False):
            inner.register_step_pre_hook(self._regularize)
            inner.register_step_post_hook(schedule.after_step)
            inner._pilot_hooks = True
        return optimizer

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        if getattr(args, "tensorwise_second_moment", False):  # same AdamW, one second moment per target tensor
            cls, kwargs = TensorwiseAdamW, {k: kwargs[k] for k in ("lr", "betas", "eps") if k in kwargs}
        return cls, kwargs

    def _regularize(self, optimizer, *_):
        if not self.regularize_in_loss:  # under DeepSpeed the penalty goes into the loss instead
            self.schedule.before_step(optimizer)

    # ----- controller, pruning and diagnostics ------------------------------------------------------

    @property
    def regularize_in_loss(self) -> bool:
        """DeepSpeed steps its own flat fp32 partitions, not our parameters, so the optimizer hook cannot
        see them; there the coupled term goes into the loss instead (same gradient, 2αp)."""
        return self.is_deepspeed_enabled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is not None and model.training:
            loss, outputs = self._distillation_loss(model, inputs, num_items_in_batch)
            result = (loss, outputs) if return_outputs else loss
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        self._penalty = 0.0
        if not (self.regularize_in_loss and model.training and self.alpha > 0):
            return result
        if self.args.regularization != "coupled":
            raise ValueError("under DeepSpeed only regularization='coupled' is supported (it goes into the loss).")
        loss = result[0] if return_outputs else result
        params = [p for p in model.parameters() if id(p) in self.schedule.regularized_ids]
        norm = sum(p.float().abs().sum() if self.args.method == "l1" else p.float().pow(2).sum() for p in params)
        # Trainer divides the loss by the accumulation steps unless the loss already is a share of the batch.
        scaled_for_ga = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        penalty = self.alpha * norm / (self.current_gradient_accumulation_steps if scaled_for_ga else 1)
        self._penalty = float(penalty.detach()) / (1 if scaled_for_ga else self.current_gradient_accumulation_steps)
        loss = loss + penalty
        return (loss, result[1]) if return_outputs else loss

    def _distillation_loss(self, model, inputs, num_items_in_batch):
        """lm_loss_weight · LM loss + the weighted distillation terms (docs/METHOD.md section 10)."""
        a = self.args
        need_hidden = a.distill_feature_weight > 0
        labels, mask = inputs.get("labels"), inputs.get("attention_mask")
        student_inputs = {**inputs, "output_hidden_states": True} if need_hidden else inputs
        # The LM loss is computed in the logit term's pass over the student's logits when it is the plain
        # causal-LM cross-entropy (the same softmax; docs/DESIGN.md "Distillation"), and not at all with weight
        # 0; otherwise (a custom loss, or no logit term) the model computes it.
        fused = a.distill_logit_weight > 0 and labels is not None and self._plain_lm_loss(model)
        by_model = a.lm_loss_weight > 0 and not fused
        if by_model:
            loss, outputs = super().compute_loss(model, student_inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
        else:  # without labels the model computes no LM loss: no (N, V) log-softmax kept for its backward
            outputs = model(**{k: v for k, v in student_inputs.items() if k != "labels"})
        teacher_logits, teacher_hidden = self.teacher(inputs["input_ids"], mask, need_hidden)
        # The LM loss may be a share of the whole accumulated batch (normalized by its token count, as
        # Trainer.compute_loss does); the distillation terms are means over this micro-batch, so they get the
        # same share: the terms are divided by `share` below, and the fused LM term is multiplied by it here.
        scaled = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        share = self.current_gradient_accumulation_steps if scaled else 1
        lm_weight = 0.0 if not fused else (a.lm_loss_weight * share * self._token_average_scale() if scaled
                                           else a.lm_loss_weight)
        terms = distillation_loss(outputs, teacher_logits, teacher_hidden, labels,
                                  logit_weight=a.distill_logit_weight, feature_weight=a.distill_feature_weight,
                                  temperature=a.distill_temperature, token_mask=None if mask is None else mask.bool(),
                                  lm_weight=lm_weight, lm_num_items=num_items_in_batch if scaled else None)
        logged = {k: v for k, v in terms.items() if k != "loss"}
        if by_model:
            lm = outputs["loss"].detach().float()
            if scaled and labels is not None:  # back to this micro-batch's mean, for the logs
                lm = lm * num_items_in_batch / (labels[..., 1:] != -100).sum().clamp_min(1)
            logged["lm_loss"] = lm
        elif "lm_loss" not in logged and labels is not None:  # weight 0 and no logit term to compute it with
            logged["lm_loss"] = lm_loss_value(outputs["logits"], labels)
        for name, value in logged.items():
            self._term_sums[name] = self._term_sums.get(name, 0.0) + float(value)
        self._term_count += 1
        distilled = terms["loss"] / share
        return (a.lm_loss_weight * loss + distilled if by_model else distilled), outputs

    def _plain_lm_loss(self, model) -> bool:
        """Whether Trainer would compute the model's plain causal-LM cross-entropy (no label smoothing, no
        compute_loss_func, the model's loss function is Transformers' ForCausalLMLoss)."""
        if self.label_smoother is not None or self.compute_loss_func is not None:
            return False
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

        base = self.accelerator.unwrap_model(model)
        if hasattr(base, "get_base_model"):  # PEFT
            base = base.get_base_model()
        if hasattr(base, "_loss_function"):  # set by hand: read like the `loss_function` property, silently
            return base._loss_function is ForCausalLMLoss
        return LOSS_MAPPING.get(getattr(base, "loss_type", None), ForCausalLMLoss) is ForCausalLMLoss

    def _token_average_scale(self) -> int:
        """Trainer.compute_loss's factor on a loss normalized by the token count of all processes."""
        if not self.args.average_tokens_across_devices:
            return 1
        if self.args.n_gpu > 1:
            return self.args.n_gpu
        return self.accelerator.num_processes // self.get_tp_size()

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.schedule.judges_loss:  # the controller judges the data loss only
            self.schedule.add_loss(loss.float() - getattr(self, "_penalty", 0.0))
        return loss

    def _on_train_begin(self) -> None:
        self.schedule.on_train_begin(self.state.max_steps, self.state.global_step)

    def _on_step_end(self) -> None:
        self.schedule.on_step_end(self.state.global_step)

    def _prune(self) -> None:
        self.schedule.prune()

    def diagnostics(self) -> dict[str, float]:
        """alpha, balance, l1_ratio, prune_damage and sparsity (`SparsitySchedule.diagnostics`). Under FSDP2
        every process must call it (Trainer's `log` does): shards are summed, prune_damage gathers."""
        return self.schedule.diagnostics()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.controller is not None:
            logs.update({k: round(v, 6) if k != "alpha" else v for k, v in self.diagnostics().items()})
        if "loss" in logs and self._term_count:  # each term's mean over the micro-batches since the last log
            logs.update({k: round(v / self._term_count, 6) for k, v in self._term_sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, start_time)

    # ----- checkpoints --------------------------------------------------------------------------------

    def _pilot_state(self) -> dict:
        return {"settings": self.args.run_settings(), **self.schedule.state_dict(),
                "data": data_fingerprint(self.train_dataset)}  # resume refuses other data

    def _save_pilot_state(self) -> None:
        if not self.args.should_save or self.controller is None:
            return
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        if not os.path.isdir(folder):
            return
        tmp = os.path.join(folder, PILOT_STATE_NAME + ".tmp")
        with open(tmp, "w") as f:
            json.dump(self._pilot_state(), f, indent=1)
        os.replace(tmp, os.path.join(folder, PILOT_STATE_NAME))

    def _load_pilot_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, PILOT_STATE_NAME)
        if not os.path.isfile(path):
            intact = latest_checkpoint(os.path.dirname(os.path.abspath(checkpoint)))
            hint = f"Resume from {intact}, the latest complete checkpoint." if intact else "Start a new run instead."
            raise ValueError(f"{checkpoint} has no {PILOT_STATE_NAME}: its save was interrupted (or PILoTTrainer did "
                             f"not write it), so its α schedule cannot be resumed. {hint}")
        with open(path) as f:
            state = json.load(f)
        current = json.loads(json.dumps(self.args.run_settings()))
        saved = state["settings"]  # a setting recorded on one side only (HAM's, when on) differs too
        diff = {k: (saved.get(k), current.get(k)) for k in {**saved, **current} if current.get(k) != saved.get(k)}
        if diff:
            lines = "; ".join(f"{k}: checkpoint {old!r} vs now {new!r}" for k, (old, new) in diff.items())
            raise ValueError(f"cannot resume {checkpoint} with other PILoT settings ({lines}). Resume with the "
                             "checkpoint's settings, or start a new run in another output_dir.")
        check_same_data(checkpoint, state.get("data"), data_fingerprint(self.train_dataset))
        self.schedule.load_state_dict(state)

    # ----- the run ------------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if self.controller is not None and not is_wrapped(self.model) and self.args.reparameterized:
            raise RuntimeError("this trainer already finished (its model is merged); create a new PILoTTrainer.")
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, str) and checkpoint.lower() in ("true", "false"):  # from a command line or YAML
            checkpoint = checkpoint.lower() == "true"
        if checkpoint is True:
            checkpoint = latest_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"resume_from_checkpoint=True but {self.args.output_dir} has no complete "
                                 "checkpoint-* folder; pass a checkpoint path or start without resuming.")
        elif checkpoint and not os.path.isdir(checkpoint):
            raise ValueError(f"resume_from_checkpoint={checkpoint!r} is not a folder; give a checkpoint-* folder, "
                             "or true for the latest complete one in output_dir.")
        if checkpoint:
            self._load_pilot_state(checkpoint)
        output = super().train(resume_from_checkpoint=checkpoint or None, **kwargs)
        self.finish()
        return output

    @torch.no_grad()
    def finish(self) -> nn.Module:
        """Prune to the target (unless recovery already did), merge mask ⊙ weight and unwrap."""
        if self.args.prunes and not self.pruned:
            self._prune()
        self.schedule.frozen = []
        self.teacher = None  # its memory is the student's again
        if self.is_fsdp_enabled and not self.gathered:
            self.model = self.model_wrapped = _gather_plain_model(self.model, self.args.device)
            self.gathered = True
        elif is_wrapped(self.model):
            merge_and_unload(self.model)
        self.sparsity_report = sparsity_report(self.model, self.pilot_config)
        return self.model


    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.gathered:
            return super().save_model(output_dir, _internal_call)
        # After finish() under FSDP2 every process holds the same plain model: saved as without FSDP (only
        # the main process writes), not through FSDP's state-dict gathering of a model that is no more sharded.
        self._save(output_dir if output_dir is not None else self.args.output_dir)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # ----- model card ----------------------------------------------------------------------------------

    def card_info(self, results: list[dict] | None = None, base_model: str | None = None, **kwargs) -> CardInfo:
        """What the model card says about this run: the run settings record, the sparsity report, results."""
        settings = {**self.args.run_settings(), "max_steps": self.state.max_steps}
        report = self.sparsity_report or sparsity_report(self.model, self.pilot_config)
        return card_info_for_run(settings, report, base_model=base_model or getattr(self.model.config,
                                 "name_or_path", None) or "unknown", results=results or [], **kwargs)

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, **kwargs) -> None:
        """Write README.md in output_dir with PILoT's card (so `push_to_hub()` publishes it)."""
        if not self.is_world_process_zero():
            return
        extra = {k: v for k, v in dict(language=language, license=license, model_name=model_name).items() if v}
        if tags:
            extra["tags"] = [tags] if isinstance(tags, str) else list(tags)
        if dataset:
            extra["datasets"] = [dataset] if isinstance(dataset, str) else list(dataset)
        write_model_card(self.args.output_dir, self.card_info(base_model=finetuned_from, **extra))


class _PILoTCallback(TrainerCallback):
    """Connects the trainer's PILoT logic to the loop's events (no logic of its own)."""

    def __init__(self, trainer: PILoTTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._on_train_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer._on_step_end()

    def on_save(self, args, state, control, **kwargs):
        self.trainer._save_pilot_state()


def _refuse_peft(model: nn.Module) -> None:
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model, PeftModel) or any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("this model carries PEFT adapter layers (LoRA, ...); PILoTTrainer sparsifies the base "
                         "weights and would wrap the adapters' own linear layers. Merge the adapters first "
                         "(model = model.merge_and_unload()) and pass the plain model.")


def _check_fsdp_loading() -> None:
    """PILoT reads the real weights on every process before FSDP starts (wrapping, L1 init, warm start,
    teacher); Accelerate's cpu_ram_efficient_loading leaves them on the meta device except on rank 0."""
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true"):
        raise ValueError("fsdp_cpu_ram_efficient_loading is on: Transformers then loads the weights on the main "
                         "process only (meta tensors elsewhere), but PILoT wraps and measures the model on every "
                         "process before FSDP shards it. Set fsdp_cpu_ram_efficient_loading: false in the "
                         "Accelerate config (as configs/accelerate/fsdp.yaml does).")


@torch.no_grad()
def _gather_plain_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The FSDP2-sharded model as a plain Transformers model, full on every process (each calls this at the
    same time): every tensor is gathered in turn, mask ⊙ weight merged as `merge_and_unload` merges it, into
    a model of the original class built without allocating weights. Tied parameters stay tied."""
    from accelerate import init_empty_weights
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()  # the registered parameters are then the sharded ones
    layers = masked_layers(model)
    gathered: dict[int, torch.Tensor] = {}  # tensor id -> full tensor: a tied tensor is gathered once
    state, requires_grad = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf == "mask":
            continue
        if layer in layers and leaf == "weight":
            source, trainable = layers[layer].merged_weight(), layers[layer].weight_requires_grad
        else:
            source, trainable = tensor, tensor.requires_grad
        if id(tensor) not in gathered:
            gathered[id(tensor)] = full_tensor(source.detach()).to(device)
        state[name], requires_grad[name] = gathered[id(tensor)], trainable
    plain_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    with init_empty_weights(include_buffers=False):  # non-persistent buffers (rotary) are built for real
        plain = plain_class(model.config)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    for name, param in plain.named_parameters():
        param.requires_grad_(requires_grad[name])
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.to(device).train(model.training)


def _teacher(model: nn.Module, args: PILoTTrainingArguments) -> Teacher:
    """The distillation teacher: another model by path, or a frozen copy of `model` as given."""
    if args.teacher_model_name_or_path:
        teacher = Teacher.from_pretrained(args.teacher_model_name_or_path, args.teacher_dtype)
    else:
        teacher = Teacher.from_model(model, args.teacher_dtype)
    teacher.check_compatible(model, need_hidden=args.distill_feature_weight > 0)
    return teacher


def _warm_start(model: nn.Module, args: PILoTTrainingArguments, config: PILoTConfig, train_dataset) -> OneShotReport:
    """Prune the plain model one-shot to the target (docs/METHOD.md section 2: x_init), calibrated on
    training blocks. Deterministic, so every process of a multi-process run gets the same start."""
    calibration = None
    if args.warm_start != "magnitude":
        if train_dataset is None:
            raise ValueError(f"warm_start={args.warm_start!r} calibrates on the training data; pass train_dataset.")
        calibration = calibration_blocks(train_dataset, args.num_calibration_samples, seed=args.seed)
    return oneshot_prune(model, calibration, method=args.warm_start, sparsity=args.sparsity,
                         pattern=args.sparsity_pattern, config=config)


def _with_teacher_samples(dataset, teacher: Teacher, args: PILoTTrainingArguments, tokenizer):
    """The training blocks with the teacher's own text mixed in: args.teacher_sample_share of the blocks the run
    sees. Every process samples the same blocks (same seed), so the distributed sampler splits one dataset."""
    check_mixable(dataset)
    start = getattr(tokenizer, "eos_token_id", None)
    if start is None:
        start = teacher.model.generation_config.eos_token_id
        start = start[0] if isinstance(start, list) else start
    if start is None:
        raise ValueError("teacher_sample_share starts the teacher's text at the document separator, but neither the "
                         "tokenizer (processing_class) nor the teacher's generation config names an EOS token.")
    seen = args.tokens_trained(args.max_steps, block_size=1)  # blocks seen: the run record's one formula
    keep, count = teacher_sample_split(len(dataset), seen, args.teacher_sample_share)
    if count == 0:
        return dataset
    length = len(dataset[0]["input_ids"])
    started = time.perf_counter()
    # A fixed generation batch: the draws, hence the data (which resume compares), depend on the seed alone.
    samples = teacher.sample(count, length, int(start), seed=args.seed, batch_size=16)
    logger.info("sampled %d blocks of %d tokens from the teacher in %.0f s; training on them and %d of the %d text "
                "blocks", count, length, time.perf_counter() - started, keep, len(dataset))
    return mix_teacher_samples(dataset, samples, keep, seed=args.seed)


def _move_to_own_group(optimizer: torch.optim.Optimizer, ids: set[int], **settings) -> None:
    """Move the parameters `ids` to new groups with `settings` (e.g. lr), before any optimizer state exists,
    keeping everything else (weight decay, ...): one new group per group they come from."""
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in ids]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
            kept = {k: v for k, v in group.items() if k not in ("params", "initial_lr")}
            optimizer.add_param_group({**kept, **settings, "params": moved})
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
