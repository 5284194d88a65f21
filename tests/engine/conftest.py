"""Toy model and data for the engine tests: fast, and independent of the real detector."""
import pytest
import torch
from torch import nn


class ToyModel(nn.Module):
    """Takes a list of ``{"x": (4,), "y": (2,)}`` dicts; returns two scalar losses.

    ``nan_at`` makes ``loss_b`` NaN on that call (counted in training mode), to test the guard.
    """

    def __init__(self, nan_at=None):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 2)
        self.nan_at = nan_at
        self.calls = 0

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        y = torch.stack([d["y"] for d in batch])
        pred = self.out(torch.relu(self.norm(self.fc(x))))
        if not self.training:
            return [{"pred": p} for p in pred]
        loss_b = (pred - y).abs().mean()
        if self.nan_at is not None and self.calls == self.nan_at:
            loss_b = loss_b * float("nan")
        self.calls += 1
        return {"loss_a": ((pred - y) ** 2).mean(), "loss_b": loss_b}


def random_batches(batch_size=4):
    """Infinite loader drawing from torch's global RNG, so restoring the RNG state restores
    the data stream (what a resumed run relies on)."""
    while True:
        x = torch.randn(batch_size, 4)
        yield [{"x": xi, "y": xi[:2] * 2.0 + 1.0} for xi in x]


@pytest.fixture
def toy_model():
    def make(**kw):
        torch.manual_seed(0)
        return ToyModel(**kw)

    return make


@pytest.fixture
def toy_batches():
    return random_batches
