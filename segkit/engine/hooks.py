"""Standard training hooks, registered in ``segkit.registry.HOOKS``.

Recommended order (the default ``Trainer`` uses it): :class:`IterationTimer`,
:class:`LRScheduler`, :class:`PeriodicCheckpointer`, :class:`EvalHook`, :class:`PeriodicWriter`
-- writers last, so each write sees the time, LR and evaluation results of the same iteration.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from segkit.registry import HOOKS
from segkit.utils import comm
from segkit.utils.events import EventWriter

from .rng import gather_rng_state
from .trainer import HookBase

__all__ = ["EvalHook", "IterationTimer", "LRScheduler", "PeriodicCheckpointer", "PeriodicWriter",
           "flatten_results"]

logger = logging.getLogger(__name__)


@HOOKS.register("iteration_timer")
class IterationTimer(HookBase):
    """Puts the wall time of each step as ``time`` (seconds) and logs the total at the end.

    Args:
        warmup_iter: first iterations left out of ``time``; they include one-off costs (data
            loader workers starting, cuDNN autotuning) that would skew the ETA.
    """

    def __init__(self, warmup_iter: int = 3):
        self._warmup_iter = warmup_iter
        self._train_start = self._step_start = 0.0

    def before_train(self) -> None:
        self._train_start = time.perf_counter()

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        if self.trainer.iter >= self.trainer.start_iter + self._warmup_iter:
            self.trainer.storage.put_scalar("time", time.perf_counter() - self._step_start)

    def after_train(self) -> None:
        total = time.perf_counter() - self._train_start
        done = self.trainer.iter - self.trainer.start_iter
        if done > 0:
            logger.info("Total training time: %.1f s for %d iterations (%.4f s / it)",
                        total, done, total / done)


@HOOKS.register("lr_scheduler")
class LRScheduler(HookBase):
    """Records the LR as ``lr`` and steps a per-iteration torch LR scheduler after each step.

    Args:
        scheduler: e.g. :class:`segkit.engine.lr_scheduler.LRMultiplier`.
        optimizer: whose LR is recorded (default: the scheduler's optimizer). The group with
            the most parameters is reported, as it stands for the bulk of the network.
    """

    def __init__(self, scheduler: Any, optimizer: Any = None):
        self.scheduler = scheduler
        self.optimizer = optimizer if optimizer is not None else scheduler.optimizer
        self._group = max(range(len(self.optimizer.param_groups)),
                          key=lambda i: len(self.optimizer.param_groups[i]["params"]))

    def after_step(self) -> None:
        lr = self.optimizer.param_groups[self._group]["lr"]
        self.trainer.storage.put_scalar("lr", lr, smoothing_hint=False)
        self.scheduler.step()


@HOOKS.register("periodic_checkpointer")
class PeriodicCheckpointer(HookBase):
    """Saves ``model_<iter>.pth`` every ``period`` iterations and ``model_final.pth`` at the end.

    Each file also stores the RNG state so a resumed run draws the same random numbers.
    ``model_final`` is written only when every iteration ran (not after a crash or NaN).

    Args:
        checkpointer: a :class:`segkit.checkpoint.Checkpointer`.
        period: iterations between saves (0: only the final save).
        max_to_keep: keep only this many periodic files (None: all).
    """

    def __init__(self, checkpointer: Any, period: int, max_to_keep: Optional[int] = None):
        self.checkpointer = checkpointer
        self.period = int(period)
        self.max_to_keep = max_to_keep
        self._saved: List[str] = []

    def after_step(self) -> None:
        it = self.trainer.iter
        if self.period > 0 and (it + 1) % self.period == 0 and it + 1 < self.trainer.max_iter:
            path = self.checkpointer.save(f"model_{it:07d}", iteration=it,
                                          rng=gather_rng_state())
            self._saved.append(path)
            if self.max_to_keep is not None and len(self._saved) > self.max_to_keep:
                old = self._saved.pop(0)
                if comm.is_main_process() and os.path.exists(old):  # rank 0 owns the files
                    os.remove(old)

    def after_train(self) -> None:
        if self.trainer.completed:
            self.checkpointer.save("model_final", iteration=self.trainer.max_iter - 1,
                                   rng=gather_rng_state())


def flatten_results(results: Mapping[str, Any], prefix: str = "") -> Dict[str, float]:
    """``{"bbox": {"AP": 40.1}}`` -> ``{"bbox/AP": 40.1}`` (numbers only)."""
    flat: Dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_results(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


@HOOKS.register("eval")
class EvalHook(HookBase):
    """Runs ``eval_function()`` every ``eval_period`` iterations and once at the end.

    Results (``{"bbox": {"AP": ...}, "segm": {...}}``) are kept in :attr:`results` as
    ``(iteration, results)`` and put into the event storage as ``bbox/AP`` etc., so the
    writers log them next to the losses.

    Args:
        eval_period: iterations between evaluations (0: only at the end).
        eval_function: callable returning the results dict; the model is switched back to
            training mode afterwards.
    """

    def __init__(self, eval_period: int, eval_function: Callable[[], Mapping[str, Any]]):
        self.period = int(eval_period)
        self.eval_function = eval_function
        self.results: List[tuple] = []

    @property
    def latest_results(self) -> Optional[Mapping[str, Any]]:
        return self.results[-1][1] if self.results else None

    def _do_eval(self) -> None:
        model = getattr(self.trainer, "model", None)
        results = self.eval_function()
        if model is not None:
            model.train()
        if results is None:
            return
        if not isinstance(results, Mapping):
            raise TypeError(f"eval_function must return a dict, got {type(results).__name__}")
        self.results.append((self.trainer.iter, results))
        flat = flatten_results(results)
        storage = self.trainer.storage
        for name, value in flat.items():
            storage.put_scalar(name, value, smoothing_hint=False)

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if self.period > 0 and next_iter % self.period == 0 and next_iter < self.trainer.max_iter:
            self._do_eval()

    def after_train(self) -> None:
        if self.trainer.completed:
            self._do_eval()


@HOOKS.register("periodic_writer")
class PeriodicWriter(HookBase):
    """Calls every writer's ``after_step()`` after each iteration, and ``write()`` every
    ``period`` iterations, at the last iteration and at the end of training (also after a
    failure, so the last metrics before it are kept).

    Args:
        writers: :class:`segkit.utils.events.EventWriter` objects.
        period: iterations between writes.
    """

    def __init__(self, writers: Sequence[EventWriter], period: int = 20):
        self.writers = list(writers)
        self.period = max(1, int(period))

    def after_step(self) -> None:
        it = self.trainer.iter
        for w in self.writers:
            w.after_step()
        if (it + 1) % self.period == 0 or it == self.trainer.max_iter - 1:
            for w in self.writers:
                w.write()

    def after_train(self) -> None:
        for w in self.writers:
            w.write()
            w.close()
