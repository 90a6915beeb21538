"""PILoTTrainingArguments: TrainingArguments plus the PILoT settings (METHOD.md, sections 3-6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .config import ALL_LINEAR, PILoTConfig
from .pruning import SparsityPattern
from .regularization import SCHEDULES

METHODS = ("pilot", "spred", "l1", "dense")
# What each ablation means when its knobs are left unset.
_METHOD_DEFAULTS = {
    "pilot": {"alpha_schedule": "pilot", "init": "pilot"},  # PILoT init + adaptive α
    "spred": {"alpha_schedule": "constant", "init": "spred"},  # balanced init + constant α
    "l1": {"alpha_schedule": "pilot", "init": None},  # explicit L1 on dense weights, same α machinery
    "dense": {"alpha_schedule": "none", "init": None},  # plain fine-tuning, then magnitude pruning
}
REGULARIZATIONS = ("coupled", "decoupled")
TENSORWISE_OPTIMS = ("adamw_torch", "adamw_torch_fused")  # the optimizers TensorwiseAdamW stands in for
DEFAULT_SPARSITY = 0.5

# The settings that define a PILoT run: resuming a checkpoint made with other values is refused.
PILOT_SETTINGS = (
    "sparsity", "sparsity_pattern", "method", "alpha_init", "alpha_schedule", "alpha_final", "alpha_min",
    "alpha_max", "delta", "alpha_update_interval", "l1_ratio_threshold", "loss_tolerance", "regularization",
    "mask_learning_rate", "weight_learning_rate", "tensorwise_second_moment", "recovery_steps", "beta", "init",
    "target_modules", "target_regex", "exclude_modules",
)


@dataclass
class PILoTTrainingArguments(TrainingArguments):
    """`TrainingArguments` for `PILoTTrainer`. Every field below has a command-line flag of the same name."""

    sparsity: float | None = field(
        default=DEFAULT_SPARSITY,
        metadata={"help": "Fraction of target weights removed at the end of training, in (0, 1). None: train "
                  "the masks but do not prune. N:M patterns set it to (M-N)/M."},
    )
    sparsity_pattern: str = field(
        default="unstructured",
        metadata={"help": "'unstructured' (exact per layer), 'global', 'row' (per output row) or 'N:M' (e.g. '2:4')."},
    )
    method: str = field(
        default="pilot",
        metadata={"help": "pilot (PILoT init + adaptive α), spred (balanced init + constant α), l1 (explicit L1 on "
                  "the dense weights, same schedules), dense (plain fine-tuning, then magnitude pruning)."},
    )
    alpha_init: float = field(default=1e-4, metadata={"help": "α at step 0 (the regularization strength)."})
    alpha_schedule: str | None = field(
        default=None,
        metadata={"help": f"One of {SCHEDULES}; default by method (pilot/l1: pilot, spred: constant, dense: none)."},
    )
    alpha_final: float = field(
        default=0.0, metadata={"help": "α at the last step for linear/cosine/exponential (exponential needs > 0)."}
    )
    alpha_min: float = field(default=0.0, metadata={"help": "Lower clamp of α."})
    alpha_max: float = field(default=1.0, metadata={"help": "Upper clamp of α."})
    delta: float = field(default=2.0, metadata={"help": "PILoT controller factor δ > 1: α·δ up, α/δ down."})
    alpha_update_interval: int = field(
        default=10, metadata={"help": "Optimizer steps per controller decision (the paper's 'epoch')."}
    )
    l1_ratio_threshold: float | None = field(
        default=None,
        metadata={"help": "K: α may rise only while ‖m⊙w‖₁/‖W_init‖₁ ≥ K. Default: the L1 share of the weights "
                  "that pruning W_init at the target sparsity would keep (so α stops rising once as much L1 "
                  "mass is gone as pruning would remove)."},
    )
    loss_tolerance: float = field(
        default=0.0,
        metadata={"help": "Relative tolerance: an interval 'improves' if its mean loss ≤ previous·(1+tol)."},
    )
    regularization: str = field(
        default="coupled",
        metadata={"help": "coupled: add 2α·p to each mask/weight gradient (the paper's objective); decoupled: "
                  "p ← p·(1 − 2·lr·α) at each step (AdamW-style)."},
    )
    mask_learning_rate: float | None = field(
        default=1e-3,
        metadata={"help": "Learning rate of the masks (their own parameter group; masks start near 1 while weights "
                  "are ~0.1, see METHOD.md section 8). Default 1e-3: with Adam, 3e-2 moved every mask by ~3% per "
                  "step and wrecked SmolLM2 (docs/BENCHMARKS.md). None: same as learning_rate."},
    )
    weight_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the target layers' weights (w in m⊙w; the plain weights for l1/dense), in "
                  "their own group. None: same as learning_rate. Lets the sparsified layers move faster than "
                  "embeddings and norms."},
    )
    tensorwise_second_moment: bool = field(
        default=False,
        metadata={"help": "Masks and target weights keep one Adam second moment per tensor instead of per entry, "
                  "so updates inside a tensor stay proportional to gradients, as in the gradient flow PILoT's "
                  "theory assumes (pilot_hf.optim.TensorwiseAdamW). Needs optim='adamw_torch'. Experimental: on SmolLM2 it "
                  "did worse than entrywise AdamW (docs/BENCHMARKS.md section 2)."},
    )
    recovery_steps: int = field(
        default=0,
        metadata={"help": "The last N optimizer steps fine-tune with the pruning pattern frozen (regularization "
                  "off, pruned weights stay exactly 0). Counted inside max_steps; needs a sparsity."},
    )
    beta: float = field(default=1.0, metadata={"help": "PILoT init scale β > 0 (mask0² − weight0² = β)."})
    init: str | None = field(default=None, metadata={"help": "pilot or spred; default by method."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Layers to sparsify, by name or suffix (e.g. q_proj v_proj). Default: every linear layer "
                  "of the decoder blocks."},
    )
    target_regex: str | None = field(
        default=None, metadata={"help": "Alternatively, one regex over full module names."}
    )
    exclude_modules: list[str] | None = field(default=None, metadata={"help": "Layers never to sparsify."})

    def __post_init__(self):
        super().__post_init__()
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}; use one of {METHODS}.")
        defaults = _METHOD_DEFAULTS[self.method]
        if self.alpha_schedule is None:
            self.alpha_schedule = defaults["alpha_schedule"]
        if self.init is None:
            self.init = defaults["init"]
        if self.alpha_schedule not in SCHEDULES:
            raise ValueError(f"alpha_schedule={self.alpha_schedule!r}; use one of {SCHEDULES}.")
        if self.method == "dense" and self.alpha_schedule != "none":
            raise ValueError("method='dense' is plain fine-tuning: leave alpha_schedule unset (or 'none').")
        if self.tensorwise_second_moment and str(getattr(self.optim, "value", self.optim)) not in TENSORWISE_OPTIMS:
            raise ValueError(f"tensorwise_second_moment replaces AdamW; it needs optim in {TENSORWISE_OPTIMS}, "
                             f"got optim={getattr(self.optim, 'value', self.optim)!r}.")
        if self.regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization={self.regularization!r}; use one of {REGULARIZATIONS}.")

        pattern = SparsityPattern.parse(self.sparsity_pattern)
        self.sparsity_pattern = str(pattern)
        if pattern.is_nm and self.sparsity == DEFAULT_SPARSITY:  # the pattern decides; 0.5 was only the default
            self.sparsity = None
        if self.sparsity is not None or pattern.is_nm:
            self.sparsity = pattern.resolve_sparsity(self.sparsity)

        _positive = {"alpha_max": self.alpha_max, "delta": self.delta, "beta": self.beta}
        for name, value in _positive.items():
            if not (value > 0 and value < float("inf")):
                raise ValueError(f"{name}={value!r} must be a finite number > 0.")
        if self.delta <= 1:
            raise ValueError(f"delta={self.delta!r}: the controller multiplies/divides α by δ, so δ must be > 1 "
                             "(e.g. 1.5 or 2).")
        if self.alpha_schedule != "none":
            if not 0 <= self.alpha_min <= self.alpha_init <= self.alpha_max:
                raise ValueError(f"need 0 ≤ alpha_min ≤ alpha_init ≤ alpha_max, got alpha_min={self.alpha_min}, "
                                 f"alpha_init={self.alpha_init}, alpha_max={self.alpha_max}.")
            if self.alpha_init <= 0:
                raise ValueError(f"alpha_init={self.alpha_init}: give α > 0, or alpha_schedule='none' to train "
                                 "without regularization.")
        if self.alpha_final < 0 or (self.alpha_schedule == "exponential" and self.alpha_final <= 0):
            raise ValueError(f"alpha_final={self.alpha_final}: must be ≥ 0 (> 0 for the exponential schedule).")
        if self.alpha_update_interval < 1:
            raise ValueError(f"alpha_update_interval={self.alpha_update_interval}: must be ≥ 1 optimizer step.")
        if self.l1_ratio_threshold is not None and not 0 < self.l1_ratio_threshold <= 1:
            raise ValueError(f"l1_ratio_threshold={self.l1_ratio_threshold}: K is a ratio in (0, 1].")
        if self.loss_tolerance < 0:
            raise ValueError(f"loss_tolerance={self.loss_tolerance}: must be ≥ 0.")
        if self.mask_learning_rate is not None and not self.mask_learning_rate > 0:
            raise ValueError(f"mask_learning_rate={self.mask_learning_rate}: must be > 0 (or None for learning_rate).")
        if self.recovery_steps < 0:
            raise ValueError(f"recovery_steps={self.recovery_steps}: must be ≥ 0.")
        if self.recovery_steps and self.sparsity is None:
            raise ValueError("recovery_steps > 0 fine-tunes with a frozen pruning pattern, so it needs a target: "
                             "set sparsity (e.g. 0.5) or an N:M sparsity_pattern.")
        if self.recovery_steps and self.max_steps > 0 and self.recovery_steps >= self.max_steps:
            raise ValueError(f"recovery_steps={self.recovery_steps} must be < max_steps={self.max_steps}: recovery "
                             "is the last part of the run, after the sparsification phase.")
        if self.target_modules is not None and self.target_regex is not None:
            raise ValueError("give target_modules (names) or target_regex, not both.")
        self.pilot_config()  # validates targets, beta and init

    @property
    def reparameterized(self) -> bool:
        """pilot and spred train mask ⊙ weight; l1 and dense train the plain weights."""
        return self.method in ("pilot", "spred")

    def pilot_config(self) -> PILoTConfig:
        """The wrapping config these arguments describe."""
        targets = self.target_regex or self.target_modules or ALL_LINEAR
        return PILoTConfig(target_modules=targets, exclude_modules=self.exclude_modules, beta=self.beta,
                           init=self.init or "pilot")

    def pilot_settings(self) -> dict:
        return {name: getattr(self, name) for name in PILOT_SETTINGS}
