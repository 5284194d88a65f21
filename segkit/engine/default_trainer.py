"""``Trainer``: the standard recipe wired from a composed config.

Datasets -> model -> optimizer + LR schedule -> train loader -> :class:`SimpleTrainer` with the
standard hooks (timer, LR, periodic checkpoints, evaluation, writers), then the final COCO
evaluation and PNGs of ground truth next to predictions for a few validation images.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Dict, List, Mapping, Optional

import torch
from omegaconf import DictConfig

from segkit.checkpoint import Checkpointer
from segkit.checkpoint.io import LAST_CHECKPOINT
from segkit.utils import comm
from segkit.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter

from . import defaults as D
from .hooks import EvalHook, IterationTimer, LRScheduler, PeriodicCheckpointer, PeriodicWriter
from .rng import restore_rng_state
from .trainer import HookBase, SimpleTrainer

__all__ = ["Trainer", "visualize_predictions", "wrap_distributed"]

logger = logging.getLogger(__name__)


class Trainer(SimpleTrainer):
    """Train (and evaluate) the model described by ``cfg``.

    Usage::

        output_dir = default_setup(cfg)
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=cfg.train.resume)
        results = trainer.train()  # final {"bbox": {...}, "segm": {...}}

    Config keys read besides the builders': ``solver.max_iter``, ``solver.clip_grad_norm``,
    ``train.output_dir``, ``train.init_weights``, ``train.checkpoint_period``,
    ``train.eval_period`` (0: only at the end), ``train.log_period``,
    ``train.num_vis_images``, ``train.amp`` / ``train.amp_dtype`` (mixed precision),
    ``train.find_unused_parameters`` (DistributedDataParallel). The training batches come
    from the builder that ``dataloader.name`` names (``detection`` by default; a project
    registers its own in ``segkit.registry.TRAIN_LOADERS``, see
    :func:`segkit.engine.defaults.build_train_loader`).

    In a distributed job (:func:`segkit.engine.launch`) the model is wrapped in
    ``DistributedDataParallel``, each process loads its shard of every batch, evaluation is
    sharded, and only rank 0 writes checkpoints, metrics, results and pictures.
    """

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        data = D.build_datasets(cfg)
        self.train_records, self.train_metadata = data["train"]
        self.val_records, self.val_metadata = data["val"]
        model = D.build_model(cfg)
        optimizer = D.build_optimizer(cfg, model)
        # The loader is built in train(), once resume_or_load knows the start iteration.
        super().__init__(wrap_distributed(model, cfg), None, optimizer,
                         clip_grad_norm=cfg.solver.get("clip_grad_norm"),
                         amp=bool(cfg.train.get("amp", False)),
                         amp_dtype=str(cfg.train.get("amp_dtype", "auto")))
        self.scheduler = D.build_lr_scheduler(cfg, optimizer)
        self.output_dir = str(cfg.train.output_dir)
        # the GradScaler's loss scale is part of the run: a resumed AMP run must not restart
        # from the initial scale (None when AMP is off or on CPU; then it is not saved)
        self.checkpointer = Checkpointer(
            model, self.output_dir, optimizer=optimizer, scheduler=self.scheduler,
            meta=D.checkpoint_meta(cfg, self.train_metadata["thing_classes"]),
            grad_scaler=self._scaler)
        self.start_iter = 0
        self.max_iter = int(cfg.solver.max_iter)
        self.eval_hook: Optional[EvalHook] = None
        self.register_hooks(self.build_hooks())

    def build_hooks(self) -> List[HookBase]:
        """The standard hooks, in the order they must run (writers last)."""
        cfg = self.cfg
        self.eval_hook = EvalHook(int(cfg.train.eval_period), self.test)
        return [
            IterationTimer(),
            LRScheduler(self.scheduler, self.optimizer),
            PeriodicCheckpointer(self.checkpointer, int(cfg.train.checkpoint_period)),
            self.eval_hook,
            PeriodicWriter(self.build_writers(), period=int(cfg.train.log_period)),
        ]

    def build_writers(self) -> List[Any]:
        """Console line + progress bar, ``metrics.json`` lines, TensorBoard events (rank 0;
        the other processes write nothing, their losses are averaged into rank 0's)."""
        if not comm.is_main_process():
            return []
        window = int(self.cfg.train.get("metrics_window", 20))
        return [
            CommonMetricPrinter(self.max_iter, window_size=window),
            JSONWriter(os.path.join(self.output_dir, "metrics.json"), window_size=window),
            TensorboardXWriter(self.output_dir, window_size=window),
        ]

    def resume_or_load(self, resume: bool = True) -> None:
        """Continue from ``output_dir/last_checkpoint`` (iteration, optimizer, LR, RNG) when
        ``resume`` and one exists; otherwise load ``train.init_weights`` (model only) if set."""
        if resume and not self.checkpointer.has_checkpoint():
            logger.warning(
                "train.resume is true but %s has no '%s' naming a checkpoint: training starts "
                "at iteration 0. To continue a run, point at its folder "
                "(segkit-train ... train.resume=true hydra.run.dir=<its folder>).",
                self.output_dir, LAST_CHECKPOINT)
        ckpt = self.checkpointer.resume_or_load(self.cfg.train.get("init_weights"), resume=resume)
        if resume and "iteration" in ckpt:
            self.start_iter = int(ckpt["iteration"]) + 1
            if "rng" in ckpt and not restore_rng_state(ckpt["rng"]):
                logger.warning("the checkpoint's RNG states come from a run with another number "
                               "of processes; random draws after the restart differ from the "
                               "original run's")
            logger.info("Resuming at iteration %d of %d", self.start_iter, self.max_iter)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without its ``DistributedDataParallel`` wrapper (inference runs on it: the
        wrapper's forward is meant for training steps taken by every process together)."""
        return getattr(self.model, "module", self.model)

    def test(self) -> Dict[str, Dict[str, float]]:
        """COCO evaluation of the current model on the validation split (sharded across the
        processes of a distributed job; every process gets rank 0's results)."""
        return D.evaluate(self.cfg, self.unwrapped_model, self.val_records, self.val_metadata,
                          output_dir=os.path.join(self.output_dir, "inference"))

    def train(self) -> Dict[str, Any]:  # type: ignore[override]
        """Train ``start_iter .. solver.max_iter``, then visualise validation images.

        Returns:
            The final evaluation results. When the run was resumed from its final checkpoint
            (nothing left to train), only the evaluation runs.
        """
        if self.start_iter >= self.max_iter:
            logger.info("Checkpoint is at the end of the schedule (iteration %d); evaluating",
                        self.start_iter - 1)
            results = self.test()
        else:
            self.data_loader = D.build_train_loader(self.cfg, self.train_records,
                                                    start_iter=self.start_iter)
            self._data_iter = None
            try:
                super().train(self.start_iter, self.max_iter)
            except BaseException:
                self._log_where_to_resume()
                raise
            results = dict(self.eval_hook.latest_results or {}) if self.eval_hook else {}
        n = int(self.cfg.train.get("num_vis_images", 0) or 0)
        if n > 0 and comm.is_main_process():
            visualize_predictions(self.cfg, self.unwrapped_model, self.val_records[:n],
                                  self.val_metadata, os.path.join(self.output_dir, "vis"))
        return results

    def _log_where_to_resume(self) -> None:
        """After a failed or interrupted run: which checkpoint is the last good one."""
        if self.completed:  # every iteration ran and model_final.pth is saved; a later step failed
            return
        last = self.checkpointer.get_checkpoint_file()
        if last is None:
            logger.error("No checkpoint was saved before iteration %d (train.checkpoint_period="
                         "%s)", self.iter, self.cfg.train.checkpoint_period)
            return
        logger.error("Training stopped at iteration %d, so model_final.pth was not written. "
                     "The last checkpoint is %s; train.resume=true continues from it in the "
                     "same folder (segkit-train ... train.resume=true hydra.run.dir=%s)",
                     self.iter, last, self.output_dir)


def wrap_distributed(model: torch.nn.Module, cfg: DictConfig) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel`` inside a multi-process job, else unchanged.

    Buffers are not broadcast at every forward: segkit's norms are frozen, GroupNorm or
    per-process BatchNorm, and a broadcast would make an inference forward on one process
    wait for the others. ``train.find_unused_parameters`` is for models whose forward skips
    some parameters in some iterations (segkit's heads keep every parameter in the graph,
    with zero losses when a batch has nothing to learn from).
    """
    if not comm.is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # buffers are copied from rank 0 once, at construction, either way
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})  # torch < 2.15
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, **no_sync,
        find_unused_parameters=bool(cfg.train.get("find_unused_parameters", False)))


# Predictions below this score are left out of the PNGs: a low-threshold panel is unreadable.
VIS_SCORE_THRESH = 0.5


def visualize_predictions(cfg: DictConfig, model: torch.nn.Module, records: List[dict],
                          metadata: Mapping[str, Any], out_dir: str,
                          score_thresh: float = VIS_SCORE_THRESH) -> List[str]:
    """Save ``<out_dir>/<image stem>.png``: ground truth | predictions, side by side.

    Returns:
        Paths of the written PNGs.
    """
    from segkit.data import read_image
    from segkit.utils.visualizer import draw_gt_and_predictions, save_png

    os.makedirs(out_dir, exist_ok=True)
    was_training = model.training
    model.eval()
    paths = []
    by_id = {r["image_id"]: r for r in records}
    classes = list(metadata["thing_classes"])
    try:
        with torch.no_grad():
            for batch in D.build_test_loader(cfg, records, sharded=False):
                for inp, out in zip(batch, model(batch)):
                    record = by_id[inp["image_id"]]
                    canvas = draw_gt_and_predictions(
                        read_image(record["file_name"]), record.get("annotations", []),
                        out["instances"].to("cpu"), classes, score_thresh=score_thresh)
                    stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
                    paths.append(save_png(canvas, os.path.join(out_dir, f"{stem}.png")))
    finally:
        model.train(was_training)
    logger.info("Saved %d ground truth | prediction images to %s", len(paths), out_dir)
    return paths
