"""The shipped catalog is valid and consistent with its experiments; catalog errors name the
file and key. (detectron2's RetinaNet head layout: tests/checkpoint/test_detectron2.py.)"""
import os
import re
import textwrap
import urllib.parse

import pytest
from omegaconf import OmegaConf

from segkit.model_zoo import CatalogError, UnknownModelError, entry, list_models, load_catalog
from segkit.model_zoo.catalog import BUILTIN_CLASS_LISTS, shipped_catalog_path
from segkit.model_zoo.sources import entry_config

REQUIRED = {
    "mask_rcnn_r50_fpn_torchvision", "faster_rcnn_r50_fpn_torchvision",
    "retinanet_r50_fpn_torchvision", "resnet50_imagenet_torchvision",
    "mask_rcnn_r50_fpn_3x_detectron2", "mask_rcnn_r101_fpn_3x_detectron2",
    "faster_rcnn_r50_fpn_3x_detectron2", "retinanet_r50_fpn_3x_detectron2",
}
SHIPPED = load_catalog("shipped")


def test_shipped_catalog_is_found_and_complete():
    assert shipped_catalog_path().is_file()
    assert REQUIRED <= set(list_models())
    assert set(list_models(task="backbone")) == {"resnet50_imagenet_torchvision"}


@pytest.mark.parametrize("name", sorted(SHIPPED.entries))
def test_shipped_entry(name):
    e = SHIPPED.entries[name]
    assert all(urllib.parse.urlsplit(u).scheme == "https" for u in e.urls)
    assert e.page.startswith("https://") and e.license
    stem = os.path.splitext(e.filename)[0]
    # the publisher's hash is the one in its file name: torchvision <name>-<sha256 prefix>,
    # detectron2 model_final_<md5 prefix>
    if e.source == "torchvision":
        assert re.fullmatch(r"[0-9a-f]{8,64}", e.sha256) and stem.endswith("-" + e.sha256)
        assert e.md5 is None
    elif e.source == "detectron2":
        assert e.sha256 is None and stem == f"model_final_{e.md5}" and len(e.md5) == 6
        assert "md5 prefix" in e.hash_check() and "sha256 pin" in e.hash_check()
    assert e.approx_size_mib and e.size_bytes is None  # nobody publishes exact sizes
    assert e.metrics["source"].startswith("https://") and e.metrics["dataset"]
    cfg = entry_config(e)  # the experiment composes
    assert cfg.experiment == e.experiment
    if e.task == "backbone":
        bottom_up = cfg.model.backbone.bottom_up
        assert (bottom_up.name, bottom_up.depth, bottom_up.stride_in_1x1) == ("resnet", 50, False)
        assert not e.classes
        return
    assert len(e.classes) == cfg.dataset.num_classes
    heads = OmegaConf.select(cfg, "model.roi_heads") or cfg.model.head
    assert heads.num_classes == len(e.classes)
    assert ("mask_ap" in e.metrics) == (OmegaConf.select(cfg, "model.roi_heads.mask_head")
                                         is not None)
    if e.source == "detectron2":
        assert cfg.model.backbone.bottom_up.stride_in_1x1 is True
        assert e.class_list == "coco80" and cfg.dataloader.min_size_test == 800


def test_builtin_class_lists():
    from segkit.checkpoint.convert import torchvision_coco_classes
    from segkit.checkpoint.detectron2 import COCO_CLASSES

    assert BUILTIN_CLASS_LISTS["coco80"]() == COCO_CLASSES and len(COCO_CLASSES) == 80
    tv = BUILTIN_CLASS_LISTS["coco90_torchvision"]()
    assert tv == torchvision_coco_classes() and len(tv) == 90 and tv[0] == "person"


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownModelError) as info:
        entry("mask_rcnn_r50_fpn_3x")
    msg = str(info.value)
    assert "unknown model 'mask_rcnn_r50_fpn_3x'" in msg
    assert "did you mean 'mask_rcnn_r50_fpn_3x_detectron2'" in msg
    assert str(shipped_catalog_path()) in msg


GOOD = """
format: segkit-model-zoo
version: 1
class_lists:
  shapes: [circle, square]
models:
  tiny:
    task: detection
    experiment: retinanet_r18_fpn_embedded
    source: segkit
    urls: [http://127.0.0.1:9/tiny.pth]
    sha256: "{sha}"
    metrics: {{box_ap: 1.0, dataset: embedded val, source: https://example.org/x}}
    classes: shapes
    license: CC0
    page: https://example.org/tiny
"""


def _write(tmp_path, text, name="zoo.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("change, key, words", [
    (('sha256: "abababab"', "sha256: xyz"), "models.tiny.sha256", "hex"),
    (('sha256: "abababab"', "md5: 280758"), "models.tiny.md5", "quoted string"),
    (("task: detection", "task: segmentation"), "models.tiny.task", "instance_segmentation"),
    (("source: segkit", "source: mmdet"), "models.tiny.source", "torchvision"),
    (("urls: [http://127.0.0.1:9/tiny.pth]", "urls: [ftp://x/tiny.pth]"), "models.tiny.urls[0]",
     "http(s) URL"),
    (("classes: shapes", "classes: coco81"), "models.tiny.classes", "coco80"),
    (("box_ap: 1.0, ", ""), "models.tiny.metrics.box_ap", "published box_ap"),
    (("license: CC0", "licence: CC0"), "models.tiny.licence", "(unknown key)"),
    (("version: 1", "version: 2"), "version", "expected 1"),
])
def test_bad_catalog_names_file_and_key(tmp_path, change, key, words):
    old, new = change
    good = GOOD.format(sha="ab" * 4)
    assert old in good
    path = _write(tmp_path, good.replace(old, new))
    with pytest.raises(CatalogError) as info:
        load_catalog(path)
    msg = str(info.value)
    assert str(path) in msg and f": {key}: " in msg and words in msg, msg


def test_env_catalog_replaces_or_extends(tmp_path, monkeypatch):
    path = _write(tmp_path, GOOD.format(sha="ab" * 4))
    monkeypatch.setenv("SEGKIT_ZOO_CATALOG", str(path))
    assert list_models() == ["tiny"]
    e = entry("tiny")
    assert e.classes == ("circle", "square") and e.class_list == "shapes"
    assert e.filename == "tiny.pth" and e.hash_check() == "sha256 prefix + sha256 pin"
    monkeypatch.setenv("SEGKIT_ZOO_CATALOG", os.pathsep.join(["shipped", str(path)]))
    assert set(list_models()) == REQUIRED | {"tiny"}
    with pytest.raises(CatalogError, match="does not exist"):
        load_catalog(tmp_path / "missing.yaml")

