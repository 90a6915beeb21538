"""PILoTTrainingArguments: TrainingArguments plus the PILoT settings (docs/METHOD.md, sections 3-6 and 10)."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments
from transformers.trainer_utils import SaveStrategy, SchedulerType

from .config import ALL_LINEAR, PILoTConfig
from .distillation import RECIPE_LOSS_WEIGHTS, default_lm_loss_weight
from .methods import WARM_STARTS, check_trained_method, check_warm_start
from .pruning import SparsityPattern
from .regularization import SCHEDULES
from .wrapping import weight_rms

logger = logging.getLogger(__name__)

# What each trained method means when its knobs are left unset.
_METHOD_DEFAULTS = {
    "pilot": {"alpha_schedule": "pilot", "init": "pilot"},  # PILoT init + adaptive α
    "spred": {"alpha_schedule": "constant", "init": "spred"},  # balanced init + constant α
    "l1": {"alpha_schedule": "pilot", "init": None},  # explicit L1 on dense weights, same α machinery
    "gmp": {"alpha_schedule": "none", "init": None},  # gradual magnitude pruning (cubic schedule)
    "finetune": {"alpha_schedule": "none", "init": None},  # plain fine-tuning, then magnitude pruning
}
REGULARIZATIONS = ("coupled", "decoupled")
TENSORWISE_OPTIMS = ("adamw_torch", "adamw_torch_fused")  # the optimizers TensorwiseAdamW stands in for
TEACHER_DTYPES = (None, "float32", "bfloat16", "float16")

# The run settings record: everything that defines a trained result. Resuming a checkpoint made with other
# values is refused; the model card, run_config.json and the sweep's cells record exactly these. HAM's settings
# (HAM_SETTINGS) join it when ham is on, so records of runs without HAM read as before.
RUN_SETTINGS = (
    "method", "warm_start", "num_calibration_samples", "sparsity", "sparsity_pattern",
    "alpha_init", "alpha_schedule", "alpha_final", "alpha_min", "alpha_max", "delta", "alpha_update_interval",
    "l1_ratio_threshold", "loss_tolerance", "regularization", "mask_learning_rate", "weight_learning_rate",
    "tensorwise_second_moment", "recovery_steps", "keep_zeros", "gmp_interval", "gmp_start_step", "gmp_initial_sparsity",
    "beta", "init", "target_modules", "target_regex",
    "exclude_modules", "lm_loss_weight", "distill_logit_weight", "distill_feature_weight", "distill_temperature",
    "teacher_model_name_or_path", "teacher_dtype", "teacher_sample_share",
    # the training budget and optimizer (TrainingArguments' own fields)
    "learning_rate", "weight_decay", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_steps", "optim", "max_grad_norm", "seed", "bf16",
)
HAM_SETTINGS = ("ham", "ham_alpha", "ham_beta")


@dataclass
class PILoTTrainingArguments(TrainingArguments):
    """`TrainingArguments` for `PILoTTrainer`. Every field below has a command-line flag of the same name.

    The defaults are the best recipe the benchmarks know (docs/DESIGN.md, "Defaults"): a Wanda warm start,
    32 steps of AdamW at a constant learning rate of 5e-4 x the RMS of the target weights (about 1e-4 on
    SmolLM2-135M) with the last quarter as recovery, and the LM loss plus distillation from the model as given. The CLI,
    the demo and the Python API all start from these same values.
    """

    # ----- the recipe's budget and optimizer: TrainingArguments' own fields, with pilot-hf's defaults -----
    max_steps: int = field(default=32, metadata={
        "help": "Optimizer steps (the budget). Default 32: the benchmarks' budget (docs/BENCHMARKS.md). -1: train "
                "for num_train_epochs instead."})
    num_train_epochs: float = field(default=3.0, metadata={
        "help": "Epochs to train; used only with max_steps -1 (pilot-hf's default is a step budget)."})
    per_device_train_batch_size: int = field(default=4, metadata={
        "help": "Blocks per device and step (the benchmarks: 4 blocks of 256 tokens)."})
    learning_rate: float | None = field(default=None, metadata={
        "help": "Learning rate of the weights (masks: mask_learning_rate). Default: relative_learning_rate times "
                "the RMS of the target weights of the model as given."})
    relative_learning_rate: float = field(default=5e-4, metadata={
        "help": "Used when learning_rate is not given: the learning rate is this share of the root mean square of "
                "the target layers' weights in the model as given (before any pruning), to 3 significant digits. "
                "Adam moves every entry by about lr per step, so this fixes the step relative to the weights' size: "
                "5e-4 gives 9.67e-5 on SmolLM2-135M (RMS 0.193) and 1.72e-5 on Gemma 3 270M (RMS 0.034), each "
                "model at or between the best of its searched rates (docs/BENCHMARKS.md section 13)."})
    lr_scheduler_type: SchedulerType | str = field(default="constant", metadata={
        "help": "The learning-rate schedule (see transformers' SchedulerType). Default constant, as benchmarked."})
    logging_steps: float = field(default=4, metadata={
        "help": "Log every N optimizer steps (or, below 1, that share of the run)."})
    save_strategy: SaveStrategy | str = field(default="no", metadata={
        "help": "Trainer checkpoints: 'no' (default: the result is saved anyway), 'steps' (every save_steps, for "
                "long runs you may want to resume), 'epoch' or 'best'."})

    # ----- PILoT -----

    sparsity: float | None = field(
        default=None,
        metadata={"help": "Fraction of target weights removed at the end of training, in (0, 1). Default 0.5; "
                  "N:M patterns fix it to (M-N)/M. 0: train, but do not prune."},
    )
    sparsity_pattern: str = field(
        default="unstructured",
        metadata={"help": "'unstructured' (exact per layer), 'global', 'row' (per output row) or 'N:M' (e.g. '2:4')."},
    )
    method: str = field(
        default="pilot",
        metadata={"help": "pilot (PILoT init + adaptive α), spred (balanced init + constant α), l1 (explicit L1 on "
                  "the plain weights, same schedules), gmp (gradual magnitude pruning, cubic schedule), finetune "
                  "(plain fine-tuning, then magnitude pruning)."},
    )
    warm_start: str | None = field(
        default="wanda",
        metadata={"help": "Start from a one-shot pruned model instead of the dense one (docs/METHOD.md section 2): "
                  "'wanda' (default), 'sparsegpt' or 'magnitude', at the target sparsity and pattern, calibrated on "
                  "num_calibration_samples blocks of the training data; pruned weights start at 0 and may regrow. "
                  "'none': from the dense model (needed with sparsity 0; method gmp means to start dense too)."},
    )
    num_calibration_samples: int = field(
        default=32, metadata={"help": "Training blocks used as calibration data by a wanda/sparsegpt warm start."})
    alpha_init: float = field(default=1e-4, metadata={"help": "α at step 0 (the regularization strength)."})
    alpha_schedule: str | None = field(
        default=None,
        metadata={"help": f"One of {SCHEDULES}; default by method (pilot/l1: pilot, spred: constant, finetune: none)."},
    )
    alpha_final: float = field(
        default=0.0, metadata={"help": "α at the last step for linear/cosine/exponential (exponential needs > 0)."}
    )
    alpha_min: float = field(default=0.0, metadata={"help": "Lower clamp of α."})
    alpha_max: float = field(default=1.0, metadata={"help": "Upper clamp of α."})
    delta: float = field(default=2.0, metadata={"help": "PILoT controller factor δ > 1: α·δ up, α/δ down."})
    alpha_update_interval: int | None = field(
        default=None, metadata={"help": "Optimizer steps per controller decision (the paper's 'epoch'). Default: "
                                "an eighth of max_steps (4 of 32, as benchmarked); 10 when training by epochs."}
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
                  "are ~0.1, see docs/METHOD.md section 8). Default 1e-3: with Adam, 3e-2 moved every mask by ~3% per "
                  "step and wrecked SmolLM2 (docs/BENCHMARKS.md). None: same as learning_rate."},
    )
    weight_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the target layers' weights (w in m⊙w; the plain weights for l1/finetune), in "
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
    recovery_steps: int | None = field(
        default=None,
        metadata={"help": "The last N optimizer steps fine-tune with the pruning pattern frozen (regularization "
                  "off, pruned weights stay exactly 0). Counted inside max_steps; needs a sparsity. Default: a "
                  "quarter of max_steps (8 of 32, as benchmarked); 0 with sparsity 0 or when training by epochs."},
    )
    keep_zeros: bool = field(
        default=False,
        metadata={"help": "Fine-tune an already sparse model without losing its zeros: every target weight that is 0 "
                  "when training starts stays exactly 0 (re-applied after each optimizer step, Adam's momentum "
                  "included). Needs method='finetune': with sparsity=0 on a model pruned elsewhere, or with a "
                  "sparsity and a warm_start, whose one-shot pattern then stays fixed (one-shot + fine-tuning with a "
                  "fixed mask; recovery_steps defaults to 0, since the pattern never changes)."})
    gmp_interval: int = field(
        default=10, metadata={"help": "method=gmp: optimizer steps between pruning events (Zhu & Gupta's Δt)."})
    gmp_start_step: int = field(default=0, metadata={"help": "method=gmp: the step of the first pruning event."})
    gmp_initial_sparsity: float = field(
        default=0.0, metadata={"help": "method=gmp: the schedule's starting sparsity s_i; it reaches the target "
                               "with a cubic curve at the end of the sparsification phase (max_steps − "
                               "recovery_steps)."})
    ham: bool | None = field(
        default=None,
        metadata={"help": "HAM (Hyperbolic Aware Minimization, Jacobs et al. ICLR 2026): after every optimizer step, "
                  "scale each target weight by exp(clamp(−lr·(ham_alpha·sign(w)·g/RMS(g) + ham_beta), −5, 5)), g its "
                  "gradient, RMS over the tensor (docs/METHOD.md section 11). Multiplicative: zeros stay zeros. For "
                  "pilot/spred the product mask ⊙ weight is scaled (through the weight). Any trained method. "
                  "Default: on when the run prunes (a sparsity or an N:M pattern), off when it does not (sparsity 0, "
                  "e.g. `pilot-hf finetune`): from a Wanda start at 50%, 70% and 2:4 it lowered every held-out text "
                  "(docs/BENCHMARKS.md section 12, part 2). --ham false turns it off."})
    ham_alpha: float = field(
        default=1.0,
        metadata={"help": "HAM's gradient term, in learning-rate units: 1 scales an entry whose gradient has the "
                  "tensor's RMS size by exp(±lr) per step (Adam moves it by about lr, so HAM's step is ham_alpha·|w| "
                  "times Adam's). Default chosen on validation text (docs/METHOD.md section 11)."})
    ham_beta: float = field(
        default=0.0,
        metadata={"help": "HAM's shrinkage: every target weight is scaled by exp(−lr·ham_beta) per step (a "
                  "multiplicative weight decay; the authors' β=1e-3 at lr 0.1 is ham_beta=1 at lr 1e-4)."})
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
    lm_loss_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the language-modeling loss on the training text. Default 4 beside "
                  "distill_logit_weight 1 and distill_feature_weight 1: learns the text as well as the LM loss "
                  "alone while the teacher keeps text of other domains below the one-shot start "
                  "(docs/BENCHMARKS.md section 13); 1 when both distillation weights are 0 (the LM loss alone, no "
                  "teacher: specializes the model to the text). 0: pure distillation (recover the model as given, "
                  "learn nothing of the text)."})
    distill_logit_weight: float = field(
        default=RECIPE_LOSS_WEIGHTS["distill_logit_weight"],
        metadata={"help": "Weight of logit distillation from the teacher: T²·KL(teacher ‖ student) of the "
                  "temperature-scaled next-token distributions, per labeled token (docs/METHOD.md section 10). "
                  "0: off."})
    distill_feature_weight: float = field(
        default=RECIPE_LOSS_WEIGHTS["distill_feature_weight"],
        metadata={"help": "Weight of SquareHead feature distillation: per decoder block, the MSE between student and "
                  "teacher hidden states divided by the teacher's mean square, averaged over blocks. 0: off."})
    distill_temperature: float = field(default=1.0, metadata={"help": "Temperature T of logit distillation."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The teacher for distillation: a model folder or Hub id with the student's tokenizer. "
                  "Default: a frozen copy of the model as given to the trainer (before any warm-start pruning)."})
    teacher_dtype: str | None = field(
        default=None, metadata={"help": "Hold the teacher in this dtype (bfloat16 halves its memory); default: "
                                "the dtype it was loaded in."})

    teacher_sample_share: float = field(
        default=0.0,
        metadata={"help": "Share of the training blocks the run sees that the teacher wrote itself: sampled once "
                  "before training (from the document separator, temperature 1) and mixed into the training text, "
                  "so that distillation also covers what the model knew, not only the user's text. Needs "
                  "distillation and max_steps. 0: off; 1: teacher text only."})

    def __post_init__(self):
        super().__post_init__()
        check_trained_method(self.method)
        if isinstance(self.warm_start, str) and self.warm_start.lower() == "none":  # the command line's word for None
            self.warm_start = None
        check_warm_start(self.warm_start)
        defaults = _METHOD_DEFAULTS[self.method]
        if self.alpha_schedule is None:
            self.alpha_schedule = defaults["alpha_schedule"]
        if self.init is None:
            self.init = defaults["init"]
        if self.alpha_schedule not in SCHEDULES:
            raise ValueError(f"alpha_schedule={self.alpha_schedule!r}; use one of {SCHEDULES}.")
        if self.method in ("finetune", "gmp") and self.alpha_schedule != "none":
            raise ValueError(f"method={self.method!r} has no regularization: leave alpha_schedule unset (or 'none').")
        if self.tensorwise_second_moment and str(getattr(self.optim, "value", self.optim)) not in TENSORWISE_OPTIMS:
            raise ValueError(f"tensorwise_second_moment replaces AdamW; it needs optim in {TENSORWISE_OPTIMS}, "
                             f"got optim={getattr(self.optim, 'value', self.optim)!r}.")
        if self.regularization not in REGULARIZATIONS:
            raise ValueError(f"regularization={self.regularization!r}; use one of {REGULARIZATIONS}.")

        pattern = SparsityPattern.parse(self.sparsity_pattern)
        self.sparsity_pattern = str(pattern)
        if self.sparsity == 0 and not isinstance(self.sparsity, bool):  # train without pruning
            if pattern.is_nm:
                raise ValueError(f"sparsity=0 means 'do not prune', but pattern {pattern} prunes (M-N)/M; drop one.")
            self.sparsity = 0.0
        else:
            self.sparsity = pattern.resolve_sparsity(self.sparsity)
        if self.warm_start and not self.prunes:
            raise ValueError(f"warm_start={self.warm_start!r} prunes to the target sparsity first; give a sparsity, "
                             "or warm_start=None ('none' on the command line) to train without pruning.")
        self._resolve_budget_shares()
        if self.ham is None:
            self.ham = self._default_ham()
        if self.warm_start:
            pattern.check_method(self.warm_start, f"a {self.warm_start} warm start")
        if self.method == "gmp":
            if not self.prunes or pattern.is_nm:
                raise ValueError("method='gmp' raises the sparsity gradually to a target: give a sparsity > 0 with an "
                                 "unstructured, row or global pattern (its schedule has no N:M intermediate steps).")
            if self.gmp_interval < 1 or self.gmp_start_step < 0 or not 0 <= self.gmp_initial_sparsity < self.sparsity:
                raise ValueError(f"gmp needs gmp_interval ≥ 1 (got {self.gmp_interval}), gmp_start_step ≥ 0 (got "
                                 f"{self.gmp_start_step}) and 0 ≤ gmp_initial_sparsity < sparsity (got "
                                 f"{self.gmp_initial_sparsity} vs {self.sparsity}).")
        if self.keep_zeros and (self.method != "finetune" or self.prunes and not self.warm_start):
            raise ValueError("keep_zeros fine-tunes with the zeros a model has when training starts held at 0: use it "
                             "with method='finetune', either on a model that is already sparse (sparsity=0, e.g. after "
                             "`pilot-hf oneshot`) or after a one-shot warm start (a sparsity and a warm_start of "
                             f"{WARM_STARTS}: the one-shot pattern then stays fixed for the whole run; in a sweep, "
                             "name such a cell finetune+<one-shot>+fixed).")
        if self.num_calibration_samples < 1:
            raise ValueError(f"num_calibration_samples={self.num_calibration_samples}: must be ≥ 1.")
        if self.lm_loss_weight is None:
            self.lm_loss_weight = default_lm_loss_weight(self.distills)
        for name in ("lm_loss_weight", "distill_logit_weight", "distill_feature_weight"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"{name}={value!r}: must be a finite number ≥ 0 (0 turns that term off).")
        if self.lm_loss_weight == 0 and not self.distills:
            raise ValueError("lm_loss_weight=0 leaves no loss: turn distillation on (distill_logit_weight or "
                             "distill_feature_weight > 0) or keep the LM loss.")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature={self.distill_temperature!r}: must be > 0 (1 is the plain "
                             "distributions).")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype={self.teacher_dtype!r}; use one of {TEACHER_DTYPES}.")
        if (self.teacher_model_name_or_path or self.teacher_dtype) and not self.distills:
            raise ValueError("a teacher is only used for distillation: set distill_logit_weight or "
                             "distill_feature_weight > 0, or drop teacher_model_name_or_path/teacher_dtype.")

        if not 0 <= self.teacher_sample_share <= 1:
            raise ValueError(f"teacher_sample_share={self.teacher_sample_share!r}: must be in [0, 1] (a share of "
                             "the training blocks).")
        if self.teacher_sample_share > 0 and not self.distills:
            raise ValueError("teacher_sample_share samples text from the distillation teacher: set "
                             "distill_logit_weight or distill_feature_weight > 0, or teacher_sample_share=0.")
        if self.teacher_sample_share > 0 and self.max_steps <= 0:
            raise ValueError("teacher_sample_share is a share of the blocks the run sees, counted from max_steps: "
                             "give max_steps (> 0) instead of num_train_epochs.")
        for name in ("ham_alpha", "ham_beta"):
            value = getattr(self, name)
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"{name}={value!r}: must be a finite number ≥ 0.")
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
        if self.learning_rate is not None and not 0 < self.learning_rate < float("inf"):
            raise ValueError(f"learning_rate={self.learning_rate!r}: must be a finite number > 0 (or unset for "
                             "relative_learning_rate x the weights' RMS).")
        if not 0 < self.relative_learning_rate < float("inf"):
            raise ValueError(f"relative_learning_rate={self.relative_learning_rate!r}: must be a finite number > 0.")
        if self.mask_learning_rate is not None and not self.mask_learning_rate > 0:
            raise ValueError(f"mask_learning_rate={self.mask_learning_rate}: must be > 0 (or None for learning_rate).")
        if self.max_steps == 0:
            raise ValueError("max_steps=0 trains nothing; give the number of optimizer steps (≥ 1), or -1 to train "
                             "for num_train_epochs.")
        if self.recovery_steps < 0:
            raise ValueError(f"recovery_steps={self.recovery_steps}: must be ≥ 0.")
        if self.recovery_steps and not self.prunes:
            raise ValueError("recovery_steps > 0 fine-tunes with a frozen pruning pattern, so it needs a target: "
                             "set sparsity (e.g. 0.5) or an N:M sparsity_pattern.")
        if self.recovery_steps and self.max_steps > 0 and self.recovery_steps >= self.max_steps:
            raise ValueError(f"recovery_steps={self.recovery_steps} must be < max_steps={self.max_steps}: recovery "
                             "is the last part of the run, after the sparsification phase.")
        if self.target_modules is not None and self.target_regex is not None:
            raise ValueError("give target_modules (names) or target_regex, not both.")
        self.pilot_config()  # validates targets, beta and init

    def _resolve_budget_shares(self) -> None:
        """Recovery and the controller's interval default to shares of the step budget (the benchmarked 8 and
        4 of 32 steps), so a longer run keeps the recipe's proportions."""
        if self.recovery_steps is None:
            self.recovery_steps = self._default_recovery_steps()
        if self.alpha_update_interval is None:
            self.alpha_update_interval = max(1, self.max_steps // 8) if self.max_steps > 0 else 10

    def _default_recovery_steps(self) -> int:
        # a fixed one-shot pattern (keep_zeros after a warm start) has nothing left to recover from
        return self.max_steps // 4 if self.prunes and self.max_steps > 0 and not self.keep_zeros else 0

    def _default_ham(self) -> bool:
        return self.prunes  # measured where a run prunes; a sparse model's fine-tuning keeps the plain optimizer step

    @classmethod
    def from_training_args(cls, args: TrainingArguments, **pilot_fields) -> PILoTTrainingArguments:
        """These arguments from a plain `TrainingArguments` (its values kept; PILoT fields at their defaults
        unless given). Read field by field: `to_dict()` would hide hub_token and change enum types."""
        values = {f.name: getattr(args, f.name) for f in fields(TrainingArguments) if f.init}
        values.update(pilot_fields)
        return cls(**values)

    def with_method(self, method: str, **changes) -> PILoTTrainingArguments:
        """A copy for another trained method (a sweep cell): settings that only followed the old method's
        defaults (alpha_schedule, init) follow the new one's, and those that only followed the old target or
        distillation (recovery_steps, ham, lm_loss_weight) follow the new ones; everything else is kept unless in
        `changes`."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for key in ("alpha_schedule", "init"):
            if values[key] == _METHOD_DEFAULTS[self.method][key]:
                values[key] = None
        if values["recovery_steps"] == self._default_recovery_steps():  # follows the new target and keep_zeros
            values["recovery_steps"] = None
        if values["ham"] == self._default_ham():  # follows the new target
            values["ham"] = None
        if values["lm_loss_weight"] == default_lm_loss_weight(self.distills):  # follows distillation on or off
            values["lm_loss_weight"] = None
        return type(self)(**{**values, "method": method, **changes})

    def __getstate__(self):
        # Trainer pickles its arguments into every checkpoint and upload (training_args.bin): never the token.
        return {**self.__dict__, "hub_token": None}

    # copy.copy / copy.deepcopy would go through __getstate__ too: an in-memory copy keeps the token.
    def __copy__(self):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def for_wrapping(self, config: PILoTConfig) -> PILoTTrainingArguments:
        """A copy that records a model the user wrapped with `config`: its targets, exclusions, β and init are
        the run's, so the run settings record (checkpoints, resume check, card) says what ran."""
        targets = config.target_modules
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        values.update(target_modules=list(targets) if isinstance(targets, list) else None,
                      target_regex=targets if isinstance(targets, str) and targets != ALL_LINEAR else None,
                      exclude_modules=config.exclude_modules, init=config.init,
                      beta=config.beta if config.init == "pilot" else self.beta)
        return type(self)(**values)

    def for_model(self, model, config: PILoTConfig | None = None) -> PILoTTrainingArguments:
        """These arguments with the learning rate resolved for `model` as given: a copy with learning_rate =
        relative_learning_rate x RMS of its target weights, or these arguments unchanged if learning_rate is set."""
        if self.learning_rate is not None:
            return self
        resolved = copy.copy(self)
        rms = weight_rms(model, config or self.pilot_config())
        resolved.learning_rate = float(f"{self.relative_learning_rate * rms:.3g}")
        resolved.learning_rate_from_weights = True  # the run settings then record the rule beside the value
        logger.info("learning_rate %.3g = relative_learning_rate %g x RMS %.4g of the target weights",
                    resolved.learning_rate, self.relative_learning_rate, rms)
        return resolved

    @property
    def prunes(self) -> bool:
        """Whether training ends pruned to a target (sparsity 0 trains without pruning)."""
        return self.sparsity > 0

    @property
    def distills(self) -> bool:
        return self.distill_logit_weight > 0 or self.distill_feature_weight > 0

    @property
    def reparameterized(self) -> bool:
        """pilot and spred train mask ⊙ weight; l1 and dense train the plain weights."""
        return self.method in ("pilot", "spred")

    def pilot_config(self) -> PILoTConfig:
        """The wrapping config these arguments describe."""
        targets = self.target_regex or self.target_modules or ALL_LINEAR
        return PILoTConfig(target_modules=targets, exclude_modules=self.exclude_modules, beta=self.beta,
                           init=self.init or "pilot")

    def tokens_trained(self, steps: int, block_size: int) -> int:
        """Tokens trained on by all processes together in `steps` optimizer steps over blocks of `block_size`
        tokens (per device batch x processes x gradient accumulation): the one formula of every run record."""
        return steps * self.train_batch_size * self.world_size * self.gradient_accumulation_steps * block_size

    def run_settings(self) -> dict:
        """The run settings record (RUN_SETTINGS; relative_learning_rate when the learning rate comes from it;
        HAM_SETTINGS when ham is on), as plain JSON values."""
        relative = self.learning_rate is None or getattr(self, "learning_rate_from_weights", False)
        names = RUN_SETTINGS + (("relative_learning_rate",) if relative else ()) + (HAM_SETTINGS if self.ham else ())
        return {name: _plain(getattr(self, name)) for name in names}


def _plain(value):
    return getattr(value, "value", value)  # enums (optim, lr_scheduler_type) as their strings
