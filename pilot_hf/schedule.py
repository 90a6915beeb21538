"""The sparsity schedule: what a trained method does to the target layers over a run (docs/DESIGN.md, "The
sparsity schedule"). `PILoTTrainer` drives one `SparsitySchedule`; a new trained method or a new optimizer step
goes here, with its arguments in `PILoTTrainingArguments`.

- the target layers, found once (masked layers of a wrapped model, else the configured linear layers);
- α_t: the controller or a fixed schedule (docs/METHOD.md section 5), fed the training loss;
- the optimizer hooks: before each step the regularization (section 3); after it the frozen pruning pattern,
  if any, is re-applied, then HAM's step (section 11);
- gradual magnitude pruning (section 10), prune-and-freeze for recovery (section 6), `keep_zeros`;
- diagnostics (section 4) and the checkpoint state.

Under FSDP2 every process calls the methods together (sums over shards, gathered layers).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PILoTConfig
from .ham import HAMTarget, ham_step, skipped_by_grad_scaler
from .pruning import SparsityPattern, apply_keep_mask, full_tensor, is_sharded, keep_masks, local_tensor
from .regularization import AlphaController
from .training_args import PILoTTrainingArguments
from .wrapping import (
    effective_weight,
    find_target_layers,
    magnitude_prune,
    masked_layers,
    out_in_layout,
    prune_model,
)


class SparsitySchedule:
    """The target layers of `model` and everything a trained method does to them, step by step.

    `accelerator` (Accelerate's) reduces and broadcasts across processes. The trainer calls `on_train_begin`,
    `add_loss` per micro-batch, `on_step_end` per optimizer step, and registers `before_step` / `after_step`
    as optimizer hooks.
    """

    def __init__(self, model: nn.Module, args: PILoTTrainingArguments, config: PILoTConfig, accelerator):
        self.model, self.args, self.config, self.accelerator = model, args, config, accelerator
        self.layers = masked_layers(model) or find_target_layers(model, config)
        # Masks and target weights take α_t instead of weight decay (names without wrapper prefixes).
        kinds = ("mask", "weight") if args.reparameterized else ("weight",)
        self.regularized = set() if args.method == "finetune" else {f"{n}.{k}" for n in self.layers for k in kinds}
        self.masks = {n for n in self.regularized if n.endswith(".mask")}
        with torch.no_grad():
            self.l1_init = float(sum(effective_weight(m).abs().sum() for m in self.layers.values()))
        self.l1_ratio_threshold = args.l1_ratio_threshold or self._default_l1_ratio_threshold()
        self.controller: AlphaController | None = None
        self.pruned = False
        self.frozen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, keep) after pruning
        self.total_steps = 0  # max_steps, known at train begin
        self.regularized_ids: set[int] = set()
        self._interval_loss = None
        self._interval_steps = 0

    # ----- parameters -----------------------------------------------------------------------------------

    def regularized_parameters(self) -> list[nn.Parameter]:
        return [getattr(self.layers[n], k) for n, _, k in (r.rpartition(".") for r in sorted(self.regularized))]

    def refresh_parameters(self) -> None:
        """Read the parameters' identities again (FSDP2 replaces every parameter by a sharded one)."""
        self.regularized_ids = {id(p) for p in self.regularized_parameters()}

    @property
    def sparsify_steps(self) -> int:
        return self.total_steps - self.args.recovery_steps

    @torch.no_grad()
    def _default_l1_ratio_threshold(self) -> float:
        """K = the L1 share of W_init that pruning at the target sparsity would keep (0.5 without a target)."""
        if not self.args.prunes:
            return 0.5
        scores = {n: out_in_layout(effective_weight(m).abs().float(), m) for n, m in self.layers.items()}
        keep = keep_masks(scores, self.args.sparsity, self.args.sparsity_pattern)
        kept = sum(float((scores[n] * keep[n]).sum()) for n in scores)
        return kept / max(self.l1_init, 1e-30)

    # ----- optimizer hooks ------------------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        if self.pruned or self.controller is None:
            return 0.0
        return self.controller.alpha

    @torch.no_grad()
    def before_step(self, optimizer, *_) -> None:
        """The regularization (docs/METHOD.md section 3) on the gradients or the parameters."""
        alpha = self.alpha
        if alpha == 0:
            return
        l1 = self.args.method == "l1"
        coupled = self.args.regularization == "coupled"
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in self.regularized_ids or p.grad is None:
                    continue
                if coupled:  # the gradient of α‖p‖² (2αp), or of α‖p‖₁ (α·sign p)
                    p.grad.add_(p.sign() if l1 else p, alpha=alpha if l1 else 2 * alpha)
                elif l1:  # proximal step of α‖p‖₁: soft-threshold by lr·α
                    p.copy_(p.sign() * (p.abs() - group["lr"] * alpha).clamp_min(0))
                else:
                    p.mul_(1 - 2 * group["lr"] * alpha)

    @torch.no_grad()
    def after_step(self, optimizer, *_) -> None:
        """The frozen pattern (Adam's momentum would move pruned entries), then HAM's multiplicative step on
        every target matrix, which leaves exact zeros at zero by itself."""
        for p, keep in self.frozen:
            apply_keep_mask(p, keep)
        if self.args.ham and not skipped_by_grad_scaler(optimizer):
            ham_step(self.ham_targets(optimizer), self.args.ham_alpha, self.args.ham_beta)

    def ham_targets(self, optimizer) -> list[HAMTarget]:
        """Each target matrix's scaled tensor (the weight, also of mask ⊙ weight), with its group's learning rate."""
        lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        return [HAMTarget(layer.weight, getattr(layer, "mask", None) if self.args.reparameterized else None,
                          lr[id(layer.weight)]) for layer in self.layers.values() if id(layer.weight) in lr]

    # ----- the run --------------------------------------------------------------------------------------

    def on_train_begin(self, max_steps: int, step: int) -> None:
        self.total_steps = max_steps
        self.refresh_parameters()
        if self.sparsify_steps < 1:
            raise ValueError(f"recovery_steps={self.args.recovery_steps} leaves no sparsification steps out of "
                             f"{max_steps}; lower recovery_steps or train longer.")
        if self.controller is None:
            a = self.args
            self.controller = AlphaController(
                schedule=a.alpha_schedule, alpha_init=a.alpha_init, alpha_final=a.alpha_final,
                alpha_min=a.alpha_min, alpha_max=a.alpha_max, delta=a.delta, interval=a.alpha_update_interval,
                l1_ratio_threshold=self.l1_ratio_threshold, loss_tolerance=a.loss_tolerance,
                total_steps=self.sparsify_steps)
        if self.pruned and not self.frozen:  # resumed inside the recovery phase
            self.prune()
        if self.args.keep_zeros and not self.frozen:  # the model's own zeros (a checkpoint has the same ones)
            self.frozen = [(layer.weight, layer.weight != 0) for layer in self.layers.values()]
        if self.args.method == "gmp" and not self.pruned and step > self.args.gmp_start_step:
            # resumed inside the gradual phase: the last event's pattern (its zeros are in the weights) again
            self._gmp_step(step - (step - self.args.gmp_start_step) % self.args.gmp_interval)

    @property
    def judges_loss(self) -> bool:
        """Whether the controller needs the training loss (the pilot schedule, before pruning)."""
        return self.controller is not None and self.controller.schedule == "pilot" and not self.pruned

    def add_loss(self, data_loss: torch.Tensor) -> None:
        """One micro-batch's data loss (the penalty excluded), for the interval's mean."""
        if self.judges_loss:
            self._interval_loss = data_loss if self._interval_loss is None else self._interval_loss + data_loss

    def on_step_end(self, step: int) -> None:
        if self.pruned:
            return
        if self.judges_loss:
            self._interval_steps += 1
        if self.controller.schedule != "pilot":
            self.controller.step_end(step)
        elif step % self.controller.interval == 0:
            loss = self._interval_loss / self._interval_steps
            mean_loss = float(self.accelerator.reduce(loss.detach().reshape(1), reduction="mean").item())
            self.controller.step_end(step, mean_loss, self.l1_ratio())
            self._broadcast_controller()
            self._interval_loss, self._interval_steps = None, 0
        if self.args.method == "gmp":
            self._gmp_step(step)
        if self.args.recovery_steps and step >= self.sparsify_steps:
            self.prune()

    def _broadcast_controller(self) -> None:
        # Every process computed the same reduced inputs; still, take rank 0's state so decisions never diverge.
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            state = [self.controller.state_dict()]
            broadcast_object_list(state, from_process=0)
            self.controller = AlphaController.from_state_dict(state[0])

    def gmp_sparsity(self, step: int) -> float:
        """Zhu & Gupta's cubic schedule (docs/METHOD.md section 10): s_i at gmp_start_step, the target at the end
        of the sparsification phase, s_t = s_f + (s_i − s_f)(1 − progress)³."""
        a = self.args
        progress = min(max((step - a.gmp_start_step) / max(self.sparsify_steps - a.gmp_start_step, 1), 0.0), 1.0)
        return a.sparsity + (a.gmp_initial_sparsity - a.sparsity) * (1 - progress) ** 3

    @torch.no_grad()
    def _gmp_step(self, step: int) -> None:
        """At each pruning event, prune by magnitude to s_t; pruned weights stay 0 until the next event (and,
        being 0, are pruned again then). The last event before recovery (or the end) prunes to the target."""
        a = self.args
        if step < a.gmp_start_step or (step - a.gmp_start_step) % a.gmp_interval or step >= self.sparsify_steps:
            return
        sparsity = self.gmp_sparsity(step)
        if sparsity > 0:
            keep = magnitude_prune(self.model, sparsity, a.sparsity_pattern, self.config)
            self.frozen = [(self.layers[n].weight, keep[n]) for n in keep]

    @torch.no_grad()
    def prune(self) -> None:
        """Prune to the target now; with recovery left, keep the pattern frozen for the remaining steps."""
        a = self.args
        if a.reparameterized:
            keep = prune_model(self.model, a.sparsity, a.sparsity_pattern)
            self.frozen = [(p, keep[n]) for n, m in self.layers.items() for p in (m.mask, m.weight)]
        else:
            keep = magnitude_prune(self.model, a.sparsity, a.sparsity_pattern, self.config)
            self.frozen = [(self.layers[n].weight, keep[n]) for n in keep]
        self.pruned = True

    # ----- diagnostics (docs/METHOD.md section 4) -------------------------------------------------------

    @property
    def sharded(self) -> bool:
        return any(is_sharded(m.weight) for m in self.layers.values())

    def _sum_over_processes(self, values: list[float]) -> list[float]:
        """This process's sums (its shards under FSDP2), added up over the processes there."""
        if not self.sharded:
            return values
        return self.accelerator.reduce(torch.tensor(values, dtype=torch.float64, device=self.args.device),
                                       reduction="sum").tolist()

    @torch.no_grad()
    def l1_ratio(self) -> float:
        l1 = sum(local_tensor(effective_weight(m)).abs().float().sum() for m in self.layers.values())
        if self.sharded:  # parameters are sharded: add up the shards
            l1 = self.accelerator.reduce(l1.reshape(1), reduction="sum")
        return float(l1) / max(self.l1_init, 1e-30)

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """alpha, balance = mean(m² − w²)/β (1 at start, → 0 in the L1 regime), l1_ratio, prune_damage (relative
        L2 norm that pruning to the target would remove now) and sparsity (exact zeros of the effective weights)."""
        layers = self.layers.values()
        out = {"alpha": self.alpha, "l1_ratio": self.l1_ratio()}
        numel = sum(m.weight.numel() for m in layers)  # a DTensor's numel is the full tensor's
        diff = sum(float((local_tensor(m.mask).float() ** 2 - local_tensor(m.weight).float() ** 2).sum())
                   for m in layers) if self.args.reparameterized else 0.0
        zeros = sum(int((local_tensor(effective_weight(m)) == 0).sum()) for m in layers)
        diff, zeros = self._sum_over_processes([diff, zeros])
        if self.args.reparameterized:
            beta = self.config.beta
            out["balance"] = diff / numel / (beta if beta > 0 else 1.0)
        out["sparsity"] = zeros / numel
        if self.args.prunes:
            out["prune_damage"] = self._prune_damage()
        return out

    def _prune_damage(self) -> float:
        """Relative L2 norm that pruning to the target would remove now; per-layer patterns go one (gathered)
        layer at a time, 'global' needs every layer's scores at once."""
        def full(layer):
            return out_in_layout(full_tensor(effective_weight(layer)).float(), layer)

        a = self.args
        if SparsityPattern.parse(a.sparsity_pattern).kind == "global":
            groups = [{n: full(m) for n, m in self.layers.items()}]
        else:
            groups = ({n: full(m)} for n, m in self.layers.items())
        removed = total = 0.0
        for effective in groups:
            keep = keep_masks({n: x.abs() for n, x in effective.items()}, a.sparsity, a.sparsity_pattern)
            removed += sum(float((x[~keep[n]] ** 2).sum()) for n, x in effective.items())
            total += sum(float((x ** 2).sum()) for x in effective.values())
        return (removed / max(total, 1e-30)) ** 0.5

    # ----- checkpoint state -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        loss = None if self._interval_loss is None else float(self._interval_loss)
        return {"controller": self.controller.state_dict(), "l1_init": self.l1_init,
                "l1_ratio_threshold": self.l1_ratio_threshold, "pruned": self.pruned, "interval_loss": loss,
                "interval_steps": self._interval_steps}

    def load_state_dict(self, state: dict) -> None:
        self.controller = AlphaController.from_state_dict(state["controller"])
        self.l1_init, self.l1_ratio_threshold = state["l1_init"], state["l1_ratio_threshold"]
        self.pruned, self.frozen = state["pruned"], []
        loss = state["interval_loss"]
        self._interval_loss = None if loss is None else torch.tensor(loss, device=self.args.device)
        self._interval_steps = state["interval_steps"]
