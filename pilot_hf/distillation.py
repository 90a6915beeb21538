"""Distillation from the dense teacher: logit KL and SquareHead feature losses (docs/METHOD.md, section 10).

The recipe of Kurtic et al. 2023, "Sparse Fine-tuning for Inference Acceleration of Large Language Models"
(arXiv 2310.06927): while the student is sparsified, it is also pulled towards a frozen dense teacher.

Logit distillation, over the N token positions that carry a label (causal-LM shift: the logits at position i
predict labels[i + 1]; a shifted label of -100 does not count; without labels, every position but the last):

    L_logit = T² / N · Σ_i KL( softmax(z_t,i / T) ‖ softmax(z_s,i / T) )
            = T² / N · Σ_i Σ_v p_t,iv · (log p_t,iv − log p_s,iv)

z_s, z_t are the student's and teacher's logits and T the temperature. The T² factor keeps the gradient's
scale independent of T (Hinton et al. 2015): ∂L/∂z_s,i = T / N · (p_s,i − p_t,i).

Feature distillation, "SquareHead": over the outputs of the L decoder blocks (Transformers'
`output_hidden_states=True` gives the embedding output and then one state per block; entry 0 is skipped and
the last entry is, in Transformers' convention, the final-norm output), with the M selected token positions
and the hidden size H:

    L_feat = 1/L · Σ_l MSE(h_s^l, h_t^l) / (MSE(h_t^l, 0) + eps)
    MSE(a, b) = 1 / (M·H) · Σ_{positions, features} (a − b)²

so each layer's error is relative to that layer's mean squared teacher activation: layers whose activations
grow by orders of magnitude with depth all weigh the same, and the loss does not change if both models' states
are scaled by the same factor (up to eps = 1e-8, which only guards an all-zero teacher state). Averaging over
layers rather than summing only rescales the weight.

Everything is computed in float32. `Teacher` holds the frozen teacher outside the student (no nn.Module
attribute), so it never reaches the student's parameters, state_dict, optimizer or checkpoints.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .evaluation import cross_entropy_sum

IGNORE_INDEX = -100
# The default recipe's loss weights (docs/BENCHMARKS.md section 13): PILoTTrainingArguments' field defaults, and
# what a plain TrainingArguments gets when it distils (lora.train_sparse_lora).
RECIPE_LOSS_WEIGHTS = {"lm_loss_weight": 4.0, "distill_logit_weight": 1.0, "distill_feature_weight": 1.0}


def default_lm_loss_weight(distills: bool) -> float:
    """The LM loss's weight when none is given: the recipe's beside a teacher, 1 without one. The regularization's
    gradient is added to the loss's (regularization='coupled'), so the LM loss alone at 4x would weaken it 4x
    against the loss the benchmarks ran with."""
    return RECIPE_LOSS_WEIGHTS["lm_loss_weight"] if distills else 1.0

# Positions per chunk of the logit loss: as many as fit in ~24 MiB per float32 (positions × vocab) temporary
# (128 for a 49k vocabulary). Below glibc's 32 MiB mmap threshold, so malloc reuses the same buffers chunk after
# chunk; 100 MB chunks were mapped and page-faulted afresh each time and made the loss ~1.6x slower
# (docs/DESIGN.md, "Distillation").
CHUNK_BYTES = 24 * 2**20
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ----- logit distillation ---------------------------------------------------------------------------------


def label_weights(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """(batch · seq,) float32, 1 at the positions that carry a label after the causal shift, else 0."""
    batch, length = logits.shape[:2]
    keep = torch.zeros(batch, length, dtype=torch.float32, device=logits.device)
    if labels is None:
        keep[:, :-1] = 1.0
    else:
        if labels.shape != (batch, length):
            raise ValueError(f"labels have shape {tuple(labels.shape)}, the logits {tuple(logits.shape)}; "
                             "expected labels of shape (batch, seq).")
        keep[:, :-1] = (labels[:, 1:].to(logits.device) != IGNORE_INDEX).float()
    return keep.reshape(-1)


def _labelled_chunks(weight: torch.Tensor, rows: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, weight[start:end]) over the contiguous ranges of `rows` rows that hold a labelled row.
    One host sync for all of them: a check per chunk would stall a GPU once per chunk."""
    count = -(-weight.numel() // rows)
    labelled = F.pad(weight, (0, count * rows - weight.numel())).view(count, rows).any(dim=1).tolist()
    return [(i * rows, min((i + 1) * rows, weight.numel()), weight[i * rows:(i + 1) * rows])
            for i, keep in enumerate(labelled) if keep]


class _ChunkedLogitLoss(torch.autograd.Function):
    """kl_scale · Σ_i w_i · KL(p_t,i ‖ p_s,i) at temperature T  +  ce_scale · Σ_i CE(z_s,i, y_i), in one pass over
    contiguous chunks of positions (rows). Returns (that objective, Σ w·KL, Σ CE); the two sums are for the logs
    and carry no gradient. Without targets there is no CE term (and Σ CE is 0).

    The gradient, kl_scale · w_i / T · (p_s,i − p_t,i) + ce_scale · (softmax(z_s,i) − onehot(y_i)), needs the
    same softmaxes as the loss (at T = 1 the very same student log-softmax), so forward computes it along with
    the loss and keeps it (one tensor of the student logits' size and dtype) for backward, which only scales it:
    no softmax is computed twice, neither model's logits are kept, and the LM loss costs a gather beside the KL.
    Autograd through log_softmax would keep two float32 (N, V) tensors alive per term instead; here the
    temporaries are chunk-sized. Rows are sliced (views, no copy) and weighted 0/1 rather than gathered, so the
    unlabelled rows in a chunk cost a little compute, not copies; chunks without a labelled row are skipped
    (targets are -100 wherever w is 0).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor | None, temperature: float, chunk_size: int,
                kl_scale: float | torch.Tensor, ce_scale: float | torch.Tensor):
        kl_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=student.device)  # as in evaluation.cross_entropy_sum
        chunks = _labelled_chunks(weight, chunk_size)
        want_grad = ctx.needs_input_grad[0]
        if want_grad:  # rows of skipped chunks get no gradient: zeros, unless no chunk is skipped
            skipped = sum(end - start for start, end, _ in chunks) < weight.numel()
            grad = (torch.zeros_like if skipped else torch.empty_like)(student)
        t = temperature
        ce_in_grad = targets is not None and (torch.is_tensor(ce_scale) or ce_scale != 0)
        for start, end, w in chunks:
            z_s = student[start:end].float()
            log_ps = F.log_softmax(z_s if t == 1 else z_s / t, dim=-1)
            log_pt = F.log_softmax(teacher[start:end].float() / t, dim=-1)
            p_t = log_pt.exp()
            terms = (log_pt - log_ps).mul_(p_t)
            # xlogy-style: p_t = 0 contributes 0 even where log p_t = -inf (masked vocab entries).
            terms = torch.where(log_pt > -torch.inf, terms, 0.0)
            # unlabelled rows get weight 0; masked, not multiplied, so an inf there cannot turn into NaN
            kl_sum += terms.sum(dim=-1).masked_fill_(w == 0, 0.0) @ w
            del terms
            if targets is not None:
                y = targets[start:end]
                labelled = (y != IGNORE_INDEX).unsqueeze(1)
                y = y.clamp_min(0).unsqueeze(1)
                log_ps_lm = log_ps if t == 1 else F.log_softmax(z_s, dim=-1)
                ce_sum -= log_ps_lm.gather(1, y).masked_fill_(~labelled, 0.0).sum()
            if not want_grad:
                continue
            kl_coef = (w * (kl_scale / t)).unsqueeze(1)
            if not ce_in_grad:
                chunk_grad = log_ps.exp_().sub_(p_t).mul_(kl_coef)
            else:
                ce_coef = labelled * ce_scale
                if t == 1:  # p_s · (kl + ce) − p_t · kl − onehot · ce
                    chunk_grad = log_ps.exp_().mul_(kl_coef + ce_coef).sub_(p_t.mul_(kl_coef))
                else:
                    chunk_grad = log_ps.exp_().sub_(p_t).mul_(kl_coef).add_(log_ps_lm.exp_().mul_(ce_coef))
                chunk_grad.scatter_add_(1, y, -ce_coef)
            grad[start:end] = chunk_grad
        ctx.grad = grad if want_grad else None
        ce_sum = ce_sum.float()
        ctx.mark_non_differentiable(kl_sum, ce_sum)
        return kl_sum * kl_scale + ce_sum * ce_scale, kl_sum, ce_sum

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor, _kl_sum_grad, _ce_sum_grad):
        grad, ctx.grad = ctx.grad, None  # scaled in place and handed on: released with the student's graph
        if grad is None:
            raise RuntimeError("the logit distillation loss was backpropagated twice; compute it anew for every "
                               "backward (retain_graph is not supported).")
        return grad.mul_(grad_output), None, None, None, None, None, None, None


def _rows_per_chunk(chunk_size: int | str | None, vocab: int, rows: int) -> int:
    if chunk_size == "auto":
        return max(1, CHUNK_BYTES // (4 * vocab))
    if chunk_size is None:
        return max(1, rows)
    if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1:
        return chunk_size
    raise ValueError(f"chunk_size must be an int >= 1, 'auto' or None, got {chunk_size!r}.")


def _shifted_targets(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(batch · seq,) long: the label each position predicts (labels[i + 1]), -100 for the last position."""
    targets = torch.full(labels.shape, IGNORE_INDEX, dtype=torch.long, device=device)
    targets[:, :-1] = labels[:, 1:].to(device)
    return targets.reshape(-1)


def _count(num_items: int | torch.Tensor | None, weight: torch.Tensor) -> float | torch.Tensor:
    """The divisor of a sum over positions: `num_items`, else the local count of labelled positions (>= 1, so
    that no labelled position gives 0 with a zero gradient, not NaN)."""
    count = weight.sum() if num_items is None else num_items
    if torch.is_tensor(count):
        return count.to(weight.device, torch.float32).clamp_min(1)
    return max(float(count), 1.0)


def _check_logits(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; the models need the same vocabulary "
                         "(same tokenizer) and the same inputs.")


def _logit_pass(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                temperature: float, *, logit_weight: float, num_items: int | torch.Tensor | None, lm_weight: float,
                lm_num_items: int | torch.Tensor | None, chunk_size: int | str | None, with_lm: bool):
    """(loss, Σ w·KL, Σ CE, local count of labelled positions) of one `_ChunkedLogitLoss` pass; `with_lm`:
    compute the cross-entropy (needs labels), else Σ CE is 0."""
    _check_logits(student_logits, teacher_logits, temperature)
    vocab = student_logits.shape[-1]
    weight = label_weights(student_logits, labels)
    local = _count(None, weight)
    student = student_logits.reshape(-1, vocab)
    teacher = teacher_logits.detach().to(student_logits.device).reshape(-1, vocab)
    targets = _shifted_targets(labels, student.device) if with_lm else None
    kl_scale = logit_weight * temperature ** 2 / (local if num_items is None else _count(num_items, weight))
    ce_scale = lm_weight / (local if lm_num_items is None else _count(lm_num_items, weight)) if lm_weight else 0.0
    loss, kl_sum, ce_sum = _ChunkedLogitLoss.apply(student, teacher, weight, targets, float(temperature),
                                                   _rows_per_chunk(chunk_size, vocab, weight.numel()),
                                                   kl_scale, ce_scale)
    return loss, kl_sum, ce_sum, local


def logit_and_lm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float = 1.0, *, logit_weight: float = 1.0, lm_weight: float = 0.0,
                      num_items: int | torch.Tensor | None = None, lm_num_items: int | torch.Tensor | None = None,
                      chunk_size: int | str | None = "auto") -> dict[str, torch.Tensor]:
    """logit_weight · L_logit + lm_weight · L_LM from one chunked pass over the logits (module docstring).

    Returns float32 scalars: "loss" (with the student's gradient), "logit_loss" (L_logit) and, when labels are
    given, "lm_loss" (the causal-LM cross-entropy, mean over the labelled positions, as Transformers computes it
    for the same labels), both without a graph, for the logs. In the loss the KL sum is divided by `num_items`
    and the cross-entropy sum by `lm_num_items` (each, if None, by the local count of labelled positions).
    With lm_weight 0 the cross-entropy is still computed for the log (at T = 1 a gather; at another T one more
    log-softmax per chunk) but takes no part in the gradient.
    """
    if lm_weight and labels is None:
        raise ValueError("lm_weight > 0 needs labels for the LM loss.")
    loss, kl_sum, ce_sum, local = _logit_pass(student_logits, teacher_logits, labels, temperature,
                                              logit_weight=logit_weight, num_items=num_items, lm_weight=lm_weight,
                                              lm_num_items=lm_num_items, chunk_size=chunk_size,
                                              with_lm=labels is not None)
    terms = {"loss": loss, "logit_loss": kl_sum * (temperature ** 2) / local}
    if labels is not None:
        terms["lm_loss"] = ce_sum / local
    return terms


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            labels: torch.Tensor | None, temperature: float = 1.0, *,
                            chunk_size: int | str | None = "auto",
                            num_items: int | torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the positions that carry a label (float32 scalar).

    Logits are (batch, seq, vocab) in any float dtype; labels (batch, seq) with -100 for ignored positions,
    shifted like the causal-LM loss (position i predicts labels[i + 1]); None counts every position but the last.
    Only the student gets a gradient. `chunk_size` positions are processed at a time ("auto": as many as fit in
    CHUNK_BYTES per float32 temporary; None: all at once).
    `num_items`: divide the sum by this instead of the local count of positions, e.g. Trainer's
    `num_items_in_batch`, which counts the same shifted labels over the accumulated batch, so that this term is
    normalized like Trainer's cross-entropy under gradient accumulation. To compute the LM loss in the same
    pass, use `logit_and_lm_loss`.
    """
    return _logit_pass(student_logits, teacher_logits, labels, temperature, logit_weight=1.0, num_items=num_items,
                       lm_weight=0.0, lm_num_items=None, chunk_size=chunk_size, with_lm=False)[0]


@torch.no_grad()
def lm_loss_value(logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int | str | None = "auto"
                  ) -> torch.Tensor:
    """The causal-LM cross-entropy (mean over the positions that carry a label, shifted as in
    `logit_distillation_loss`), without a graph: for the logs of a run whose LM loss has weight 0 and that has
    no logit term to compute it with (`logit_and_lm_loss` does), where the student is called without labels so
    that no (N, V) log-softmax is kept for a backward it would not use."""
    vocab = logits.shape[-1]
    targets = _shifted_targets(labels, logits.device)
    rows = _rows_per_chunk(chunk_size, vocab, targets.numel())
    total = cross_entropy_sum(logits.reshape(-1, vocab), targets, rows)
    return (total / (targets != IGNORE_INDEX).sum().clamp_min(1)).float()


# ----- feature distillation (SquareHead) ------------------------------------------------------------------


def feature_distillation_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor],
                              token_mask: torch.Tensor | None = None, *, eps: float = 1e-8) -> torch.Tensor:
    """SquareHead: mean over decoder blocks of MSE(h_s, h_t) / (MSE(h_t, 0) + eps), float32 scalar.

    Pass both models' `outputs.hidden_states` as Transformers returns them with `output_hidden_states=True`
    (num_layers + 1 tensors of shape (batch, seq, hidden), the embedding output first): entry 0 is skipped, the
    block outputs hidden_states[1:] are compared. Each MSE is the mean over the selected positions and all
    hidden features; `token_mask` (bool, batch × seq; e.g. the attention mask) selects positions, None takes all.
    Only the student gets a gradient.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"the student has {len(student_hidden) - 1} decoder layers, the teacher "
                         f"{len(teacher_hidden) - 1}; feature distillation needs the same depth.")
    if len(student_hidden) < 2:
        raise ValueError("feature distillation needs the hidden states of at least one decoder layer "
                         "(call the model with output_hidden_states=True).")
    mask = None if token_mask is None else token_mask.to(student_hidden[-1].device, torch.bool)
    if mask is not None and not bool(mask.any()):
        # No selected position: 0 rather than the NaN of an empty mean, still attached to the student's graph.
        return student_hidden[-1].sum().float() * 0.0
    losses = []
    for h_s, h_t in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
        if h_s.shape != h_t.shape:
            raise ValueError(f"student hidden states {tuple(h_s.shape)} and teacher's {tuple(h_t.shape)} differ; "
                             "feature distillation needs the same hidden size and inputs.")
        h_t = h_t.detach().to(h_s.device)
        if mask is not None:
            h_s, h_t = h_s[mask], h_t[mask]  # (M, hidden): only the selected positions are cast to float32
        h_s, h_t = h_s.float(), h_t.float()
        losses.append(F.mse_loss(h_s, h_t) / (h_t.pow(2).mean() + eps))
    return torch.stack(losses).mean()


