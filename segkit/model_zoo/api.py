"""``segkit.model_zoo.get`` and friends: published weights as ready segkit models.

::

    from segkit import model_zoo

    model_zoo.list_models()                                   # names in the catalog
    model = model_zoo.get("mask_rcnn_r50_fpn_3x_detectron2")  # eval mode, weights loaded
    model.metadata["thing_classes"][0]                        # 'person'
    path = model_zoo.checkpoint_path("resnet50_imagenet_torchvision")  # train.init_weights=path

The model takes segkit's model input (README "Conventions"): images already resized like the
test mapper (``model.metadata["config"].dataloader.min_size_test`` / ``max_size_test``, 800 /
1333 for the COCO models); :func:`segkit.engine.demo.predict_image` does that for one image.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from torch import nn

from . import store
from .catalog import Catalog, ZooEntry, ZooError, load_catalog

__all__ = ["checkpoint_path", "entry", "fetch", "get", "list_models"]

CatalogArg = Union[None, str, os.PathLike, Sequence[Any], Catalog]


def list_models(catalog: CatalogArg = None, task: Optional[str] = None) -> List[str]:
    """Names of the catalog's entries (sorted), optionally only those of one ``task``
    (``instance_segmentation``, ``detection``, ``backbone``)."""
    entries = load_catalog(catalog).entries
    return sorted(n for n, e in entries.items() if task is None or e.task == task)


def entry(name: str, catalog: CatalogArg = None) -> ZooEntry:
    """The catalog entry ``name``.

    Args:
        catalog: a catalog file, a list of them, a loaded :class:`Catalog`, or None for
            ``$SEGKIT_ZOO_CATALOG`` / the shipped catalog.

    Raises:
        UnknownModelError: no such entry (the message lists close names).
        CatalogError: the catalog file is missing or malformed.
    """
    return load_catalog(catalog).get(name)


def fetch(name: str, catalog: CatalogArg = None, progress: bool = True) -> Path:
    """Path of the publisher's file, downloaded and checked once (see :mod:`.store`)."""
    return store.fetch(entry(name, catalog), progress=progress)


def checkpoint_path(name: str, catalog: CatalogArg = None, progress: bool = True) -> Path:
    """Path of a segkit checkpoint of ``name`` (converted once and cached), e.g. for
    ``segkit-eval --checkpoint`` or, for a backbone entry, ``train.init_weights``."""
    return store.checkpoint_path(entry(name, catalog), progress=progress)


def get(name: str, pretrained: bool = True, device: str = "cpu", *,
        catalog: CatalogArg = None, overrides: Sequence[str] = (),
        progress: bool = True) -> nn.Module:
    """Build the model of catalog entry ``name``, in eval mode on ``device``.

    Detection entries give the experiment's full model (``two_stage`` / ``one_stage``); a
    ``backbone`` entry gives the bottom-up network alone (e.g. the ``ResNet`` of
    ``resnet50_imagenet_torchvision``; its classifier is not kept). Weights go through the
    source's converter once (cached, see :mod:`.store`) and are loaded with
    :func:`~segkit.checkpoint.load_state_dict_report`, which logs one table of whatever does
    not fit.

    ``model.metadata`` is a dict with ``name``, ``thing_classes`` (class names, index =
    contiguous class id; empty for a backbone), ``experiment``, ``task``, ``metrics`` (the
    published ones), ``config`` (the composed config the model was built from) and
    ``checkpoint`` (the loaded file, None without ``pretrained``).

    Args:
        name: catalog entry (``segkit-zoo list``).
        pretrained: load the published weights; False builds the same model untrained.
        device: torch device for the model.
        catalog: see :func:`entry`.
        overrides: extra Hydra overrides on the entry's experiment (e.g. inference settings
            such as ``model.roi_heads.score_thresh_test=0.5``).
        progress: download progress bar (when stderr is a terminal).

    Raises:
        UnknownModelError, CatalogError: bad name or catalog.
        DownloadError: cannot download (or offline without a cached file).
        ZooError: the file fails its sha256 pin, or cannot be converted.
    """
    from omegaconf import open_dict

    from segkit.checkpoint import load_checkpoint, load_state_dict_report

    from .sources import BACKBONE_PREFIX, entry_config

    e = entry(name, catalog)
    cfg = entry_config(e, overrides)
    with open_dict(cfg):
        cfg.train.device = str(device)
    model = _build(e, cfg)
    path = None
    if pretrained:
        path = store.checkpoint_path(e, progress=progress)
        state = load_checkpoint(str(path))["model"]
        if e.task == "backbone":
            state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items()
                     if k.startswith(BACKBONE_PREFIX)}
        load_state_dict_report(model, state, source=f"model zoo '{e.name}' ({path})")
    model.eval()
    model.metadata = {"name": e.name, "task": e.task, "experiment": e.experiment,
                      "thing_classes": list(e.classes), "metrics": dict(e.metrics),
                      "config": cfg, "checkpoint": None if path is None else str(path)}
    return model


def _build(e: ZooEntry, cfg: Any) -> nn.Module:
    if e.task != "backbone":
        from segkit.engine.defaults import build_model

        return build_model(cfg)
    import torch
    from omegaconf import OmegaConf

    import segkit.modeling  # noqa: F401  (registers the components)
    from segkit.registry import BACKBONES, build

    node = OmegaConf.to_container(cfg.model.backbone, resolve=True)
    if "bottom_up" not in node:
        raise ZooError(f"backbone entry '{e.name}': model.backbone of experiment "
                       f"{e.experiment} has no bottom_up network")
    return build(node["bottom_up"], BACKBONES, path="model.backbone.bottom_up").to(
        torch.device(str(cfg.train.device)))
