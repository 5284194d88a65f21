"""Evaluation: COCO box/mask AP (``EVALUATORS["coco"]``), class-agnostic proposal AR
(``EVALUATORS["proposals"]``) and the inference loop."""
from .evaluator import DatasetEvaluator, DatasetEvaluators, gather_to_main, inference_on_dataset
from .coco_utils import (
    convert_to_coco_dict, evaluate_coco_json, instances_to_coco_json, load_coco_gt,
    run_coco_eval, stat_names,
)
from .coco_evaluation import COCOEvaluator
from .proposal_evaluation import ProposalEvaluator, proposal_recall

__all__ = [
    "DatasetEvaluator", "DatasetEvaluators", "inference_on_dataset", "gather_to_main",
    "COCOEvaluator", "ProposalEvaluator", "proposal_recall", "instances_to_coco_json",
    "convert_to_coco_dict", "evaluate_coco_json", "load_coco_gt", "run_coco_eval", "stat_names",
]
