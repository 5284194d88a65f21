"""Fixtures for the data tests: a tiny COCO-format dataset written into a temporary folder."""
import json

import numpy as np
import pytest
from coco_samples import tiny_coco_dict
from PIL import Image


@pytest.fixture
def tiny_coco(tmp_path):
    """Write the tiny dataset (json + random PNG images); returns (json path, image folder)."""
    data = tiny_coco_dict()
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for im in data["images"]:
        pixels = rng.integers(0, 256, size=(im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(img_dir / im["file_name"])
    json_path = tmp_path / "ann.json"
    json_path.write_text(json.dumps(data))
    return str(json_path), str(img_dir)
