"""Run set-up: output folder, logging (console + ``log.txt``), seeding, environment report and
the resolved config saved next to the results, so every run can be reproduced from its folder.
"""
from __future__ import annotations

import logging
import os
import platform
import sys
from typing import Dict

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from .rng import seed_all

__all__ = ["collect_env_info", "default_setup", "setup_logging"]

logger = logging.getLogger(__name__)
_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"


def setup_logging(output_dir: str, name: str = "segkit") -> logging.Logger:
    """Log ``name`` at INFO to ``output_dir/log.txt`` and, unless a console handler already
    exists on the root logger (Hydra installs one), to stdout.

    Calling it again (a second run in the same process) replaces the handlers it added before
    instead of stacking them, so lines are not duplicated.
    """
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    for h in [h for h in log.handlers if getattr(h, "_segkit", False)]:
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter(_FORMAT, datefmt="%m/%d %H:%M:%S")
    handlers = [logging.FileHandler(os.path.join(output_dir, "log.txt"))]
    root_console = any(isinstance(h, logging.StreamHandler) and not isinstance(
        h, logging.FileHandler) for h in logging.getLogger().handlers)
    if not root_console:
        handlers.append(logging.StreamHandler(sys.stdout))
    for h in handlers:
        h.setFormatter(fmt)
        h._segkit = True  # type: ignore[attr-defined]
        log.addHandler(h)
    return log


def collect_env_info() -> Dict[str, str]:
    """Versions and devices that matter for reproducing a result."""
    import torchvision

    import segkit

    info = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "segkit": segkit.__version__, "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cpu threads": str(torch.get_num_threads()),
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    collect = getattr(segkit, "collect_env", None)  # compiled-ops backend report, when present
    if callable(collect):
        try:
            extra = collect()
            if isinstance(extra, dict):
                info.update({str(k): str(v) for k, v in extra.items()})
        except Exception as e:  # an env report must never stop a run
            info["collect_env error"] = repr(e)
    return info


def default_setup(cfg: DictConfig) -> str:
    """Prepare a run from its config.

    Creates ``train.output_dir`` (resolved: inside a Hydra run it is Hydra's run folder),
    sets up logging, seeds every RNG with ``train.seed`` (``train.deterministic`` also asks for
    deterministic kernels), logs the environment and writes the fully resolved
    ``config.yaml`` there.

    Returns:
        The output folder.
    """
    from segkit.config import resolve_output_dir

    output_dir = resolve_output_dir(cfg)
    with open_dict(cfg):
        cfg.train.output_dir = output_dir  # later readers see a plain path, Hydra or not
    os.makedirs(output_dir, exist_ok=True)
    setup_logging(output_dir)
    seed = cfg.train.get("seed")
    if seed is None or int(seed) < 0:
        seed = int.from_bytes(os.urandom(4), "little") >> 1
        logger.info("train.seed not set: using random seed %d", seed)
    seed_all(int(seed), bool(cfg.train.get("deterministic", False)))
    env = collect_env_info()
    logger.info("Environment:\n%s", "\n".join(f"  {k}: {v}" for k, v in env.items()))
    path = os.path.join(output_dir, "config.yaml")
    with open(path, "w") as f:
        f.write(OmegaConf.to_yaml(cfg, resolve=True))
    logger.info("Run folder %s (resolved config saved to %s)", output_dir, path)
    return output_dir
