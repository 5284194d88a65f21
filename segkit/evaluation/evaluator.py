"""Evaluator protocol, evaluator combination and the inference loop over a dataset."""
from __future__ import annotations

import datetime
import logging
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from torch import nn

from segkit.utils.progress import ProgressBar

__all__ = ["DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset", "gather_to_main"]

logger = logging.getLogger(__name__)


def gather_to_main(items: List[Any]) -> Optional[List[Any]]:
    """Concatenate per-process lists on the main process.

    Returns the full list on rank 0 (or when not distributed) and ``None`` on other ranks, so
    only the main process evaluates and writes files.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return items
    world = torch.distributed.get_world_size()
    if world == 1:
        return items
    gathered: List[Optional[List[Any]]] = [None] * world
    torch.distributed.all_gather_object(gathered, items)
    if torch.distributed.get_rank() != 0:
        return None
    return [x for part in gathered for x in part]


class DatasetEvaluator:
    """Base class: ``reset()``, then ``process()`` per batch, then ``evaluate()`` once."""

    def reset(self) -> None:
        """Prepare for a new evaluation round."""

    def process(self, inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> None:
        """Consume one batch of model inputs and the matching model outputs."""
        raise NotImplementedError

    def evaluate(self) -> Dict[str, Any]:
        """Return ``{task: {metric: value}}`` (``{}`` on non-main processes)."""
        raise NotImplementedError


class DatasetEvaluators(DatasetEvaluator):
    """Several evaluators fed with the same batches; their results are merged.

    Args:
        evaluators: the evaluators. Two evaluators reporting the same task key is an error
            (one would silently hide the other).
    """

    def __init__(self, evaluators: Iterable[DatasetEvaluator]):
        self.evaluators = list(evaluators)

    def reset(self) -> None:
        for ev in self.evaluators:
            ev.reset()

    def process(self, inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> None:
        for ev in self.evaluators:
            ev.process(inputs, outputs)

    def evaluate(self) -> Dict[str, Any]:
        results: Dict[str, Any] = {}
        for ev in self.evaluators:
            for key, value in (ev.evaluate() or {}).items():
                if key in results:
                    raise KeyError(f"two evaluators report the same task {key!r} "
                                   f"({type(ev).__name__} is the second)")
                results[key] = value
        return results


def _num_batches(data_loader: Any) -> Optional[int]:
    try:
        return len(data_loader)
    except TypeError:  # iterable without a length
        return None


def inference_on_dataset(
    model: Any, data_loader: Iterable[List[Mapping]],
    evaluator: Optional[DatasetEvaluator], max_images: Optional[int] = None,
) -> Dict[str, Any]:
    """Run ``model`` over ``data_loader`` in eval mode and feed ``evaluator``.

    Args:
        model: callable taking a list of model input dicts and returning a list of output dicts
            (``{"instances": Instances}`` at original resolution). When it is an
            ``nn.Module`` it is switched to eval mode and its previous mode is restored after.
        data_loader: yields lists of model input dicts (batches).
        evaluator: receives every batch; ``None`` runs inference only (returns ``{}``).
        max_images: stop after this many images (a final batch is cut to fit); ``None`` = all.

    Returns:
        ``evaluator.evaluate()`` (``{}`` when there is no evaluator or on non-main processes).
    """
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be a positive int or None, got {max_images}")
    if evaluator is not None:
        evaluator.reset()
    was_training = model.training if isinstance(model, nn.Module) else None
    if was_training is not None:
        model.eval()
    total = _num_batches(data_loader)
    num_images, warmup = 0, 0
    compute_time, warm_compute = 0.0, 0.0
    start = time.perf_counter()
    try:
        with torch.no_grad(), ProgressBar(total, desc="inference", unit="batch") as bar:
            for batch in bar.wrap(data_loader):
                if max_images is not None:
                    batch = list(batch)[: max_images - num_images]
                t0 = time.perf_counter()
                outputs = model(batch)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                compute_time += dt
                if num_images == 0:  # the first batch pays for lazy init / cudnn autotune
                    warmup, warm_compute = len(batch), dt
                if evaluator is not None:
                    evaluator.process(batch, outputs)
                num_images += len(batch)
                if max_images is not None and num_images >= max_images:
                    break
    finally:
        if was_training is not None:
            model.train(was_training)
    wall = time.perf_counter() - start
    steady = num_images - warmup
    per_img = (compute_time - warm_compute) / steady if steady > 0 else compute_time / max(
        num_images, 1)
    logger.info("inference on %d images took %s (%.4f s/img model time, %.4f s/img overall)",
                num_images, datetime.timedelta(seconds=int(wall)), per_img,
                wall / max(num_images, 1))
    if evaluator is None:
        return {}
    return evaluator.evaluate() or {}
