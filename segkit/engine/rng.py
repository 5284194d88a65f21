"""Seeding and RNG state capture, so a resumed run draws the same random numbers.

DESIGN.md ("Training"): resuming continues the same run, including the RNG state. The state is
stored as tensors and plain containers so it fits a ``weights_only`` checkpoint.
"""
from __future__ import annotations

import random
from typing import Any, Dict, Mapping

import numpy as np
import torch

__all__ = ["gather_rng_state", "get_rng_state", "restore_rng_state", "seed_all", "set_rng_state"]


def seed_all(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices).

    Args:
        seed: the seed.
        deterministic: also ask torch for deterministic kernels (slower; ops without a
            deterministic implementation warn instead of failing, since several detection
            ops, e.g. RoIAlign backward on CUDA, have none).
    """
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def get_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA when in use) RNG states, ``weights_only``-safe."""
    version, py_state, _ = random.getstate()
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [int(version), list(py_state)],
        # the NumPy key array becomes a tensor: weights_only refuses raw ndarrays
        "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore a state captured by :func:`get_rng_state`."""
    version, py_state = state["python"]
    random.setstate((int(version), tuple(int(v) for v in py_state), None))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_state() -> Any:
    """What a checkpoint stores: this process's :func:`get_rng_state`, or in a distributed job
    the list of every process's state in rank order (a collective: all processes call it)."""
    from segkit.utils import comm

    state = get_rng_state()
    return comm.all_gather(state) if comm.is_distributed() else state


def restore_rng_state(saved: Any) -> bool:
    """Restore this process's state from :func:`gather_rng_state`'s output.

    Returns:
        False when the checkpoint was written by a different number of processes (no state
        for this rank): the RNGs keep their seeded state and the caller should say so.
    """
    from segkit.utils import comm

    if isinstance(saved, Mapping):
        saved = [saved]
    if len(saved) != comm.get_world_size():
        return False
    set_rng_state(saved[comm.get_rank()])
    return True
