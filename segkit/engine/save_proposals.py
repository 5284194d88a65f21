"""Run a proposal-only model over a dataset split and save its proposals to a file.

    python -m segkit.engine.save_proposals --checkpoint RPN.pth --output proposals.pth \\
        [--split val|train] [--max-images N] [hydra overrides]

The config comes from the checkpoint as for ``segkit-eval`` (:func:`checkpoint_config`), so
``model.proposal_generator.post_nms_topk_test=2000`` or ``dataset=...`` work as overrides. The
images go through the test mapper (no flip); proposals are stored in original image
coordinates (:mod:`segkit.data.proposals`), so one file serves any later resize or flip. For
Fast R-CNN-style training save both splits (``--split train`` and ``--split val``) and pass
them as ``model.proposal_generator.file`` and ``model.proposal_generator.test_file``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

from torch import Tensor

from segkit.evaluation.evaluator import DatasetEvaluator, gather_to_main

__all__ = ["ProposalCollector", "main", "save_dataset_proposals"]

logger = logging.getLogger(__name__)


class ProposalCollector(DatasetEvaluator):
    """Collects ``pred_boxes``/``scores`` of every image (original coordinates) by image_id."""

    def reset(self) -> None:
        self._items: List[Tuple[Hashable, Tensor, Tensor, Tuple[int, int]]] = []

    def process(self, inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> None:
        from segkit.data.proposals import image_id_key

        for inp, out in zip(inputs, outputs):
            inst = out["instances"].to("cpu")
            if inp.get("image_id") is None:
                raise ValueError("save_proposals: a model input has no 'image_id'")
            self._items.append((image_id_key(inp["image_id"]), inst.pred_boxes.tensor,
                                inst.scores, tuple(inst.image_size)))

    def evaluate(self) -> Dict[str, Any]:
        return {}

    def result(self) -> Optional[Tuple[dict, dict, dict]]:
        """(boxes, scores, image_sizes) dicts on the main process, None elsewhere."""
        items = gather_to_main(self._items)
        if items is None:
            return None
        boxes, scores, sizes = {}, {}, {}
        for key, b, s, size in items:
            if key in boxes:
                raise ValueError(f"save_proposals: image_id {key!r} appears twice in the dataset")
            boxes[key], scores[key], sizes[key] = b, s, size
        return boxes, scores, sizes


def save_dataset_proposals(model: Any, data_loader: Any, path: str,
                           meta: Optional[Mapping[str, Any]] = None) -> Optional[str]:
    """Run ``model`` (eval outputs with ``pred_boxes``, ``scores``) over ``data_loader`` and
    write the proposal file ``path``. Returns ``path`` (None on non-main processes)."""
    from segkit.data.proposals import save_proposals
    from segkit.evaluation import inference_on_dataset

    collector = ProposalCollector()
    inference_on_dataset(model, data_loader, collector)
    result = collector.result()
    if result is None:
        return None
    boxes, scores, sizes = result
    return save_proposals(path, boxes, scores, sizes, meta=meta)


def run(checkpoint: str, output: str, overrides: Sequence[str] = (), split: str = "val",
        max_images: Optional[int] = None) -> str:
    """Load ``checkpoint`` (a ``proposal_only`` model, or one whose meta-architecture class
    sets ``makes_proposals = True``), propose on ``dataset.<split>`` and save to ``output``."""
    from omegaconf import open_dict

    from segkit.checkpoint import load_checkpoint, load_state_dict_report
    from segkit.registry import META_ARCHS

    from .cli import checkpoint_config
    from .defaults import build_datasets, build_model, build_test_loader

    ckpt = load_checkpoint(checkpoint)
    meta = ckpt.get("meta") or {}
    cfg = checkpoint_config(meta, overrides, checkpoint)
    # proposal_only, or a project's proposal model that says so (deepmask.deepmask, ...)
    if cfg.model.name != "proposal_only" and not getattr(
            META_ARCHS.get(str(cfg.model.name)), "makes_proposals", False):
        raise ValueError(f"save_proposals needs a proposal_only model (e.g. experiment "
                         f"rpn_r50_fpn_1x_coco) or a meta-architecture with makes_proposals "
                         f"(deepmask.deepmask); checkpoint '{checkpoint}' builds "
                         f"model.name={cfg.model.name!r}")
    if split not in cfg.dataset:
        raise ValueError(f"no dataset.{split} in the config; splits: "
                         f"{[k for k in cfg.dataset if k != 'num_classes']}")
    with open_dict(cfg):
        cfg.dataset.num_classes = None  # proposals are class-agnostic: any class list will do
    records, metadata = build_datasets(cfg, splits=(split,))[split]
    if max_images is not None:
        records = records[: int(max_images)]
    model = build_model(cfg)
    load_state_dict_report(model, ckpt["model"], source=checkpoint)
    info = {"checkpoint": os.path.abspath(checkpoint), "experiment": cfg.get("experiment"),
            "dataset": metadata.get("name"), "split": split}
    path = save_dataset_proposals(model, build_test_loader(cfg, records), output, meta=info)
    logger.info("proposals of %d images written to %s", len(records), output)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line (see the module docstring); returns the exit code (2: bad input)."""
    from hydra.errors import HydraException

    from segkit.checkpoint import CheckpointError

    parser = argparse.ArgumentParser(
        prog="python -m segkit.engine.save_proposals",
        description="Save the proposals of a proposal_only checkpoint over a dataset split.")
    parser.add_argument("--checkpoint", required=True, help="proposal_only checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="proposal file to write (.pth)")
    parser.add_argument("--split", default="val", help="dataset split (default: val)")
    parser.add_argument("--max-images", type=int, default=None, help="first N images only")
    parser.add_argument("overrides", nargs="*", help="hydra config overrides")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        run(args.checkpoint, args.output, args.overrides, args.split, args.max_images)
    except (CheckpointError, HydraException, ValueError, KeyError, FileNotFoundError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"save_proposals: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
