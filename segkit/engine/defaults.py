"""Config -> objects: model, optimizer, LR schedule, datasets, loaders, evaluation.

Each builder reads a few documented config keys and calls the plain-Python API of the
component, so everything here can also be done by hand without Hydra (DESIGN.md, "Registry").
The heavy packages (``segkit.modeling``, ``segkit.data``, ``segkit.evaluation``) are imported
inside the builders so ``import segkit.engine`` stays light.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from segkit.registry import TRAIN_LOADERS, BuildError

from .lr_scheduler import LRMultiplier
from .lr_scheduler import build_lr_scheduler as _build_lr_scheduler_from_solver
from .run_setup import default_setup  # noqa: F401  (re-exported: part of this module's API)

__all__ = [
    "build_datasets", "build_detection_train_loader", "build_lr_scheduler", "build_model",
    "build_optimizer", "build_test_loader", "build_train_loader", "checkpoint_meta",
    "default_setup", "evaluate", "format_results_table", "iou_types", "per_process_batch_size",
    "save_results_json",
]

logger = logging.getLogger(__name__)
Dataset = Tuple[List[dict], Dict[str, Any]]  # (records, metadata)


def _device(cfg: DictConfig) -> torch.device:
    name = str(cfg.train.device)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine; "
                           "use train.device=cpu")
    return device


def _null_num_classes(node: Any, path: str) -> List[str]:
    """Config paths of ``num_classes`` keys that are still null inside ``node``."""
    if isinstance(node, Mapping):
        found = [f"{path}.num_classes"] if "num_classes" in node and node["num_classes"] is None \
            else []
        for key, value in node.items():
            found += _null_num_classes(value, f"{path}.{key}")
        return found
    return []


def build_model(cfg: DictConfig) -> nn.Module:
    """Build ``cfg.model`` from ``META_ARCHS`` and move it to ``cfg.train.device``.

    Raises:
        ValueError: a ``num_classes`` of the model is still null because
            ``dataset.num_classes`` is (call :func:`build_datasets` first).
    """
    import segkit.modeling  # noqa: F401  (registers the components)
    from segkit.registry import META_ARCHS, build

    node = OmegaConf.to_container(cfg.model, resolve=True)
    unset = _null_num_classes(node, "model")
    if unset:
        raise ValueError(f"{', '.join(unset)} is null (it follows dataset.num_classes, which "
                         "build_datasets(cfg) fills from the dataset metadata); call "
                         "build_datasets first or set dataset.num_classes")
    model = build(node, META_ARCHS, path="model")
    return model.to(_device(cfg))


# Parameters of these layers are scale/shift of normalised activations; the Detectron recipes
# give them their own weight decay (``solver.weight_decay_norm``, 0 by default) because decaying
# them towards 0 fights the normalisation instead of regularising the model.
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm,
               nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with momentum over the trainable parameters.

    Keys read: ``solver.optimizer`` ("sgd"), ``base_lr``, ``momentum``, ``weight_decay``,
    ``weight_decay_norm`` (for parameters of normalisation layers).
    """
    solver = cfg.solver
    if str(solver.optimizer).lower() != "sgd":
        raise ValueError(f"solver.optimizer must be 'sgd', got {solver.optimizer!r}")
    regular, norm, seen = [], [], set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:  # frozen or shared
                continue
            seen.add(id(param))
            (norm if isinstance(module, _NORM_TYPES) else regular).append(param)
    groups = [{"params": regular, "weight_decay": float(solver.weight_decay)}]
    if norm:
        groups.append({"params": norm, "weight_decay": float(solver.weight_decay_norm)})
    if not regular and not norm:
        raise ValueError("the model has no trainable parameters (is everything frozen?)")
    return torch.optim.SGD(groups, lr=float(solver.base_lr), momentum=float(solver.momentum))


def build_lr_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """Per-iteration LR scheduler from ``cfg.solver`` (warm-up + step or cosine)."""
    solver = OmegaConf.to_container(cfg.solver, resolve=True)
    return _build_lr_scheduler_from_solver(solver, optimizer)


