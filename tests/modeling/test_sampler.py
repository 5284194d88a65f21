"""subsample_labels: counts, fractions, determinism, torchvision's sampler under one seed."""
import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from segkit.modeling.sampler import subsample_labels


def _labels(n_pos, n_neg, n_ignore, seed=0):
    labels = torch.tensor([1] * n_pos + [0] * n_neg + [-1] * n_ignore)
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def test_counts_and_membership():
    labels = _labels(300, 1000, 50)
    pos, neg = subsample_labels(labels, 256, 0.5, bg_label=0)
    assert len(pos) == 128 and len(neg) == 128
    assert (labels[pos] == 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 128


def test_few_positives_are_filled_with_negatives():
    labels = _labels(10, 1000, 5)
    pos, neg = subsample_labels(labels, 256, 0.25, bg_label=0)
    assert len(pos) == 10 and len(neg) == 246
    pos, neg = subsample_labels(_labels(0, 100, 0), 256, 0.5, bg_label=0)
    assert len(pos) == 0 and len(neg) == 100


def test_roi_heads_style_labels_with_background_last():
    labels = torch.tensor([0, 3, 5, 5, 2, -1, 5, 1])  # K = 5 classes, bg = 5
    pos, neg = subsample_labels(labels, 4, 0.5, bg_label=5)
    assert set(pos.tolist()) <= {0, 1, 4, 7} and len(pos) == 2
    assert set(neg.tolist()) <= {2, 3, 6} and len(neg) == 2


def test_deterministic_and_equal_to_torchvision_under_a_seed():
    labels = _labels(200, 800, 30)
    torch.manual_seed(3)
    a = subsample_labels(labels, 256, 0.5, 0)
    torch.manual_seed(3)
    b = subsample_labels(labels, 256, 0.5, 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(3)
    tv_pos, tv_neg = BalancedPositiveNegativeSampler(256, 0.5)([labels])
    assert torch.equal(torch.sort(a[0]).values, torch.where(tv_pos[0])[0])
    assert torch.equal(torch.sort(a[1]).values, torch.where(tv_neg[0])[0])


def test_bad_inputs():
    with pytest.raises(ValueError, match="1-D"):
        subsample_labels(torch.zeros(2, 2), 4, 0.5, 0)
    with pytest.raises(ValueError, match="positive_fraction"):
        subsample_labels(torch.zeros(4), 4, 1.5, 0)
