"""Schedules: pure functions of the position, phase order, ending at β = 1, the seed formula."""

import math

import pytest

from cvae.errors import CvaeError
from cvae.schedule import (
    BALANCED,
    FAST,
    QUALITY,
    SCHEDULES,
    ConstantSchedule,
    ProgressiveSchedule,
    SeedSchedule,
    make_schedule,
    parse_schedule_settings,
    schedule_from_json,
)


def trace(schedule, total, per_epoch=None):
    per_epoch = per_epoch or total
    return [schedule.at(s, total, s // per_epoch) for s in range(total)]


@pytest.mark.parametrize("total", [1, 2, 3, 7, 100, 2814])
def test_progressive_ends_at_beta_one_with_the_final_rate(total):
    s = ProgressiveSchedule(1e-3)
    phase, beta, lr = s.at(total - 1, total, 0)
    assert (phase, beta) == (QUALITY, 1.0)
    assert lr == pytest.approx(1e-3 * s.params["final_lr_mult"])


def test_progressive_phases_in_order_beta_monotone():
    s = ProgressiveSchedule(1e-3)
    points = trace(s, 1000)
    phases = [p for p, _, _ in points]
    order = [FAST, BALANCED, QUALITY]
    seen = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert seen == order
    betas = [b for _, b, _ in points]
    assert all(b2 >= b1 for b1, b2 in zip(betas, betas[1:]))
    assert betas[0] == pytest.approx(s.params["beta_start"])
    # phase sizes follow the fractions
    assert phases.count(FAST) == pytest.approx(1000 * s.params["fast"], abs=2)
    assert phases.count(BALANCED) == pytest.approx(1000 * s.params["balanced"], abs=2)
    # QUALITY: β = 1 and the learning rate only falls
    q = [(b, lr) for p, b, lr in points if p == QUALITY]
    assert all(b == 1.0 for b, _ in q)
    assert all(l2 <= l1 for (_, l1), (_, l2) in zip(q, q[1:]))


def test_progressive_is_continuous_at_phase_boundaries():
    s = ProgressiveSchedule(1e-3)
    points = trace(s, 100_000)
    for (p1, b1, l1), (p2, b2, l2) in zip(points, points[1:]):
        assert abs(b2 - b1) < 1e-3, (p1, p2, b1, b2)
        assert abs(l2 - l1) < 1e-6, (p1, p2, l1, l2)


def test_progressive_rates():
    s = ProgressiveSchedule(2e-3, fast=0.25, balanced=0.25, fast_lr_mult=3.0, final_lr_mult=0.1)
    assert s.at(0, 101, 0) == (FAST, pytest.approx(s.params["beta_start"]), pytest.approx(6e-3))
    phase, beta, lr = s.at(50, 101, 0)  # f = 0.5: the start of QUALITY
    assert (phase, beta, lr) == (QUALITY, 1.0, pytest.approx(2e-3))
    phase, beta, lr = s.at(75, 101, 0)  # half way through QUALITY: half the cosine
    assert lr == pytest.approx(2e-3 * (0.1 + 0.9 * 0.5))


def test_schedules_are_pure():
    for name in SCHEDULES:
        s = make_schedule(name, 1e-3)
        forward = [s.at(i, 500, i // 50) for i in range(500)]
        backward = [s.at(i, 500, i // 50) for i in reversed(range(500))][::-1]
        again = make_schedule(name, 1e-3)
        assert forward == backward == [again.at(i, 500, i // 50) for i in range(500)]


def test_progressive_edge_fractions():
    s = ProgressiveSchedule(1e-3, fast=0.0, balanced=0.0)
    assert {p for p, _, _ in trace(s, 50)} == {QUALITY}
    s = ProgressiveSchedule(1e-3, fast=0.5, balanced=0.5)
    points = trace(s, 50)
    assert points[-1][:2] == (QUALITY, 1.0)
    assert {p for p, _, _ in points[:-1]} == {FAST, BALANCED}


def test_constant():
    s = ConstantSchedule(5e-4, beta=0.5)
    assert {s.at(i, 10, i) for i in range(10)} == {("CONSTANT", 0.5, 5e-4)}
    assert ConstantSchedule(1e-3).at(0, 1, 0)[1] == 1.0


def test_seed_formula():
    s = SeedSchedule(1e-3)
    assert s.at(0, 10, 0) == (FAST, pytest.approx(1e-4), 1e-3)
    assert s.at(0, 10, 149) == (FAST, pytest.approx(1e-4 + 5e-6 * 149), 1e-3)
    assert s.at(0, 10, 150) == (BALANCED, pytest.approx(2e-4 + 2e-6 * 150), 1e-3)
    assert s.at(0, 10, 399) == (BALANCED, pytest.approx(2e-4 + 2e-6 * 399), 1e-3)
    assert s.at(0, 10, 400) == (QUALITY, pytest.approx(5e-4 + 1e-6 * 400), 1e-3)
    # near-autoencoder: β far below 1 throughout
    assert max(s.at(0, 1, e)[1] for e in range(1000)) < 2e-3
    assert "near-autoencoder" in SeedSchedule.__doc__


def test_json_round_trip():
    for name in SCHEDULES:
        s = make_schedule(name, 3e-4)
        data = s.to_json()
        again = schedule_from_json(data, 3e-4)
        assert type(again) is type(s) and again.params == s.params
        assert [again.at(i, 40, i // 4) for i in range(40)] == [s.at(i, 40, i // 4) for i in range(40)]


@pytest.mark.parametrize("name, lr, params, fragment", [
    ("progressive", 1e-3, {"fast": 0.7, "balanced": 0.5}, "exceed 1"),
    ("progressive", 1e-3, {"fast": -0.1}, "fast"),
    ("progressive", 1e-3, {"beta_start": 0}, "beta_start"),
    ("progressive", 1e-3, {"beta_fast_end": 2}, "beta_fast_end"),
    ("progressive", 1e-3, {"warp": 1}, "no parameter 'warp'"),
    ("progressive", 0.0, {}, "lr"),
    ("progressive", float("nan"), {}, "lr"),
    ("constant", 1e-3, {"beta": -1}, "beta"),
    ("constant", 1e-3, {"fast": 0.1}, "no parameter"),
    ("cosine", 1e-3, {}, "unknown schedule"),
])
def test_bad_parameters(name, lr, params, fragment):
    with pytest.raises(CvaeError) as info:
        make_schedule(name, lr, **params)
    assert fragment in str(info.value)


def test_parse_settings():
    assert parse_schedule_settings(["fast=0.2", " balanced = 0.3 "]) == {"fast": 0.2, "balanced": 0.3}
    assert parse_schedule_settings(None) == {}
    for bad in (["fast"], ["=1"], ["fast=x"], ["fast=inf"]):
        with pytest.raises(CvaeError):
            parse_schedule_settings(bad)


def test_schedule_from_json_rejects_garbage():
    for bad in (None, [], {"name": "nope"}, {"name": "constant", "params": []}):
        with pytest.raises(CvaeError):
            schedule_from_json(bad, 1e-3)
    assert math.isfinite(schedule_from_json({"name": "seed"}, 1e-3).at(0, 1, 0)[1])
