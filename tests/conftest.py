"""Shared test set-up: two threads (the CI machine has two cores), GPU tests skip without CUDA,
and the embedded dataset is generated into a session-wide temporary cache."""
import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _segkit_cache(tmp_path_factory):
    """Keep generated data out of the user's ~/.cache unless the caller chose a cache."""
    if "SEGKIT_CACHE" not in os.environ:
        os.environ["SEGKIT_CACHE"] = str(tmp_path_factory.mktemp("segkit_cache"))
    yield