# ----- combination ----------------------------------------------------------------------------------------


def distillation_loss(student_outputs: Any, teacher_logits: torch.Tensor | None,
                      teacher_hidden: Sequence[torch.Tensor] | None, labels: torch.Tensor | None, *,
                      logit_weight: float, feature_weight: float, temperature: float = 1.0,
                      token_mask: torch.Tensor | None = None, num_items: int | torch.Tensor | None = None,
                      chunk_size: int | str | None = "auto", lm_weight: float = 0.0,
                      lm_num_items: int | torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The weighted distillation terms, for the trainer to add to its task loss and to log one by one.

    `student_outputs`: the student's ModelOutput (or dict) with `logits`, and `hidden_states` when
    feature_weight > 0 (call the student with output_hidden_states=True). Returns float32 scalars: "loss" =
    logit_weight · logit_loss + feature_weight · feature_loss (+ lm_weight · the LM loss, see below), the only
    one with a gradient, and for the logs "logit_loss" and "feature_loss" (unweighted; only the terms with a
    weight > 0) and, with a logit term and labels, "lm_loss". `token_mask` selects positions for the feature
    term; `num_items` and `chunk_size` go to `logit_and_lm_loss`.
    With lm_weight > 0 the causal-LM cross-entropy of the student (its sum divided by `lm_num_items`, else by
    the local count of labelled positions) is computed in the logit term's pass and added to "loss"; call the
    student without labels then, so that it does not compute the same loss a second time.
    """
    def get(key: str):
        return student_outputs.get(key) if isinstance(student_outputs, Mapping) else getattr(student_outputs, key)

    if logit_weight < 0 or feature_weight < 0 or lm_weight < 0:
        raise ValueError(f"loss weights must be >= 0, got logit {logit_weight}, feature {feature_weight}, "
                         f"LM {lm_weight}.")
    if logit_weight == 0 and feature_weight == 0:
        raise ValueError("both distillation weights are 0: there is nothing to distill.")
    if lm_weight > 0 and logit_weight == 0:
        raise ValueError("lm_weight > 0 needs logit_weight > 0 (the LM loss is computed in the logit term's "
                         "pass); without a logit term, let the model compute its LM loss.")
    terms: dict[str, torch.Tensor] = {}
    loss = None
    if logit_weight > 0:
        if teacher_logits is None:
            raise ValueError("logit_weight > 0 needs the teacher's logits.")
        logit_terms = logit_and_lm_loss(get("logits"), teacher_logits, labels, temperature,
                                        logit_weight=logit_weight, lm_weight=lm_weight, num_items=num_items,
                                        lm_num_items=lm_num_items, chunk_size=chunk_size)
        loss = logit_terms.pop("loss")
        terms.update(logit_terms)
    if feature_weight > 0:
        student_hidden = get("hidden_states")
        if student_hidden is None or teacher_hidden is None:
            raise ValueError("feature_weight > 0 needs the hidden states of both models: call the student with "
                             "output_hidden_states=True and the teacher with need_hidden=True.")
        feature = feature_distillation_loss(student_hidden, teacher_hidden, token_mask)
        loss = feature_weight * feature if loss is None else loss + feature_weight * feature
        terms["feature_loss"] = feature.detach()
    terms["loss"] = loss
    return terms


# ----- the teacher ----------------------------------------------------------------------------------------


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"teacher dtype must be one of {sorted(_DTYPES)} or None, got {dtype!r}.")
    return _DTYPES[dtype]


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    return model


def _text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _logit_size(model: nn.Module) -> int:
    """Rows of the output embedding (= logits' last dimension), else config.vocab_size."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(output, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.numel():
        return int(weight.shape[0])
    return int(_text_config(model).vocab_size)


class Teacher:
    """A frozen teacher LM kept outside the student: a plain Python object holding the model in a plain attribute.

    Not an nn.Module on purpose: assigned to a Trainer (or anywhere), it is never registered as a submodule, so
    its weights never appear in the student's parameters, state_dict, optimizer, DDP buckets or checkpoints.
    """

    def __init__(self, model: nn.Module):
        from .layers import MaskedLinear

        if any(isinstance(m, MaskedLinear) for m in model.modules()):
            raise ValueError("the teacher model has MaskedLinear layers (it was wrapped for PILoT): take the "
                             "teacher from the dense model before wrap_model(), or load it with "
                             "Teacher.from_pretrained(...).")
        model.eval()  # dropout off, for good: nothing calls .train() on this object
        for p in model.parameters():
            p.requires_grad_(False)
        # No backward through the teacher: activation checkpointing would only cost (the name changed in 5.x).
        if hasattr(model, "activation_checkpointing_disable"):
            if model.is_activation_checkpointing:
                model.activation_checkpointing_disable()
        elif getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        self.model = model

    @classmethod
    def from_model(cls, model: nn.Module, dtype: str | torch.dtype | None = None) -> Teacher:
        """A frozen deep copy of `model` as given now (e.g. the dense model before warm-start pruning)."""
        from .layers import MaskedLinear

        model = _unwrap(model)
        if any(isinstance(m, MaskedLinear) for m in model.modules()):  # refuse before paying for the copy
            raise ValueError("Teacher.from_model got a model with MaskedLinear layers (wrapped for PILoT); the "
                             "teacher must be the dense model: build it before wrap_model() / PILoTTrainer, or "
                             "load it with Teacher.from_pretrained(...).")
        resolved = _resolve_dtype(dtype)
        copied = copy.deepcopy(model)
        if resolved is not None:
            copied.to(resolved)
        return cls(copied)

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str | torch.dtype | None = None, revision: str = "main",
                        **kwargs: Any) -> Teacher:
        """Load a causal LM with AutoModelForCausalLM (dtype None: the checkpoint's own dtype)."""
        from transformers import AutoModelForCausalLM

        resolved = _resolve_dtype(dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, revision=revision,
                                                         dtype=resolved if resolved is not None else "auto",
                                                         **kwargs)
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot load the teacher {name_or_path!r} (revision {revision!r}) as a causal LM: "
                             f"{error}. Pass a local folder or a Hub id of a model with the student's tokenizer."
                             ) from error
        return cls(model)

    # ----- properties and placement -----

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return _logit_size(self.model)

    @property
    def num_layers(self) -> int:
        return int(_text_config(self.model).num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(_text_config(self.model).hidden_size)

    @torch.no_grad()
    def sample(self, count: int, length: int, start_token_id: int, seed: int, batch_size: int = 8) -> list[list[int]]:
        """`count` blocks of `length` tokens written by the teacher: each starts with `start_token_id` (the
        document separator) and continues by sampling the teacher's full distribution (temperature 1, no top-k
        or top-p), never ending early. The same seed and batch size give the same blocks; the caller's random state
        is left as it was.

        Distilling on such text pulls the student toward the teacher on what the teacher itself writes, not only
        on the user's text (the data-free distillation of LLM-QAT, Liu et al. 2023, arXiv 2305.17888)."""
        device = self.device
        blocks: list[list[int]] = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for first in range(0, count, batch_size):
                prompt = torch.full((min(batch_size, count - first), 1), start_token_id, device=device)
                out = self.model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0, top_k=0,
                    top_p=1.0, typical_p=1.0, repetition_penalty=1.0, max_new_tokens=length - 1,
                    min_new_tokens=length - 1, pad_token_id=start_token_id)
                blocks.extend(out[:, :length].tolist())
        return blocks

    def to(self, device: torch.device | str) -> Teacher:
        self.model.to(device)
        return self

    def __repr__(self) -> str:
        return (f"Teacher({type(self.model).__name__}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"vocab={self.vocab_size}, dtype={self.dtype}, device={self.device})")

    # ----- forward -----

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 need_hidden: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """(logits as float32, hidden states as float32 or None), on the device of `input_ids`.

        Under no_grad (not inference_mode: the results are saved for the student's backward). Works inside an
        enclosing torch.autocast; the teacher then computes in the autocast dtype like the student.
        """
        device = self.device
        out = self.model(input_ids=input_ids.to(device),
                         attention_mask=None if attention_mask is None else attention_mask.to(device),
                         output_hidden_states=need_hidden, use_cache=False, return_dict=True)
        logits = out.logits.to(input_ids.device, torch.float32)
        hidden = None
        if need_hidden:
            hidden = tuple(h.to(input_ids.device, torch.float32) for h in out.hidden_states)
        return logits, hidden

    def check_compatible(self, student: nn.Module, need_hidden: bool) -> None:
        """ValueError if the student cannot be distilled from this teacher: different logit (vocab) size, or,
        with feature distillation (need_hidden), a different number of decoder layers or hidden size."""
        student = _unwrap(student)
        problems = []
        s_vocab, t_vocab = _logit_size(student), self.vocab_size
        if s_vocab != t_vocab:
            problems.append(f"vocabulary size: student {s_vocab}, teacher {t_vocab} (logit distillation compares "
                            "token distributions: use a teacher of the same family with the same tokenizer)")
        if need_hidden:
            s_cfg = _text_config(student)
            s_layers, s_hidden = int(s_cfg.num_hidden_layers), int(s_cfg.hidden_size)
            if s_layers != self.num_layers:
                problems.append(f"decoder layers: student {s_layers}, teacher {self.num_layers}")
            if s_hidden != self.hidden_size:
                problems.append(f"hidden size: student {s_hidden}, teacher {self.hidden_size}")
            if len(problems) > (s_vocab != t_vocab):
                problems[-1] += (" (feature distillation matches block outputs layer by layer: use the student's "
                                 "own dense model as teacher, or turn feature distillation off)")
        if problems:
            raise ValueError("the teacher does not fit the student: " + "; ".join(problems) + ".")


