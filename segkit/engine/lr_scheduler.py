"""Learning-rate schedules: fvcore param schedulers applied per iteration to a torch optimizer.

A schedule is an fvcore ``ParamScheduler`` giving the LR *multiplier* as a function of the
training progress ``where = iteration / max_iter`` in [0, 1). :class:`LRMultiplier` is the
small torch scheduler that sets ``lr = base_lr * multiplier(where)`` for every param group
after each optimizer step.

Warm-up (Goyal et al. 2017, "Accurate, Large Minibatch SGD", section 2.2, used by the
Detectron recipes of Mask R-CNN / FPN): the LR ramps linearly from ``warmup_factor * base_lr``
to the scheduled value over ``warmup_iters`` iterations, because large-batch SGD diverges early
when started at the full rate.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping

from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["LRMultiplier", "WarmupParamScheduler", "build_lr_multiplier", "build_lr_scheduler"]


class WarmupParamScheduler(CompositeParamScheduler):
    """``scheduler`` preceded by a linear warm-up over the first ``warmup_length`` of training.

    During warm-up the value goes linearly from ``warmup_factor * scheduler(warmup_length)``
    to ``scheduler(warmup_length)``; afterwards it is ``scheduler(where)`` on the original
    (not rescaled) time axis, so step milestones keep their absolute positions.

    Args:
        scheduler: the main multiplier schedule.
        warmup_factor: multiplier at iteration 0, relative to the end of warm-up.
        warmup_length: warm-up duration as a fraction of training, in [0, 1).
    """

    def __init__(self, scheduler: ParamScheduler, warmup_factor: float, warmup_length: float):
        end = scheduler(warmup_length)
        super().__init__(
            [LinearParamScheduler(warmup_factor * end, end), scheduler],
            lengths=[warmup_length, 1.0 - warmup_length],
            interval_scaling=["rescaled", "fixed"],
        )


def _require(solver: Mapping[str, Any], key: str) -> Any:
    if key not in solver or solver[key] is None:
        raise KeyError(f"solver config has no '{key}' (keys: {sorted(solver)})")
    return solver[key]


def build_lr_multiplier(solver: Mapping[str, Any]) -> ParamScheduler:
    """The LR multiplier schedule described by the ``solver`` config node.

    Keys read: ``schedule`` ("step" | "cosine"), ``max_iter``, ``steps`` and ``gamma`` (step),
    ``warmup_iters``, ``warmup_factor``; optional ``cosine_end_factor`` (default 0) and
    ``step_factors`` (step; default null).

    Returns:
        fvcore scheduler: ``WarmupParamScheduler`` over ``MultiStepParamScheduler`` (multiplier
        ``gamma ** #{s in steps: s <= iteration}``, or ``step_factors[k]`` after the k-th
        step when given, e.g. DeepMask's 1e-3 -> 5e-4 -> 1e-4 is ``[1.0, 0.5, 0.1]``) or
        ``CosineParamScheduler`` (1 -> end), or the bare schedule when ``warmup_iters`` is 0.

    Raises:
        ValueError: unknown schedule, steps not increasing or not inside (0, max_iter),
            ``step_factors`` not one per interval (``len(steps) + 1``).
    """
    schedule = str(_require(solver, "schedule"))
    max_iter = int(_require(solver, "max_iter"))
    if max_iter <= 0:
        raise ValueError(f"solver.max_iter must be positive, got {max_iter}")
    if schedule == "step":
        steps = [int(s) for s in (solver.get("steps") or [])]
        if any(not 0 < s < max_iter for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"solver.steps must be increasing iterations in (0, max_iter="
                             f"{max_iter}), got {steps}")
        factors = solver.get("step_factors")
        if factors is None:
            gamma = float(_require(solver, "gamma"))
            factors = [gamma ** k for k in range(len(steps) + 1)]
        factors = [float(f) for f in factors]
        if len(factors) != len(steps) + 1:
            raise ValueError(f"solver.step_factors must hold one LR multiplier per interval "
                             f"(len(steps) + 1 = {len(steps) + 1} for steps {steps}), got "
                             f"{factors}; set them with the steps, or null for powers of gamma")
        if steps:
            sched: ParamScheduler = MultiStepParamScheduler(
                values=factors, milestones=steps, num_updates=max_iter)
        else:
            sched = ConstantParamScheduler(factors[0])
    elif schedule == "cosine":
        sched = CosineParamScheduler(1.0, float(solver.get("cosine_end_factor", 0.0) or 0.0))
    else:
        raise ValueError(f"solver.schedule must be 'step' or 'cosine', got '{schedule}'")
    warmup_iters = int(solver.get("warmup_iters", 0) or 0)
    if not 0 <= warmup_iters < max_iter:
        raise ValueError(f"solver.warmup_iters must be in [0, max_iter={max_iter}), "
                         f"got {warmup_iters}")
    if warmup_iters == 0:
        return sched
    return WarmupParamScheduler(sched, float(_require(solver, "warmup_factor")),
                                warmup_iters / max_iter)


class LRMultiplier(LRScheduler):
    """Torch LR scheduler setting ``lr = base_lr * multiplier(iteration / max_iter)``.

    ``step()`` is called once per iteration, after ``optimizer.step()``. Its state is just
    ``base_lrs`` and ``last_epoch`` (the iteration), plain values that a ``weights_only``
    checkpoint can hold; the schedule itself is rebuilt from the config.

    Args:
        optimizer: the optimizer; each group's initial ``lr`` is its base LR.
        multiplier: fvcore schedule of the multiplier.
        max_iter: total iterations.
        last_epoch: the last finished iteration (-1 for a new run).
    """

    def __init__(self, optimizer: Optimizer, multiplier: ParamScheduler, max_iter: int,
                 last_epoch: int = -1):
        self._multiplier = multiplier
        self._max_iter = int(max_iter)
        super().__init__(optimizer, last_epoch=last_epoch)

    def _factor(self) -> float:
        # The step after the last iteration (and any extra one) keeps the final value: some
        # fvcore schedules reject where >= 1.
        return self._multiplier(min(self.last_epoch, self._max_iter - 1) / self._max_iter)

    def get_lr(self) -> List[float]:
        factor = self._factor()
        return [base * factor for base in self.base_lrs]

    def _get_closed_form_lr(self) -> List[float]:
        return self.get_lr()

    def state_dict(self) -> Dict[str, Any]:
        return {"base_lrs": list(self.base_lrs), "last_epoch": int(self.last_epoch)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.base_lrs = list(state_dict["base_lrs"])
        self.last_epoch = int(state_dict["last_epoch"])
        # Put the LR of the restored iteration into the optimizer right away, so the next step
        # after resuming uses the same LR the uninterrupted run would have used.
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def build_lr_scheduler(solver: Mapping[str, Any], optimizer: Optimizer) -> LRMultiplier:
    """Per-iteration LR scheduler for ``optimizer`` from the ``solver`` config node."""
    return LRMultiplier(optimizer, build_lr_multiplier(solver), int(solver["max_iter"]))
