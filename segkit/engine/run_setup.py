"""Run set-up: output folder, logging (console + ``log.txt``), seeding, environment report and
the resolved config saved next to the results, so every run can be reproduced from its folder.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List

from omegaconf import DictConfig, OmegaConf, open_dict

from segkit.utils.env import collect_env_info

from .rng import seed_all

# collect_env_info lives in segkit.utils.env (DESIGN.md layout) and stays importable here
__all__ = ["collect_env_info", "default_setup", "setup_logging"]

logger = logging.getLogger(__name__)
_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"


def setup_logging(output_dir: str, name: str = "segkit", rank: int = 0) -> logging.Logger:
    """Log ``name`` at INFO to ``output_dir/log.txt`` and, unless a console handler already
    exists on the root logger (Hydra installs one), to stdout. When a root file handler
    already writes ``output_dir/log.txt`` (Hydra's job log pointed there), it is not opened a
    second time.

    Processes of rank > 0 of a distributed job log warnings and errors only, to the console,
    tagged with their rank: rank 0 speaks for the run, and ``log.txt`` is rank 0's.

    Calling it again (a second run in the same process) replaces the handlers it added before
    instead of stacking them, so lines are not duplicated.
    """
    log = logging.getLogger(name)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for h in [h for h in log.handlers if getattr(h, "_segkit", False)]:
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter(_FORMAT if rank == 0 else f"[rank {rank}] {_FORMAT}",
                            datefmt="%m/%d %H:%M:%S")
    log_file = os.path.abspath(os.path.join(output_dir, "log.txt"))
    root = logging.getLogger().handlers
    root_files = {os.path.abspath(h.baseFilename) for h in root
                  if isinstance(h, logging.FileHandler)}
    handlers: List[logging.Handler] = [] if log_file in root_files or rank > 0 else [
        logging.FileHandler(log_file)]
    root_console = any(isinstance(h, logging.StreamHandler) and not isinstance(
        h, logging.FileHandler) for h in root)
    if not root_console:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        h._segkit = True  # type: ignore[attr-defined]
        log.addHandler(h)
    return log


def default_setup(cfg: DictConfig) -> str:
    """Prepare a run from its config.

    Creates ``train.output_dir`` (resolved: inside a Hydra run it is Hydra's run folder),
    sets up logging, seeds every RNG with ``train.seed`` (null or negative: a random seed,
    written back into the config so the run can be repeated; ``train.deterministic`` also asks
    for deterministic kernels), logs the environment and writes the fully resolved
    ``config.yaml`` there.

    In a distributed job every process calls it: the output folder and the seed are rank 0's
    (torchrun starts one Hydra app per process, whose run folders may differ by a clock tick),
    process r seeds its RNGs with ``seed + r`` (so RoI sampling differs between processes; the
    data order and augmentations depend on ``train.seed`` alone), and only rank 0 writes.

    Returns:
        The output folder.
    """
    from segkit.config import resolve_output_dir
    from segkit.utils import comm

    output_dir = comm.broadcast_object(resolve_output_dir(cfg))
    with open_dict(cfg):
        cfg.train.output_dir = output_dir  # later readers see a plain path, Hydra or not
    rank = comm.get_rank()
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
    comm.synchronize()  # the folder exists before any process looks into it
    setup_logging(output_dir, rank=rank)
    seed = cfg.train.get("seed")
    if seed is None or int(seed) < 0:
        seed = comm.broadcast_object(int.from_bytes(os.urandom(4), "little") >> 1)
        logger.info("train.seed not set: using random seed %d", seed)
        with open_dict(cfg):
            # the train loader seeds its order from it, and config.yaml / checkpoints record it
            cfg.train.seed = seed
    seed_all(int(seed) + rank, bool(cfg.train.get("deterministic", False)))
    if rank > 0:
        return output_dir
    env = collect_env_info()
    logger.info("Environment:\n%s", "\n".join(f"  {k}: {v}" for k, v in env.items()))
    path = os.path.join(output_dir, "config.yaml")
    with open(path, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("Run folder %s (resolved config saved to %s)", output_dir, path)
    return output_dir
