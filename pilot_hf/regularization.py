"""α_t: fixed schedules and the PILoT controller (docs/METHOD.md, section 5). Pure Python, unit-testable.

The trainer calls `AlphaController.step_end(step, mean_loss, l1_ratio)` once per optimizer step and
reads `alpha` for the next step. Only the `pilot` schedule looks at the loss and the L1 ratio.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

SCHEDULES = ("pilot", "constant", "linear", "cosine", "exponential", "none")


@dataclass
class AlphaController:
    """The regularization strength α_t over `total_steps` optimizer steps.

    pilot (Algorithm 1, adapted): every `interval` steps, α ← α·δ if the interval's mean training
    loss is no worse than the previous interval's (within `loss_tolerance`, relative), the L1 ratio
    ‖m ⊙ w‖₁ / ‖W_init‖₁ is still ≥ K, and we are in the first half of training; otherwise α ← α/δ.
    α is clamped to [alpha_min, alpha_max]. Fixed schedules go from alpha_init (step 0) to
    alpha_final (step total_steps).
    """

    schedule: str = "pilot"
    alpha_init: float = 1e-4
    alpha_final: float = 0.0
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    delta: float = 2.0
    interval: int = 10
    l1_ratio_threshold: float = 0.5
    loss_tolerance: float = 0.0
    total_steps: int = 1
    # State (saved in checkpoints).
    alpha: float = field(default=-1.0)
    previous_loss: float | None = None
    history: list = field(default_factory=list)  # [step, alpha, decision] per pilot decision

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"alpha_schedule={self.schedule!r}; use one of {SCHEDULES}.")
        if self.alpha < 0:
            self.alpha = self.alpha_at(0)

    def _clamp(self, alpha: float) -> float:
        return min(max(alpha, self.alpha_min), self.alpha_max)

    def alpha_at(self, step: int) -> float:
        """α of a fixed schedule at `step` (pilot: its current value)."""
        if self.schedule == "none":
            return 0.0
        if self.schedule == "pilot":
            return self._clamp(self.alpha if self.alpha >= 0 else self.alpha_init)
        t = min(max(step / max(self.total_steps, 1), 0.0), 1.0)
        a0, a1 = self.alpha_init, self.alpha_final
        if self.schedule == "constant":
            value = a0
        elif self.schedule == "linear":
            value = a0 + (a1 - a0) * t
        elif self.schedule == "cosine":
            value = a1 + (a0 - a1) * (1 + math.cos(math.pi * t)) / 2
        else:  # exponential decay from a0 to a1 > 0
            value = a0 * (a1 / a0) ** t
        return self._clamp(value)

    def decide(self, step: int, mean_loss: float, l1_ratio: float) -> str:
        """One decision of Algorithm 1 at the end of an interval: 'up' or 'down'."""
        improving = self.previous_loss is None or mean_loss <= self.previous_loss * (1 + self.loss_tolerance)
        first_half = step <= self.total_steps / 2
        up = improving and l1_ratio >= self.l1_ratio_threshold and first_half
        return "up" if up else "down"

    def step_end(self, step: int, mean_loss: float | None = None, l1_ratio: float | None = None) -> float:
        """Advance to the α used after optimizer step `step` (1-based). `mean_loss` and `l1_ratio` are the
        interval's values and only needed by the pilot schedule at interval ends."""
        if self.schedule != "pilot":
            self.alpha = self.alpha_at(step)
            return self.alpha
        if step % self.interval == 0:
            if mean_loss is None or l1_ratio is None:
                raise ValueError("the pilot schedule needs the interval's mean loss and L1 ratio")
            decision = self.decide(step, mean_loss, l1_ratio)
            self.alpha = self._clamp(self.alpha * self.delta if decision == "up" else self.alpha / self.delta)
            self.previous_loss = mean_loss
            self.history.append([step, self.alpha, decision])
        return self.alpha

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> AlphaController:
        return cls(**state)
