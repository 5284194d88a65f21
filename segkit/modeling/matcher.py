"""Assign each prediction (anchor / proposal) to a ground-truth box by IoU thresholds.

Used by the RPN (FPN section 5: positive if IoU > 0.7 or highest IoU with a GT, negative if
IoU < 0.3) and by the ROI heads (Mask R-CNN section 3: foreground if IoU >= 0.5).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Matcher"]


class Matcher:
    """IoU-threshold matcher returning, per prediction, its best GT and a label.

    ``thresholds`` split [0, 1] into intervals ``[-inf, t0), [t0, t1), ..., [tk, inf)``; a
    prediction whose best IoU falls into interval ``i`` gets ``labels[i]``. With the RPN's
    ``thresholds=[0.3, 0.7], labels=[0, -1, 1]``: below 0.3 -> 0 (background), between -> -1
    (ignored), at or above 0.7 -> 1 (foreground).

    Args:
        thresholds: increasing IoU thresholds.
        labels: one label per interval (``len(thresholds) + 1`` values) from {-1, 0, 1}.
        allow_low_quality_matches: also label as foreground (1) every prediction that attains
            the highest IoU of some GT, including ties, even below the top threshold. This is
            the "highest IoU with a GT" rule of the RPN (Faster R-CNN / FPN section 5) so that
            every GT gets at least one anchor. Semantics follow torchvision: the matched GT
            index of such a prediction stays its overall argmax GT. A GT that overlaps no
            prediction at all (best IoU 0, e.g. a zero-area box) has no best match; torchvision
            and detectron2 would then make every prediction foreground, here it adds none.
    """

    def __init__(self, thresholds: Sequence[float], labels: Sequence[int],
                 allow_low_quality_matches: bool = False):
        thresholds = [float(t) for t in thresholds]
        if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"Matcher: thresholds must be increasing, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(
                f"Matcher: need len(thresholds) + 1 labels, got thresholds={thresholds} "
                f"labels={list(labels)}"
            )
        if any(label not in (-1, 0, 1) for label in labels):
            raise ValueError(f"Matcher: labels must be in {{-1, 0, 1}}, got {list(labels)}")
        self.thresholds: List[float] = [-math.inf] + thresholds + [math.inf]
        self.labels: List[int] = [int(label) for label in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __repr__(self) -> str:
        return (f"Matcher(thresholds={self.thresholds[1:-1]}, labels={self.labels}, "
                f"allow_low_quality_matches={self.allow_low_quality_matches})")

    def __call__(self, match_quality_matrix: Tensor) -> Tuple[Tensor, Tensor]:
        """Match predictions to GT boxes.

        Args:
            match_quality_matrix: (M, N) pairwise quality (IoU) between M GT boxes and N
                predictions. M may be 0 (image without GT).

        Returns:
            matches: (N,) int64, index in [0, M) of the best GT of each prediction (0 when
                M == 0; only meaningful where ``match_labels == 1``).
            match_labels: (N,) int8 in {-1, 0, 1}.
        """
        if match_quality_matrix.dim() != 2:
            raise ValueError(
                f"Matcher: match_quality_matrix must be (M, N), got "
                f"{tuple(match_quality_matrix.shape)}"
            )
        num_gt, num_pred = match_quality_matrix.shape
        device = match_quality_matrix.device
        if num_gt == 0 or num_pred == 0:
            # No GT: every prediction falls in the lowest interval (background for RPN/ROI).
            matches = torch.zeros(num_pred, dtype=torch.int64, device=device)
            labels = torch.full((num_pred,), self.labels[0], dtype=torch.int8, device=device)
            return matches, labels

        matched_vals, matches = match_quality_matrix.max(dim=0)
        # -1 start value: only a NaN quality escapes every interval, and it is then ignored.
        match_labels = torch.full((num_pred,), -1, dtype=torch.int8, device=device)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            in_interval = (matched_vals >= low) & (matched_vals < high)
            match_labels[in_interval] = label

        if self.allow_low_quality_matches:
            self._set_low_quality_matches(match_labels, match_quality_matrix)
        return matches, match_labels

    @staticmethod
    def _set_low_quality_matches(match_labels: Tensor, match_quality_matrix: Tensor) -> None:
        """Label as foreground every prediction that ties for the best IoU of some GT.

        Ties matter: with a regular anchor grid several anchors often share the same IoU with
        a GT, and all of them are kept (as in torchvision and Detectron).
        """
        highest_per_gt, _ = match_quality_matrix.max(dim=1)
        is_best = (match_quality_matrix == highest_per_gt[:, None]) & (highest_per_gt[:, None] > 0)
        match_labels[is_best.any(dim=0)] = 1