# ----- will the teacher fit? ------------------------------------------------------------------------------

_ADAM_STATE_BYTES = 8  # AdamW's two float32 moments per trained value


def count_parameters(name_or_path: str | Any, **config_kwargs: Any) -> int | None:
    """Parameters of a causal LM from its config alone (the model is built on the meta device: no weight is
    read or allocated); None if the config cannot be read or built. `name_or_path`: a path, a Hub id or a config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = name_or_path if not isinstance(name_or_path, str) else \
            AutoConfig.from_pretrained(name_or_path, **config_kwargs)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # an estimate only: a config we cannot build is not the user's error
        return None


def training_memory_bytes(num_parameters: int, dtype_bytes: int, reparameterized: bool) -> int:
    """An estimate (a lower bound: activations are not counted) of the student's training memory: weights,
    gradients and AdamW's two moments per value; PILoT and spred train a mask beside each weight (x2)."""
    return num_parameters * (2 * dtype_bytes + _ADAM_STATE_BYTES) * (2 if reparameterized else 1)


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory where training runs: the CUDA device's free bytes, else the system's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_teacher_fits(student_parameters: int | None, dtype_bytes: int, teacher_parameters: int | None,
                       teacher_dtype_bytes: int, reparameterized: bool, device: torch.device | str) -> None:
    """ValueError, before any model is loaded, if the student's training fits in the free memory but the
    teacher on top of it does not (a run that does not fit even without a teacher is not the teacher's fault,
    and the estimate is too rough to refuse it)."""
    available = available_memory_bytes(device)
    if available is None or student_parameters is None or teacher_parameters is None:
        return
    student = training_memory_bytes(student_parameters, dtype_bytes, reparameterized)
    teacher = teacher_parameters * teacher_dtype_bytes
    if student <= available < student + teacher:
        gib = 2**30
        raise ValueError(
            f"distillation (the default recipe) holds a frozen teacher of {teacher_parameters / 1e6:,.0f}M "
            f"parameters, {teacher / gib:.1f} GiB, beside the student's training (at least {student / gib:.1f} "
            f"GiB), but only {available / gib:.1f} GiB are free on {torch.device(device).type}. Turn "
            "distillation off with --distill_logit_weight 0 --distill_feature_weight 0 "
            "(trains on the LM loss alone), hold the teacher in half precision with --teacher_dtype bfloat16, or "
            "free memory.")


def check_teacher_memory(model: str, args: Any, dtype: str = "float32", revision: str = "main") -> None:
    """`check_teacher_fits` for a run of `args` (PILoTTrainingArguments) on `model` (a path, a Hub id or the
    demo's name) loaded in `dtype`, from the configs alone: before either model is loaded."""
    from .assets import config_source

    if not args.distills:
        return
    name, config_kwargs = config_source(model, revision)
    student = count_parameters(name, **config_kwargs)
    teacher = count_parameters(args.teacher_model_name_or_path) if args.teacher_model_name_or_path else student
    student_dtype = _DTYPES[dtype]
    teacher_dtype = _resolve_dtype(args.teacher_dtype) or student_dtype
    check_teacher_fits(student, student_dtype.itemsize, teacher, teacher_dtype.itemsize, args.reparameterized,
                       args.device)
