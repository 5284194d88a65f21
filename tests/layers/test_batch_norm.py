"""FrozenBatchNorm2d, conversion from BatchNorm trees, checkpoint loading, get_norm."""
import pytest
import torch
from torch import nn

from segkit.layers import FrozenBatchNorm2d, convert_frozen_batchnorm, get_norm


def _trained_bn(c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.1)
    return bn.eval()


def test_frozen_matches_batchnorm_eval():
    bn = _trained_bn()
    x = torch.randn(2, 6, 5, 5)
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(bn)
    assert isinstance(frozen, FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(x), bn(x))
    assert list(frozen.parameters()) == []
    x.requires_grad_(True)
    frozen(x).sum().backward()  # gradients still flow to the input
    assert x.grad is not None


def test_convert_tree_replaces_nested_batchnorms():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), _trained_bn(),
                          nn.Sequential(nn.SyncBatchNorm(6), nn.ReLU()))
    x = torch.randn(1, 3, 4, 4)
    model[2][0].eval()
    ref = model(x)
    out = convert_frozen_batchnorm(model)
    assert out is model
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[2][0], FrozenBatchNorm2d)
    torch.testing.assert_close(model(x), ref)


def test_load_state_dict_with_and_without_num_batches_tracked():
    bn = _trained_bn()
    state = bn.state_dict()
    assert "num_batches_tracked" in state
    for sd in (state, {k: v for k, v in state.items() if k != "num_batches_tracked"}):
        frozen = FrozenBatchNorm2d(6)
        frozen.load_state_dict(dict(sd), strict=True)
        torch.testing.assert_close(frozen.running_var, bn.running_var)
    # Nested inside a module (prefixed keys) too.
    parent = nn.Sequential(FrozenBatchNorm2d(6))
    parent.load_state_dict({f"0.{k}": v for k, v in state.items()})
    torch.testing.assert_close(parent[0].weight, bn.weight.detach())


def test_get_norm():
    assert get_norm("", 8) is None and get_norm(None, 8) is None
    assert isinstance(get_norm("bn", 8), nn.BatchNorm2d)
    assert isinstance(get_norm("frozen_bn", 8), FrozenBatchNorm2d)
    assert get_norm("gn", 256).num_groups == 32
    assert get_norm("gn", 16).num_groups == 16
    assert get_norm("gn", 48).num_groups == 24
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        get_norm("batchnorm", 8)
