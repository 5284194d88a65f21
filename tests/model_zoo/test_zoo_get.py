"""segkit.model_zoo.get end to end against the local server: torchvision and detectron2 files
converted and loaded, caches (download and converted checkpoint), offline mode, hash checks."""
import pytest
import torch

from segkit import model_zoo
from segkit.model_zoo import DownloadError, UnknownModelError, ZooError, cache_dir
from segkit.model_zoo.sources import CONVERTER_VERSION
from segkit.model_zoo.store import pin_path, verify

from zoo_samples import CLASSES, STEM, THIN_RETINANET


def _assert_weights(model, expected):
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        if key == STEM:  # the detectron2 stem rule rescales it: equal up to float rounding
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(state[key], value), key


def _image():
    gen = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8, generator=gen)}]


def test_torchvision_file(server, make_catalog, torchvision_mask_rcnn):
    published = torchvision_mask_rcnn
    catalog = make_catalog({"tv": {"published": published, "sha256": published.sha256[:8]}})
    model = model_zoo.get("tv", catalog=catalog)
    assert not model.training
    _assert_weights(model, published.expected)
    assert model.metadata["thing_classes"] == CLASSES
    assert model.metadata["experiment"] == "mask_rcnn_r50_fpn_torchvision"
    assert model.metadata["config"].dataset.num_classes == len(CLASSES)
    with torch.no_grad():
        (out,) = model(_image())
    inst = out["instances"]
    assert inst.image_size == (96, 128) and inst.pred_masks.shape[1:] == (96, 128)
    assert all(0 <= int(c) < len(CLASSES) for c in inst.pred_classes)
    # the converted file is a segkit checkpoint that names its config and classes
    from segkit.checkpoint import load_checkpoint

    meta = load_checkpoint(model.metadata["checkpoint"])["meta"]
    assert meta["classes"] == CLASSES and meta["source"]["sha256"] == published.sha256
    assert meta["config"]["model"]["backbone"]["bottom_up"]["depth"] == 18


def test_cache_hits_skip_network_and_conversion(server, make_catalog, torchvision_mask_rcnn,
                                                monkeypatch):
    published = torchvision_mask_rcnn
    catalog = make_catalog({"tv": {"published": published, "sha256": published.sha256[:8]}})
    first = model_zoo.checkpoint_path("tv", catalog=catalog)
    assert server.hits == {f"/zoo/{published.filename}": 1}
    assert first.parent == cache_dir() and first.name.startswith(f"tv.segkit-v{CONVERTER_VERSION}-")
    assert (cache_dir() / published.filename).is_file()
    assert pin_path(cache_dir() / published.filename).read_text().split()[0] == published.sha256

    import segkit.model_zoo.sources as sources

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(sources, "convert", no_conversion)
    model = model_zoo.get("tv", catalog=catalog)
    assert model.metadata["checkpoint"] == str(first)
    assert server.hits == {f"/zoo/{published.filename}": 1}  # no second request
    _assert_weights(model, published.expected)


def test_detectron2_mask_rcnn(server, make_catalog, detectron2_mask_rcnn):
    published = detectron2_mask_rcnn
    catalog = make_catalog({"d2": {
        "published": published, "source": "detectron2", "md5": published.md5[:6],
        "experiment": "mask_rcnn_r50_fpn_3x_detectron2"}})
    model = model_zoo.get("d2", catalog=catalog)
    _assert_weights(model, published.expected)
    assert model.backbone.bottom_up.res3[0].conv1.stride == (2, 2)  # MSRA: stride in the 1x1
    # no publisher sha256: the first download's sha256 is pinned next to the file
    raw = cache_dir() / published.filename
    assert pin_path(raw).read_text().split()[0] == published.sha256
    assert verify(model_zoo.entry("d2", catalog)).status == "ok"


def test_detectron2_retinanet_head_relaid(server, make_catalog, detectron2_retinanet):
    published = detectron2_retinanet
    catalog = make_catalog({"retina": {
        "published": published, "source": "detectron2", "task": "detection",
        "md5": published.md5[:6], "experiment": "retinanet_r50_fpn_3x_detectron2",
        "overrides": THIN_RETINANET, "metrics": {"box_ap": 1.0, "dataset": "none",
                                                 "source": "https://example.org/zoo"}}})
    model = model_zoo.get("retina", catalog=catalog)
    _assert_weights(model, published.expected)
    with torch.no_grad():
        assert model(_image())[0]["instances"].image_size == (96, 128)


def test_offline(server, make_catalog, torchvision_mask_rcnn, monkeypatch):
    published = torchvision_mask_rcnn
    catalog = make_catalog({"tv": {"published": published, "sha256": published.sha256[:8]}})
    monkeypatch.setenv("SEGKIT_OFFLINE", "1")
    with pytest.raises(DownloadError) as info:
        model_zoo.get("tv", catalog=catalog)
    assert "SEGKIT_OFFLINE" in str(info.value) and published.filename in str(info.value)
    assert server.hits == {}
    monkeypatch.delenv("SEGKIT_OFFLINE")
    model_zoo.fetch("tv", catalog=catalog)  # downloaded, not converted yet
    monkeypatch.setenv("SEGKIT_OFFLINE", "1")
    _assert_weights(model_zoo.get("tv", catalog=catalog), published.expected)  # converts offline
    assert server.hits == {f"/zoo/{published.filename}": 1}


