"""Training metrics: an :class:`EventStorage` of scalar histories, and writers that report them.

The trainer and hooks ``put_scalar`` into the storage of the running loop (one per ``train``
call, reachable through :func:`get_event_storage`); writers periodically read the smoothed
values and send them to the console (:class:`CommonMetricPrinter`), a JSON-lines file
(:class:`JSONWriter`) and TensorBoard (:class:`TensorboardXWriter`).
"""
from __future__ import annotations

import datetime
import itertools
import json
import logging
import math
import os
import statistics
import time
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import torch

from .progress import ProgressBar, stderr_is_terminal

__all__ = [
    "CommonMetricPrinter", "EventStorage", "EventWriter", "HistoryBuffer", "JSONWriter",
    "TensorboardXWriter", "get_event_storage",
]

logger = logging.getLogger(__name__)
_STORAGE_STACK: List["EventStorage"] = []


def get_event_storage() -> "EventStorage":
    """The storage of the innermost running ``with EventStorage():`` block.

    Raises:
        RuntimeError: no storage is active (called outside a training loop).
    """
    if not _STORAGE_STACK:
        raise RuntimeError("get_event_storage() called outside a 'with EventStorage():' block")
    return _STORAGE_STACK[-1]


class HistoryBuffer:
    """Bounded history of ``(value, iteration)`` pairs with windowed statistics.

    Args:
        max_length: oldest values are dropped past this length (memory stays bounded over
            long runs; the global average keeps counting them).
    """

    def __init__(self, max_length: int = 100_000):
        self._data: Deque[Tuple[float, int]] = deque(maxlen=max_length)
        self._count = 0
        self._sum = 0.0

    def update(self, value: float, iteration: int) -> None:
        self._data.append((float(value), int(iteration)))
        self._count += 1
        self._sum += float(value)

    def latest(self) -> float:
        return self._data[-1][0]

    def _window(self, window: int) -> List[float]:
        """The last ``window`` values, oldest first; O(window), not O(history)."""
        return [v for v, _ in itertools.islice(reversed(self._data), window)][::-1]

    def median(self, window: int) -> float:
        """Median of the last ``window`` values: robust to the odd slow/large iteration."""
        return float(statistics.median(self._window(window)))

    def avg(self, window: int) -> float:
        vals = self._window(window)
        return sum(vals) / len(vals)

    def global_avg(self) -> float:
        return self._sum / max(self._count, 1)

    def values(self) -> List[Tuple[float, int]]:
        return list(self._data)


class EventStorage:
    """Scalar metrics of one training run, keyed by name, tagged with the iteration.

    Args:
        start_iter: iteration of the first ``put_scalar`` (non-zero when resuming).
    """

    def __init__(self, start_iter: int = 0):
        self.iter = int(start_iter)
        self._history: Dict[str, HistoryBuffer] = {}
        self._smoothing_hints: Dict[str, bool] = {}

    def put_scalar(self, name: str, value: Any, smoothing_hint: bool = True,
                   cur_iter: Optional[int] = None) -> None:
        """Record ``value`` for ``name`` at the current (or given) iteration.

        Args:
            smoothing_hint: writers report a windowed median when True (noisy per-iteration
                values like losses); False for values that are meaningful alone (lr, AP).
        """
        if isinstance(value, torch.Tensor):
            value = value.detach().item()
        hint = self._smoothing_hints.setdefault(name, smoothing_hint)
        if hint != smoothing_hint:
            raise ValueError(f"scalar '{name}' was put with smoothing_hint={hint} before, "
                             f"now {smoothing_hint}; use one hint per name")
        self._history.setdefault(name, HistoryBuffer()).update(
            float(value), self.iter if cur_iter is None else cur_iter)

    def put_scalars(self, *, smoothing_hint: bool = True, **scalars: Any) -> None:
        for name, value in scalars.items():
            self.put_scalar(name, value, smoothing_hint=smoothing_hint)

    def history(self, name: str) -> HistoryBuffer:
        if name not in self._history:
            raise KeyError(f"no scalar named '{name}' in the event storage; "
                           f"recorded: {sorted(self._history)}")
        return self._history[name]

    def histories(self) -> Dict[str, HistoryBuffer]:
        return dict(self._history)

    def latest(self) -> Dict[str, Tuple[float, int]]:
        """``{name: (latest value, its iteration)}``."""
        return {k: h.values()[-1] for k, h in self._history.items()}

    def latest_with_smoothing_hint(self, window: int = 20) -> Dict[str, Tuple[float, int]]:
        """Like :meth:`latest`, but the windowed median for names put with a smoothing hint."""
        out = {}
        for name, (value, it) in self.latest().items():
            smooth = self._smoothing_hints[name]
            out[name] = (self._history[name].median(window) if smooth else value, it)
        return out

    def step(self) -> None:
        """Advance to the next iteration (called by the trainer after each step)."""
        self.iter += 1

    def __enter__(self) -> "EventStorage":
        _STORAGE_STACK.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        assert _STORAGE_STACK[-1] is self, "EventStorage contexts exited out of order"
        _STORAGE_STACK.pop()