def build_datasets(cfg: DictConfig, splits: Sequence[str] = ("train", "val")
                   ) -> Dict[str, Dataset]:
    """Load ``cfg.dataset.<split>`` for each split and fill ``dataset.num_classes``.

    Returns:
        ``{split: (records, metadata)}``.

    Raises:
        ValueError: the splits disagree on the class list, or ``dataset.num_classes`` is set
            and differs from the dataset's number of classes.
    """
    from segkit.data import get_dataset

    out = {s: get_dataset(cfg.dataset[s], path=f"dataset.{s}") for s in splits}
    classes = {s: list(meta["thing_classes"]) for s, (_, meta) in out.items()}
    first = splits[0]
    for s in splits[1:]:
        if classes[s] != classes[first]:
            raise ValueError(f"dataset.{s} has classes {classes[s]} but dataset.{first} has "
                             f"{classes[first]}; both splits must use one class list")
    n = len(classes[first])
    if cfg.dataset.get("num_classes") is None:
        with open_dict(cfg):
            cfg.dataset.num_classes = n
        logger.info("dataset.num_classes = %d (from %s)", n, out[first][1].get("name"))
    elif int(cfg.dataset.num_classes) != n:
        raise ValueError(f"dataset.num_classes={cfg.dataset.num_classes} but dataset.{first} "
                         f"has {n} classes {classes[first]}; set it to null to take it from "
                         "the dataset")
    return out


def _use_masks(cfg: DictConfig) -> bool:
    """Whether the model has a mask head (Mask R-CNN); box-only models skip mask decoding."""
    return OmegaConf.select(cfg, "model.roi_heads.mask_head") is not None


def per_process_batch_size(total: int, world_size: int) -> int:
    """``dataloader.batch_size`` counts the images of one iteration over all processes, so a
    recipe trains the same on 1 or N processes; each process loads ``total / N`` of them.

    Raises:
        ValueError: ``total`` is not a multiple of the number of processes.
    """
    if total % world_size:
        raise ValueError(f"dataloader.batch_size={total} is the batch of all {world_size} "
                         f"processes together and must be a multiple of {world_size}")
    return total // world_size


DEFAULT_TRAIN_LOADER = "detection"


def build_train_loader(cfg: DictConfig, records: List[dict], start_iter: int = 0):
    """Infinite training loader: the ``TRAIN_LOADERS`` entry named by ``dataloader.name``
    (default ``"detection"``, :func:`build_detection_train_loader`), given this process's
    share of the batch.

    ``dataloader.batch_size`` is the batch of one iteration over all processes; the builder
    gets ``batch_size = dataloader.batch_size / world size`` and this process's ``rank`` (from
    :mod:`segkit.utils.comm`), so every registered loader shards the same way and a recipe
    trains the same on 1 or N processes.

    A project registers its own builder when its model trains on other batches than images
    with instances (DeepMask's patches, ``dataloader.name=deepmask.patches``)::

        @TRAIN_LOADERS.register("patches", scope="myproject")
        def build_patch_loader(cfg, records, *, batch_size, rank, world_size, start_iter):
            ...  # reads its own keys of cfg.dataloader; returns an iterable of batches

    The builder must return batches the model's training forward accepts, forever (or the
    trainer restarts a finite one), and draw batch ``i`` the same way whether it started at
    0 or at ``start_iter = i`` (a resumed run continues the same stream).

    Args:
        records: the training split's dataset records.
        start_iter: the first iteration to load (batches before it are skipped, not drawn).

    Raises:
        KeyError: ``dataloader.name`` is not registered (the message lists the names).
        ValueError: ``dataloader.batch_size`` is not a multiple of the number of processes.
    """
    from segkit.utils import comm

    name = str(cfg.dataloader.get("name") or DEFAULT_TRAIN_LOADER)
    try:
        builder = TRAIN_LOADERS.get(name)
    except BuildError as e:
        raise BuildError(f"dataloader.name: {e}") from None
    world = comm.get_world_size()
    return builder(cfg, records,
                   batch_size=per_process_batch_size(int(cfg.dataloader.batch_size), world),
                   rank=comm.get_rank(), world_size=world, start_iter=int(start_iter))


@TRAIN_LOADERS.register(DEFAULT_TRAIN_LOADER)
def build_detection_train_loader(cfg: DictConfig, records: List[dict], *, batch_size: int,
                                 rank: int, world_size: int, start_iter: int = 0):
    """The detectors' loader (``TRAIN_LOADERS`` ``"detection"``): images and instances from
    ``dataloader.*`` (train sizes, flip, workers, grouping, filter_empty) and ``train.seed``.

    Args:
        batch_size: images per iteration of this process.
        rank, world_size: this process's shard of every batch.
        start_iter: batches to skip, so a resumed run continues the same sample stream.
    """
    from segkit.data import DatasetMapper
    from segkit.data import build_train_loader as _loader

    dl = cfg.dataloader
    mapper = DatasetMapper.from_config(dl, is_train=True, use_masks=_use_masks(cfg))
    return _loader(records, mapper, batch_size=batch_size, num_workers=int(dl.num_workers),
                   aspect_ratio_grouping=bool(dl.aspect_ratio_grouping),
                   seed=int(cfg.train.seed), filter_empty=bool(dl.filter_empty),
                   rank=rank, world_size=world_size, start_iter=int(start_iter))


