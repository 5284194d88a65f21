"""Matcher vs torchvision's Matcher, hand-computed cases and images without GT."""
import pytest
import torch
from torchvision.models.detection._utils import Matcher as TVMatcher

from segkit.modeling.matcher import Matcher


def _torchvision_labels(iou, low, high, allow_low):
    m = TVMatcher(high, low, allow_low_quality_matches=allow_low)(iou.clone())
    labels = torch.where(m >= 0, 1, torch.where(m == -1, 0, -1))
    return m, labels


@pytest.mark.parametrize("allow_low", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_torchvision_on_random_iou(seed, allow_low):
    gen = torch.Generator().manual_seed(seed)
    iou = torch.rand(5, 200, generator=gen) * 0.9
    # quantise so that ties (several predictions sharing a GT's best IoU) really occur
    iou = (iou * 20).floor() / 20
    ref_matches, ref_labels = _torchvision_labels(iou, 0.3, 0.7, allow_low)
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=allow_low)(iou)
    assert matches.dtype == torch.int64 and labels.dtype == torch.int8
    assert torch.equal(labels.long(), ref_labels)
    pos = labels == 1
    assert torch.equal(matches[pos], ref_matches[pos])
    assert torch.equal(matches, iou.max(dim=0).indices)


def test_single_threshold_like_roi_heads():
    iou = torch.tensor([[0.5, 0.49, 0.9, 0.0], [0.2, 0.1, 0.95, 0.6]])
    matches, labels = Matcher([0.5], [0, 1])(iou)
    assert labels.tolist() == [1, 0, 1, 1]
    assert matches.tolist() == [0, 0, 1, 1]
    ref, _ = _torchvision_labels(iou, 0.5, 0.5, False)
    assert torch.equal(labels.long(), (ref >= 0).long())


def test_low_quality_ties_hand_computed():
    iou = torch.tensor([[0.1, 0.4, 0.4, 0.2], [0.0, 0.0, 0.0, 0.25]])
    _, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [0, 1, 1, 1]  # both tied best of GT 0, and the best of GT 1


def test_gt_overlapping_nothing_adds_no_low_quality_match():
    # GT 1 (e.g. a zero-area box) has IoU 0 with every prediction: it has no best match, and
    # must not turn every prediction into foreground through the "ties at the maximum" rule.
    iou = torch.tensor([[0.1, 0.4, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
    matches, labels = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)(iou)
    assert labels.tolist() == [0, 1, 0, 0]  # only the best of GT 0 is promoted
    assert matches[1] == 0


def test_empty_gt_and_empty_predictions():
    matcher = Matcher([0.3, 0.7], [0, -1, 1], allow_low_quality_matches=True)
    matches, labels = matcher(torch.zeros(0, 7))
    assert matches.tolist() == [0] * 7 and labels.tolist() == [0] * 7  # all background
    matches, labels = matcher(torch.zeros(3, 0))
    assert matches.numel() == 0 and labels.numel() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="increasing"):
        Matcher([0.7, 0.3], [0, -1, 1])
    with pytest.raises(ValueError, match="len\\(thresholds\\) \\+ 1"):
        Matcher([0.3, 0.7], [0, 1])
    with pytest.raises(ValueError, match="-1, 0, 1"):
        Matcher([0.5], [0, 2])
