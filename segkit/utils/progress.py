"""A tqdm progress bar for the console that leaves log files clean and log lines whole.

Shown only when stderr is a terminal (batch jobs and CI logs get no carriage-return noise).
While a bar is open, the console handlers of the root and ``segkit`` loggers write through
``tqdm.write``: the bar is cleared, the log line printed, the bar redrawn below it, instead of
the line being glued to the end of the bar. File handlers (``log.txt``) are left alone.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, Iterable, List, Optional

__all__ = ["ProgressBar", "stderr_is_terminal"]


def stderr_is_terminal() -> bool:
    """Whether stderr is an interactive terminal (where a progress bar belongs)."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


def _console_loggers() -> List[logging.Logger]:
    """The loggers among root and ``segkit`` that print to stdout/stderr themselves.

    Only these are redirected: giving a logger without a console handler a tqdm handler would
    print its records twice (once there, once again through the root logger)."""
    def prints(log: logging.Logger) -> bool:
        return any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)
                   for h in log.handlers)

    return [log for log in (logging.getLogger(), logging.getLogger("segkit")) if prints(log)]


class ProgressBar:
    """A tqdm bar on stderr, open until :meth:`close` (also a context manager).

    Args:
        total: number of steps (None: unknown).
        initial: steps already done (a resumed run starts part-way).
        enabled: show the bar; None shows it only when stderr is a terminal. A disabled bar
            accepts every call and prints nothing.
        **tqdm_kwargs: ``desc``, ``unit``, ... passed to ``tqdm``.
    """

    def __init__(self, total: Optional[int], initial: int = 0, enabled: Optional[bool] = None,
                 **tqdm_kwargs: Any):
        self._bar = None
        self._redirect = contextlib.ExitStack()
        if not (stderr_is_terminal() if enabled is None else enabled):
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(total=total, initial=initial, file=sys.stderr, dynamic_ncols=True,
                         leave=False, **tqdm_kwargs)
        self._redirect.enter_context(logging_redirect_tqdm(loggers=_console_loggers()))

    @property
    def n(self) -> int:
        """Steps done so far (0 for a disabled bar)."""
        return int(self._bar.n) if self._bar is not None else 0

    def update_to(self, n: int, **postfix: Any) -> None:
        """Move the bar to ``n`` steps done and show ``postfix`` (e.g. ``loss="0.52"``)."""
        if self._bar is None:
            return
        if postfix:
            self._bar.set_postfix(refresh=False, **postfix)
        self._bar.update(max(0, n - self._bar.n))

    def close(self) -> None:
        """Remove the bar and restore the console log handlers."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def wrap(self, iterable: Iterable) -> Iterable:
        """Iterate ``iterable``, advancing the bar by one per item."""
        for item in iterable:
            yield item
            self.update_to(self.n + 1)
