"""One method vocabulary for the trainer, one-shot pruning, the sweep, logs, model cards and docs.

- `dense`: the unpruned model, and nothing else (a sweep's reference row).
- One-shot methods prune without training: `magnitude`, `wanda`, `sparsegpt`.
- Trained methods: `pilot` (mask ⊙ weight, PILoT init, adaptive α), its ablations `spred` (balanced init,
  constant α) and `l1` (explicit L1 on the plain weights), `gmp` (gradual magnitude pruning during training,
  Zhu & Gupta 2017: the standard in-training baseline), and `finetune` (plain fine-tuning, then magnitude
  pruning: the control every regularizer must beat).
- A trained method may start from a one-shot solution instead of the dense model: its *warm start*
  (`warm_start="wanda"`; the paper's x_init, docs/METHOD.md section 2). A sweep writes such a cell as
  `pilot+wanda`: method `pilot`, warm start `wanda`. Pruned weights start at 0 and may regrow.
- `finetune` from a warm start may instead keep the one-shot pattern fixed for the whole run (`keep_zeros`: one-shot
  + fine-tuning as the literature reports it); a sweep writes that cell with `+fixed` (`finetune+sparsegpt+fixed`).
- Any trained method may also distil from the dense model (docs/METHOD.md section 10); a sweep writes that
  cell with the suffix `+kd` (`pilot+wanda+kd`), so runs with and without distillation are separate rows.
- Any trained method may add HAM's multiplicative step after each optimizer step (docs/METHOD.md section 11):
  suffix `+ham` (`gmp+ham`, `finetune+wanda+ham`, `pilot+ham+kd`).
"""

from __future__ import annotations

from dataclasses import dataclass

DENSE = "dense"
ONESHOT_METHODS = ("magnitude", "wanda", "sparsegpt")
TRAINED_METHODS = ("pilot", "spred", "l1", "gmp", "finetune")
WARM_STARTS = ONESHOT_METHODS
CALIBRATED_METHODS = ("wanda", "sparsegpt")  # need calibration activations
DISTILLED = "kd"  # sweep suffix: this trained cell distils from the dense model
HAM = "ham"  # sweep suffix: this trained cell adds HAM's step after each optimizer step
FIXED = "fixed"  # sweep suffix: this warm-started finetune cell keeps the one-shot pattern (keep_zeros)

# Model-card title and description of each method.
DESCRIPTIONS = {
    "pilot": ("PILoT (implicit sparsification)",
              "Every pruned linear layer was trained as a product `mask ⊙ weight` under PILoT's time-varying "
              "regularization, which steers the product towards sparse solutions (Jacobs & Burkholz, *Mask in "
              "the Mirror: Implicit Sparsification*, ICLR 2025). The entries with the smallest |mask ⊙ weight| "
              "were then set to zero and mask and weight merged back into one ordinary weight."),
    "spred": ("spred (ablation of PILoT)",
              "Trained as `mask ⊙ weight` from the balanced initialization with a constant L2 penalty (an explicit "
              "L1 solver, Ziyin & Wang 2023), then pruned by |mask ⊙ weight|."),
    "l1": ("Explicit L1 (ablation of PILoT)",
           "Trained with an L1 penalty on the plain weights under PILoT's α schedule, then pruned by magnitude."),
    "gmp": ("Gradual magnitude pruning",
            "Trained while the smallest |weight| were set to zero step by step, following the cubic sparsity "
            "schedule of Zhu & Gupta (2017), with pruned weights held at zero, up to the target sparsity."),
    "finetune": ("Fine-tuning, then magnitude pruning",
                 "Plain fine-tuning of the weights, then the smallest |weight| were set to zero."),
    "magnitude": ("Magnitude pruning (one-shot)",
                  "The weights with the smallest absolute values were set to zero, without retraining."),
    "wanda": ("Wanda (one-shot)",
              "Weights were ranked by |weight| x the norm of their input activations on calibration data, "
              "and the lowest were set to zero, without retraining."),
    "sparsegpt": ("SparseGPT (one-shot)",
                  "Weights were pruned layer by layer with SparseGPT's second-order reconstruction on "
                  "calibration data."),
}


