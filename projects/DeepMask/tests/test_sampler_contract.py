"""The patch sampler's samples train the models as they are (one contract, both sides)."""
import numpy as np
import pytest

from segkit.data import load_coco_json
from segkit_deepmask.data import PatchSampler, square, write_coco_dataset

from deepmask_testing import build

THIN_R18 = ["model/backbone=deepmask_resnet18", "model.backbone.resnet.base_channels=16"]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    images = [{"height": 120, "width": 160, "objects": [
        {"polygon": square(20 + 10 * i, 30, 40), "category": 1}]} for i in range(2)]
    return load_coco_json(*write_coco_dataset(str(root), images))[0]


@pytest.mark.parametrize("preset, overrides", [
    ("deepmask", ["model=deepmask", *THIN_R18]),
    ("sharpmask", ["model=sharpmask", *THIN_R18, "model.train_refinement_only=false"]),
    ("deepmask_nips", ["model=deepmask_vgg"]),
])
def test_sampler_batches_feed_the_model(records, preset, overrides):
    sampler = PatchSampler.from_preset(preset, records)
    rng = np.random.default_rng(0)
    model = build(*overrides).train()
    n = 1 if preset == "deepmask_nips" else 2  # the VGG model is large; one patch suffices
    for kind in ("mask", "score"):
        losses = model([sampler.sample(kind, rng) for _ in range(n)])
        assert set(losses) == {f"loss_{kind}"} and losses[f"loss_{kind}"].isfinite()