def build_test_loader(cfg: DictConfig, records: List[dict], sharded: bool = True):
    """Inference loader over ``records`` (test sizes, no flip), one pass in order.

    Args:
        sharded: in a distributed job, load only this process's contiguous shard (the
            evaluators gather the predictions on rank 0); False loads every record.
    """
    from segkit.data import DatasetMapper
    from segkit.data import build_test_loader as _loader
    from segkit.utils import comm

    mapper = DatasetMapper.from_config(cfg.dataloader, is_train=False, use_masks=False)
    rank, world = (comm.get_rank(), comm.get_world_size()) if sharded else (0, 1)
    return _loader(records, mapper, num_workers=int(cfg.dataloader.num_workers), rank=rank,
                   world_size=world)


def _predicts_masks(cfg: DictConfig) -> bool:
    """A mask head in the ROI heads, or a meta-architecture class that says it predicts masks
    (``predicts_masks = True``, e.g. DeepMask's proposals, which are masks)."""
    if _use_masks(cfg):
        return True
    import segkit.modeling  # noqa: F401  (registers the components)
    from segkit.registry import META_ARCHS

    name = OmegaConf.select(cfg, "model.name")
    return name is not None and bool(getattr(META_ARCHS.get(str(name)), "predicts_masks", False))


def iou_types(cfg: DictConfig) -> List[str]:
    """``evaluation.iou_types`` minus "segm" when the model predicts no masks (Faster R-CNN)."""
    types = [str(t) for t in cfg.evaluation.iou_types]
    if "segm" in types and not _predicts_masks(cfg):
        types.remove("segm")
    return types


def evaluate(cfg: DictConfig, model: nn.Module, records: List[dict], metadata: Mapping,
             output_dir: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Evaluate ``model`` on ``records`` (the first ``evaluation.max_images`` when set) with the
    evaluator named by ``evaluation.name`` (``coco``: AP; ``proposals``: class-agnostic AR).

    The other keys of ``evaluation`` (besides ``iou_types`` and ``max_images``) are passed to
    the evaluator's constructor, e.g. ``max_dets`` of ``proposals``.

    In a distributed job every process runs its shard of the images; the predictions are
    gathered and scored on rank 0, and the results are sent back to every process.

    Returns:
        ``{"bbox": {"AP": ..., ...}, "segm": {...}}`` (or ``{"AR@100": ...}``...) in percent.
    """
    from segkit.evaluation import inference_on_dataset
    from segkit.registry import EVALUATORS, build
    from segkit.utils.comm import broadcast_object

    max_images = cfg.evaluation.get("max_images")
    if max_images is not None:
        # Ground truth and predictions must cover the same images, so cut the records here.
        records = records[: int(max_images)]
    node = {k: v for k, v in cfg.evaluation.items() if k not in ("iou_types", "max_images")}
    node.setdefault("name", "coco")
    evaluator = build(node, EVALUATORS, "evaluation", records=records, metadata=metadata,
                      iou_types=iou_types(cfg), output_dir=output_dir)
    return broadcast_object(
        inference_on_dataset(model, build_test_loader(cfg, records), evaluator))


def checkpoint_meta(cfg: DictConfig, classes: Sequence[str]) -> Dict[str, Any]:
    """The ``meta`` stored in checkpoints: resolved config, class names, experiment name."""
    from segkit.config import to_plain

    return {"config": to_plain(cfg), "classes": list(classes),
            "experiment": cfg.get("experiment")}


_MAIN_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def format_results_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """``{task: {metric: value}}`` as a readable table, one row per task (bbox, segm)."""
    from tabulate import tabulate

    tasks = {t: m for t, m in results.items() if isinstance(m, Mapping)}
    if not tasks:
        return "(no evaluation results)"
    # AP tables show the COCO summary columns; other evaluators (proposal AR) all their metrics
    first = next(iter(tasks.values()))
    columns = list(_MAIN_METRICS) if "AP" in first else [k for k in first if not k.startswith("AP-")]
    rows = [[task] + [metrics.get(m, math.nan) for m in columns] for task, metrics in tasks.items()]
    return tabulate(rows, headers=["task", *columns], tablefmt="github", floatfmt=".2f")


def save_results_json(results: Mapping[str, Any], path: str, **extra: Any) -> str:
    """Write results as strict JSON (NaN -> null), creating the folder."""
    import json

    def clean(x: Any) -> Any:
        if isinstance(x, Mapping):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, float) and not math.isfinite(x):
            return None
        return x

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(clean({**extra, "results": results}), f, indent=2, sort_keys=True)
    return path


from .default_trainer import Trainer  # noqa: E402,F401  (re-exported; it uses the builders above)
