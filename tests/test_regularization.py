import math

import pytest

from pilot_hf.regularization import AlphaController


def pilot(**kw):
    base = dict(schedule="pilot", alpha_init=1e-3, delta=2.0, interval=1, l1_ratio_threshold=0.5,
                loss_tolerance=0.0, total_steps=10, alpha_max=1.0)
    base.update(kw)
    return AlphaController(**base)


def test_pilot_follows_algorithm_1_on_a_scripted_sequence():
    c = pilot()
    # step, interval mean loss, l1 ratio -> expected decision
    script = [
        (1, 5.0, 0.9, "up"),    # first interval: nothing to compare with, above K, first half
        (2, 4.0, 0.8, "up"),    # improving, above K
        (3, 4.5, 0.8, "down"),  # loss got worse
        (4, 4.4, 0.7, "up"),    # improving again
        (5, 4.3, 0.4, "down"),  # sparse enough: L1 ratio below K
        (6, 4.2, 0.9, "down"),  # second half (6 > 10/2) always decays
        (7, 4.1, 0.9, "down"),
    ]
    alpha = 1e-3
    for step, loss, l1, expected in script:
        new = c.step_end(step, loss, l1)
        alpha = alpha * 2 if expected == "up" else alpha / 2
        assert c.history[-1][2] == expected, (step, c.history)
        assert new == pytest.approx(alpha)


def test_pilot_tolerance_and_interval_and_clamp():
    c = pilot(interval=5, loss_tolerance=0.1, alpha_max=2e-3, alpha_min=5e-4)
    for step in range(1, 5):  # no decision between interval ends
        assert c.step_end(step) == 1e-3
    assert c.step_end(5, 10.0, 0.9) == 2e-3  # up
    c.total_steps = 100
    assert c.step_end(10, 10.9, 0.9) == 2e-3  # within 10% tolerance counts as improving; clamped at alpha_max
    assert c.step_end(15, 12.5, 0.9) == 1e-3  # worse by more than 10%
    assert c.step_end(20, 99.0, 0.9) == 5e-4
    assert c.step_end(25, 999.0, 0.9) == 5e-4  # clamped at alpha_min
    with pytest.raises(ValueError, match="mean loss"):
        c.step_end(30)


@pytest.mark.parametrize("schedule,mid,end", [
    ("constant", 1e-2, 1e-2),
    ("linear", 0.5 * (1e-2 + 1e-4), 1e-4),
    ("cosine", 0.5 * (1e-2 + 1e-4), 1e-4),
    ("exponential", math.sqrt(1e-2 * 1e-4), 1e-4),
    ("none", 0.0, 0.0),
])
def test_fixed_schedules(schedule, mid, end):
    c = AlphaController(schedule=schedule, alpha_init=1e-2, alpha_final=1e-4, total_steps=100)
    assert c.alpha == (0.0 if schedule == "none" else 1e-2)
    assert c.step_end(50) == pytest.approx(mid)
    assert c.step_end(100) == pytest.approx(end)
    assert c.step_end(150) == pytest.approx(end)  # held after the end


def test_state_round_trip():
    c = pilot()
    c.step_end(1, 3.0, 0.9)
    c.step_end(2, 4.0, 0.9)
    d = AlphaController.from_state_dict(c.state_dict())
    assert d == c
    assert d.step_end(3, 3.5, 0.9) == c.step_end(3, 3.5, 0.9)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="alpha_schedule"):
        AlphaController(schedule="warmup")