def test_hash_mismatch(server, make_catalog, torchvision_mask_rcnn):
    published = torchvision_mask_rcnn
    wrong_md5 = "%06x" % ((int(published.md5[:6], 16) + 1) % 16 ** 6)
    catalog = make_catalog({
        "bad_sha": {"published": published, "sha256": "0" * 8},
        "bad_md5": {"published": published, "md5": wrong_md5, "filename": "other.pth"}})
    with pytest.raises(DownloadError, match=r"sha256 mismatch: expected 00000000\.\.\. \(prefix\)"):
        model_zoo.get("bad_sha", catalog=catalog)
    with pytest.raises(DownloadError, match=f"md5 mismatch: expected {wrong_md5}"):
        model_zoo.fetch("bad_md5", catalog=catalog)
    assert not (cache_dir() / published.filename).exists()


def test_pin_mismatch(server, make_catalog, detectron2_mask_rcnn):
    """The publisher's md5 prefix passes, but the file is not the one first downloaded."""
    published = detectron2_mask_rcnn
    catalog = make_catalog({"d2": {"published": published, "source": "detectron2",
                                   "md5": published.md5[:6],
                                   "experiment": "mask_rcnn_r50_fpn_3x_detectron2"}})
    raw = model_zoo.fetch("d2", catalog=catalog)
    pin_path(raw).write_text("1" * 64 + "  " + raw.name + "\n")
    with pytest.raises(ZooError, match="the first download of 'd2' had 1111"):
        model_zoo.checkpoint_path("d2", catalog=catalog)
    assert verify(model_zoo.entry("d2", catalog)).status == "corrupt"


def test_mirror_after_failing_primary(server, make_catalog, torchvision_mask_rcnn):
    published = torchvision_mask_rcnn
    catalog = make_catalog({"tv": {"published": published, "sha256": published.sha256[:8]}})
    entry = model_zoo.entry("tv", catalog)
    mirrored = make_catalog({"tv": {"urls": [server.base + "/gone.pth", entry.urls[0]],
                                    "filename": published.filename,
                                    "sha256": published.sha256[:8]}}, filename="mirror.yaml")
    assert model_zoo.fetch("tv", catalog=mirrored).read_bytes() == published.body
    assert server.hits == {"/gone.pth": 1, f"/zoo/{published.filename}": 1}


def test_class_count_must_match(server, make_catalog, torchvision_mask_rcnn):
    published = torchvision_mask_rcnn
    catalog = make_catalog({"tv": {"published": published, "sha256": published.sha256[:8],
                                   "classes": ["a", "b"]}})
    with pytest.raises(ZooError, match="has 3 classes but model zoo entry 'tv'"):
        model_zoo.get("tv", catalog=catalog)


def test_unknown_name_and_untrained_model(make_catalog, torchvision_mask_rcnn):
    catalog = make_catalog({"tv": {"published": torchvision_mask_rcnn, "sha256": "ab" * 4}})
    with pytest.raises(UnknownModelError, match="did you mean 'tv'"):
        model_zoo.get("tvv", catalog=catalog)
    model = model_zoo.get("tv", pretrained=False, catalog=catalog)
    assert model.metadata["checkpoint"] is None and not model.training


def test_backbone_entry_and_init_weights(server, make_catalog):
    """A backbone entry gives the ResNet alone, and its converted file initialises a detector
    through train.init_weights (the trainer's Checkpointer)."""
    import zoo_samples

    from segkit.checkpoint import Checkpointer
    from segkit.engine.defaults import build_model
    from segkit.model_zoo.sources import entry_config
    from segkit.modeling.backbone import ResNet

    published = zoo_samples.torchvision_resnet18()
    catalog = make_catalog({"r18": {
        "published": published, "task": "backbone", "sha256": published.sha256[:8],
        "classes": None, "overrides": ["model/backbone=resnet18_fpn"],
        "metrics": {"top1": 1.0, "dataset": "none", "source": "https://example.org/zoo"}}})
    trunk = model_zoo.get("r18", catalog=catalog)
    assert isinstance(trunk, ResNet) and trunk.depth == 18 and not trunk.training
    _assert_weights(trunk, published.expected)
    assert trunk.metadata["thing_classes"] == []

    cfg = entry_config(model_zoo.entry("r18", catalog), ["dataset.num_classes=3"])
    detector = build_model(cfg)
    Checkpointer(detector, save_dir=".").resume_or_load(
        str(model_zoo.checkpoint_path("r18", catalog=catalog)), resume=False)
    for key, value in published.expected.items():
        assert torch.equal(detector.backbone.bottom_up.state_dict()[key], value), key
