"""LR schedules: warm-up + steps and cosine against hand-computed values, applied per iteration
to a real optimizer; state round trip; config errors."""
import math

import pytest
import torch

from segkit.engine.lr_scheduler import build_lr_multiplier, build_lr_scheduler

BASE = {"schedule": "step", "max_iter": 100, "steps": [60, 80], "gamma": 0.1,
        "warmup_iters": 10, "warmup_factor": 0.001}


def _lrs_used(solver, base_lr=0.1, iters=None):
    """LR the optimizer holds during each iteration (scheduler stepped after each step)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = build_lr_scheduler(solver, opt)
    lrs = []
    for _ in range(iters or solver["max_iter"]):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_steps_matches_hand_computed():
    lrs = _lrs_used(BASE)
    # linear warm-up: lr = base * (f * (1 - i/W) + i/W)  (Goyal et al. 2017, section 2.2)
    expected = {0: 0.1 * 0.001, 5: 0.1 * (0.001 * 0.5 + 0.5), 9: 0.1 * (0.001 * 0.1 + 0.9),
                10: 0.1, 59: 0.1, 60: 0.01, 79: 0.01, 80: 0.001, 99: 0.001}
    for it, lr in expected.items():
        assert lrs[it] == pytest.approx(lr, rel=1e-9), it


def test_cosine_with_and_without_warmup():
    solver = {**BASE, "schedule": "cosine", "warmup_iters": 0}
    lrs = _lrs_used(solver)
    for it in (0, 1, 25, 50, 99):
        assert lrs[it] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * it / 100)), rel=1e-9)
    lrs = _lrs_used({**solver, "warmup_iters": 10})
    end_of_warmup = 0.1 * 0.5 * (1 + math.cos(math.pi * 10 / 100))
    assert lrs[0] == pytest.approx(end_of_warmup * 0.001, rel=1e-9)
    assert lrs[4] == pytest.approx(end_of_warmup * (0.001 * 0.6 + 0.4), rel=1e-9)
    assert lrs[30] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.3)), rel=1e-9)


def test_cosine_end_factor_and_the_step_after_the_last_iteration():
    solver = {**BASE, "schedule": "cosine", "warmup_iters": 0, "cosine_end_factor": 0.1}
    lrs = _lrs_used(solver, iters=102)  # two steps past max_iter keep the last value
    for it in (0, 50, 99):
        cos = 0.5 * (1 + math.cos(math.pi * it / 100))
        assert lrs[it] == pytest.approx(0.1 * (0.1 + 0.9 * cos), rel=1e-9), it
    assert lrs[100] == lrs[101] == lrs[99]


def test_no_steps_is_constant_after_warmup():
    lrs = _lrs_used({**BASE, "steps": []})
    assert lrs[10] == lrs[99] == pytest.approx(0.1)


def test_step_factors_give_each_interval_its_multiplier():
    """DeepMask's 1e-3 -> 5e-4 -> 1e-4 (papers.md 2.3) is not a power of one gamma."""
    lrs = _lrs_used({**BASE, "warmup_iters": 0, "step_factors": [1.0, 0.5, 0.1]}, base_lr=1e-3)
    for it, lr in {0: 1e-3, 59: 1e-3, 60: 5e-4, 79: 5e-4, 80: 1e-4, 99: 1e-4}.items():
        assert lrs[it] == pytest.approx(lr, rel=1e-9), it
    lrs = _lrs_used({**BASE, "steps": [], "warmup_iters": 0, "step_factors": [0.5]})
    assert lrs[0] == lrs[99] == pytest.approx(0.05)
    assert _lrs_used({**BASE, "step_factors": None}) == _lrs_used(BASE)  # null: gamma powers


def test_state_dict_is_plain_and_resumes_the_same_lr(tmp_path):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = build_lr_scheduler(BASE, opt)
    for _ in range(65):
        opt.step()
        sched.step()
    state = sched.state_dict()
    assert state == {"base_lrs": [0.1], "last_epoch": 65}
    torch.save(state, tmp_path / "s.pth")
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched2 = build_lr_scheduler(BASE, opt2)
    sched2.load_state_dict(torch.load(tmp_path / "s.pth", weights_only=True))
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01)  # iteration 65 is after step 60


@pytest.mark.parametrize("bad, match", [
    ({"steps": [80, 60]}, "solver.steps"),
    ({"steps": [100]}, "solver.steps"),
    ({"schedule": "poly"}, "solver.schedule"),
    ({"warmup_iters": 100}, "solver.warmup_iters"),
    ({"step_factors": [1.0, 0.5]}, "solver.step_factors"),
])
def test_bad_config_names_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        build_lr_multiplier({**BASE, **bad})
