"""Shared fixtures: models composed from the project's configs."""
import os

import pytest
import torch

from deepmask_testing import build

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def deepmask_r50():
    return build("model=deepmask")


@pytest.fixture(scope="session")
def sharpmask_r50():
    return build("model=sharpmask", "model.train_refinement_only=false")
