"""Shared by the benchmark scripts: process settings and interleaved timing."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

# glibc's malloc returns large temporaries to the OS and page-faults them back on the next
# call, which costs about 25% of detection inference on this kind of machine; both sides of
# a comparison run with these settings (see reexec_with_tuned_malloc).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def reexec_with_tuned_malloc(script: str, argv: List[str]) -> None:
    """Re-execute ``script`` with :data:`MALLOC_ENV` set, unless it already is."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, script] + argv, {**os.environ, **MALLOC_ENV})


def interleave(runs: Dict[str, Callable[[], object]], iters: int, repeats: int,
               ctx: Callable = contextlib.nullcontext) -> Dict[str, float]:
    """Median seconds per call of each run, the runs interleaved round by round.

    One warm-up call each (allocations, kernel selection), then ``repeats`` rounds in which
    every run makes ``iters`` calls; the median of the rounds is returned.
    """
    for fn in runs.values():
        with ctx():
            fn()
    rounds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            with ctx():
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                rounds[name].append((time.perf_counter() - t0) / iters)
    return {name: statistics.median(v) for name, v in rounds.items()}
