"""The DeepMask logistic loss on {-1, +1} labels (papers.md 1.3)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from segkit.modeling.losses import REDUCTIONS, check_same_shape
from segkit.registry import LOSSES
from segkit.utils.comm import get_world_size

__all__ = ["PatchLogisticLoss"]

@LOSSES.register("logistic", scope="deepmask")
class PatchLogisticLoss(nn.Module):
    """``weight * reduce_k( mean_ij log(1 + exp(-y_k^ij * f_k^ij)) )`` over patches k.

    The paper's loss (papers.md 1.3) averages the per-pixel logistic loss over the pixels of
    each patch (the 1 / (w° h°) factor) and sums over patches; the score term is the same with
    one "pixel" per patch and a weight lambda = 1/32. ``log(1 + exp(-y f))`` is computed as
    ``softplus(-y f)``, which is stable for large logits.

    Args:
        weight: factor on the loss (1 for masks, lambda = 1/32 for scores).
        reduction: over the batch: "sum" (paper; the batch of all processes of a distributed
            run), "mean" (the released code's
            ``SoftMarginCriterion`` before its gradient scaling) or "none" (per patch).

    Forward:
        logits: (N, ...) float logits of N patches (masks (N, g, g), scores (N,)).
        labels: same shape, values -1 / +1.
        Returns a scalar, or (N,) for "none".
    """

    def __init__(self, weight: float = 1.0, reduction: str = "sum"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss 'deepmask.logistic': reduction must be one of "
                             f"{list(REDUCTIONS)}, got {reduction!r}")
        self.weight, self.reduction = float(weight), reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        check_same_shape("deepmask.logistic", logits=logits, labels=labels)
        per_patch = F.softplus(-labels.to(logits.dtype) * logits)
        if per_patch.dim() > 1:
            per_patch = per_patch.flatten(1).mean(1)
        if self.reduction == "sum":
            # The sum is over the whole batch: DistributedDataParallel averages the processes'
            # gradients, so each process's partial sum counts world_size times (the logged
            # loss, averaged over the processes too, is then the whole batch's sum).
            per_patch = per_patch.sum() * get_world_size()
        elif self.reduction == "mean":
            per_patch = per_patch.mean()
        return self.weight * per_patch

    def extra_repr(self) -> str:
        return f"weight={self.weight}, reduction={self.reduction!r}"
