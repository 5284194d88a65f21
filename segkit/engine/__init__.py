"""Training engine: the loop and its hooks, config -> object builders, and the CLIs.

Importing this package registers the standard hooks in ``segkit.registry.HOOKS``. The
builders in :mod:`.defaults` import ``segkit.modeling`` / ``segkit.data`` /
``segkit.evaluation`` lazily, and :mod:`.cli` (Hydra apps) is not imported here.
"""
from .defaults import (
    Trainer, build_datasets, build_lr_scheduler, build_model, build_optimizer, build_test_loader,
    build_train_loader, default_setup, evaluate, format_results_table,
)
from .hooks import EvalHook, IterationTimer, LRScheduler, PeriodicCheckpointer, PeriodicWriter
from .launch import launch
from .lr_scheduler import LRMultiplier, WarmupParamScheduler, build_lr_multiplier
from .rng import get_rng_state, seed_all, set_rng_state
from .trainer import HookBase, SimpleTrainer, TrainerBase, check_losses_finite

__all__ = [
    "Trainer", "build_datasets", "build_lr_scheduler", "build_model", "build_optimizer",
    "build_test_loader", "build_train_loader", "default_setup", "evaluate",
    "format_results_table",
    "EvalHook", "HookBase", "IterationTimer", "LRMultiplier", "LRScheduler",
    "PeriodicCheckpointer", "PeriodicWriter", "SimpleTrainer", "TrainerBase",
    "WarmupParamScheduler", "build_lr_multiplier", "check_losses_finite", "get_rng_state",
    "launch", "seed_all", "set_rng_state",
]