def check_trained_method(method: str) -> str:
    if method == "dense":  # the name this method had before 0.2
        raise ValueError("method='dense' is now called 'finetune' (plain fine-tuning, then magnitude pruning); "
                         "'dense' only names the unpruned model.")
    if method not in TRAINED_METHODS:
        raise ValueError(f"method={method!r}; use one of {TRAINED_METHODS}.")
    return method


def check_warm_start(warm_start: str | None) -> str | None:
    if warm_start is not None and warm_start not in WARM_STARTS:
        raise ValueError(f"warm_start={warm_start!r}; use one of {WARM_STARTS} (or leave it unset to start from "
                         "the dense model).")
    return warm_start


@dataclass(frozen=True)
class MethodSpec:
    """A method as a sweep names it: 'dense', a one-shot method, or a trained method with its options,
    '<trained>[+<warm start>][+fixed][+ham][+kd]' (written in that order; '+fixed' only as 'finetune+<warm
    start>+fixed')."""

    name: str
    warm_start: str | None = None
    distill: bool = False
    ham: bool = False
    fixed: bool = False

    @classmethod
    def parse(cls, spec: str) -> MethodSpec:
        name, *rest = str(spec).split("+")
        warm_start = rest.pop(0) if rest and rest[0] in WARM_STARTS else None
        fixed = rest[:1] == [FIXED]
        if fixed:
            rest = rest[1:]
        known = (DENSE, *ONESHOT_METHODS, *TRAINED_METHODS)
        if name not in known or (rest or warm_start) and name not in TRAINED_METHODS \
                or rest not in ([], [HAM], [DISTILLED], [HAM, DISTILLED]):
            examples = ", ".join([*known, "pilot+wanda", "pilot+wanda+kd", "gmp+ham", "finetune+sparsegpt+fixed",
                                  "finetune+wanda+ham"])
            raise ValueError(f"unknown method {spec!r}; choose among {examples} (a trained method may start "
                             f"from a one-shot one, '<trained>+<{'|'.join(WARM_STARTS)}>', keep that start's pattern "
                             f"fixed, 'finetune+<one-shot>+{FIXED}', add HAM, '...+{HAM}', and distil from the dense "
                             f"model, '...+{DISTILLED}', in this order).")
        if fixed and (name != "finetune" or warm_start is None):
            raise ValueError(f"method {spec!r}: '+{FIXED}' keeps a one-shot start's pattern while fine-tuning, so it "
                             f"only follows 'finetune+<{'|'.join(WARM_STARTS)}>' (e.g. finetune+sparsegpt+{FIXED}); "
                             "the other trained methods choose their own zeros.")
        return cls(name, warm_start, DISTILLED in rest, HAM in rest, fixed)

    def __str__(self) -> str:
        return "+".join([self.name, *([self.warm_start] if self.warm_start else []), *([FIXED] if self.fixed else []),
                         *([HAM] if self.ham else []), *([DISTILLED] if self.distill else [])])

    @property
    def trained(self) -> bool:
        return self.name in TRAINED_METHODS

    @property
    def oneshot(self) -> str | None:
        """The one-shot method this cell prunes with first (itself, or its warm start), if any."""
        return self.name if self.name in ONESHOT_METHODS else self.warm_start

    @property
    def calibrates(self) -> bool:
        return self.oneshot in CALIBRATED_METHODS


ALL_METHODS = (DENSE, *ONESHOT_METHODS, *TRAINED_METHODS,
               *(f"{t}+{w}" for t in TRAINED_METHODS for w in WARM_STARTS))  # trained ones also "+ham", "+kd"; finetune+<one-shot> also "+fixed"