class EventWriter:
    """Base writer: ``write()`` reports the current storage, ``close()`` releases resources."""

    def write(self) -> None:
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after every iteration (``write`` only every few): cheap per-step work such
        as advancing a progress bar."""

    def close(self) -> None:
        pass


class _NewValues:
    """Tracks which iteration each scalar was last written at, so nothing is written twice.

    Args:
        window: median window for scalars put with a smoothing hint.
    """

    def __init__(self, window: int) -> None:
        self._window = window
        self._last: Dict[str, int] = {}

    def take(self) -> List[Tuple[int, Dict[str, float]]]:
        """``[(iteration, {name: value})]`` of the values not written yet, oldest first."""
        by_iter: Dict[int, Dict[str, float]] = {}
        for name, (value, it) in get_event_storage().latest_with_smoothing_hint(
                self._window).items():
            if it > self._last.get(name, -1):
                by_iter.setdefault(it, {})[name] = value
                self._last[name] = it
        return sorted(by_iter.items())


class JSONWriter(EventWriter):
    """Appends one JSON object per line and iteration: ``{"iteration": i, "loss_cls": ...}``.

    Args:
        json_file: output path (``<output_dir>/metrics.json``); appended to, so a resumed run
            continues the same file.
        window_size: median window for smoothed scalars.
    """

    def __init__(self, json_file: str, window_size: int = 20):
        os.makedirs(os.path.dirname(os.path.abspath(json_file)), exist_ok=True)
        self._file = open(json_file, "a")
        self._new = _NewValues(window_size)

    def write(self) -> None:
        for it, scalars in self._new.take():
            # strict JSON (jq, pandas, browsers): an undefined metric (NaN AP) becomes null
            clean = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
            self._file.write(json.dumps({"iteration": it, **clean}, sort_keys=True) + "\n")
        self._file.flush()  # a crashed run keeps every line written before the crash

    def close(self) -> None:
        self._file.close()


class TensorboardXWriter(EventWriter):
    """Writes scalars as TensorBoard events under ``log_dir`` (torch.utils.tensorboard)."""

    def __init__(self, log_dir: str, window_size: int = 20):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=log_dir)
        self._new = _NewValues(window_size)

    def write(self) -> None:
        for it, scalars in self._new.take():
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, it)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class CommonMetricPrinter(EventWriter):
    """Logs one console line per write (ETA, iteration, losses, time, lr, memory) and, on a
    terminal, keeps a progress bar on stderr that advances every iteration.

    Args:
        max_iter: total iterations (for the ETA and the bar).
        window_size: median window for losses and times.
        progress_bar: show the tqdm bar; None shows it only when stderr is a terminal, so log
            files of batch jobs are not filled with carriage returns. While the bar is shown,
            console log lines are printed above it (:class:`segkit.utils.progress.ProgressBar`).
    """

    def __init__(self, max_iter: int, window_size: int = 20, progress_bar: Optional[bool] = None):
        self.max_iter = max_iter
        self._window = window_size
        self._show_bar = stderr_is_terminal() if progress_bar is None else progress_bar
        self._bar: Optional[ProgressBar] = None
        self._last: Optional[Tuple[int, float]] = None  # (iteration, wall time) of last write
        self._printed_iter = -1

    def _eta_seconds(self, it: int) -> Optional[float]:
        storage = get_event_storage()
        remaining = self.max_iter - it - 1
        try:  # per-iteration time from the IterationTimer hook, robust median
            return storage.history("time").median(1000) * remaining
        except KeyError:  # no timer hook: estimate from the wall time between writes
            now = time.perf_counter()
            eta = None
            if self._last is not None and it > self._last[0]:
                eta = (now - self._last[1]) / (it - self._last[0]) * remaining
            self._last = (it, now)
            return eta

    def write(self) -> None:
        storage = get_event_storage()
        latest = storage.latest()
        if not latest:  # the first iteration failed: nothing to report
            return
        # the last iteration with values; after a failure, storage.iter is the failed one
        it = max(i for _, i in latest.values())
        if it == self._printed_iter:  # the end-of-training write repeats the last iteration
            return
        self._printed_iter = it
        hist = storage.histories()
        eta = self._eta_seconds(it)

        def fmt(name: str, digits: int = 4) -> str:
            return f"{name}: {hist[name].median(self._window):.{digits}f}" if name in hist else ""

        losses = "  ".join(f"{k}: {h.median(self._window):.4g}" for k, h in hist.items()
                           if "loss" in k)
        lr = f"lr: {hist['lr'].latest():.5g}" if "lr" in hist else ""
        mem = ""
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            mem = f"max_mem: {torch.cuda.max_memory_allocated() / 1024 ** 2:.0f}M"
        eta_s = f"eta: {datetime.timedelta(seconds=int(eta))}" if eta is not None else ""
        parts = [eta_s, f"iter: {it + 1}/{self.max_iter}", losses, fmt("time"),
                 fmt("data_time"), lr, mem]
        logger.info("  ".join(p for p in parts if p))
        self._advance_bar(it)

    def after_step(self) -> None:
        self._advance_bar(get_event_storage().iter)

    def _advance_bar(self, it: int) -> None:
        """Show ``it + 1`` iterations done, with the smoothed total loss."""
        if not self._show_bar:
            return
        if self._bar is None:  # opened at the first step: a resumed run starts part-way
            self._bar = ProgressBar(self.max_iter, initial=it, enabled=True, unit="it")
        hist = get_event_storage().histories()
        postfix = {}
        if "total_loss" in hist:
            postfix["loss"] = f"{hist['total_loss'].median(self._window):.4g}"
        self._bar.update_to(it + 1, **postfix)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
