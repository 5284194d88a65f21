"""segkit-demo end to end with a tiny randomly initialised Mask R-CNN checkpoint."""
import json
import logging

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image

from segkit.checkpoint import save_checkpoint
from segkit.config import compose
from segkit.engine.defaults import build_model, checkpoint_meta
from segkit.engine.demo import load_model, main, predict_image
from segkit.utils.visualizer import draw_instances

CLASSES = ["circle", "square", "triangle"]
TINY = ["experiment=mask_rcnn_r18_fpn_embedded", f"dataset.num_classes={len(CLASSES)}",
        "dataloader.min_size_test=64", "dataloader.max_size_test=96",
        "model.backbone.bottom_up.base_channels=8", "model.backbone.out_channels=16",
        "model.roi_heads.box_head.fc_dim=32", "model.roi_heads.mask_head.conv_dim=16"]

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = compose(TINY)
    model = build_model(cfg)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    save_checkpoint(str(path), model.state_dict(), checkpoint_meta(cfg, CLASSES), iteration=0)
    return str(path)


def _write_image(path, h, w, seed):
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return np.asarray(Image.open(path).convert("RGB"))  # decoded (jpeg is lossy)


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    images = {"a.png": _write_image(d / "a.png", 48, 64, 1),
              "b.jpg": _write_image(d / "b.jpg", 56, 40, 2)}
    (d / "notes.txt").write_text("not an image")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    return d, images


def test_folder_with_skipped_and_corrupt_files(checkpoint, folder, tmp_path, caplog):
    src, images = folder
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        rc = main(["--checkpoint", checkpoint, "--input", str(src), "--output", str(out),
                   "--score-thresh", "0.0"])
    assert rc == 1  # broken.jpg failed, the others were still processed
    assert "skipping 1 non-image file(s)" in caplog.text and "notes.txt" in caplog.text
    assert "broken.jpg" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "predictions.json"]
    preds = json.loads((out / "predictions.json").read_text())
    assert {p["file_name"] for p in preds} == {"a.png", "b.jpg"}  # random init still detects

    model, cfg, classes = load_model(checkpoint, "cpu")
    assert classes == CLASSES
    for name, image in images.items():
        inst = predict_image(model, image, 64, 96)
        mine = [p for p in preds if p["file_name"] == name]
        assert len(mine) == len(inst) > 0
        assert [p["category_name"] for p in mine] == [CLASSES[c] for c in inst.pred_classes]
        assert [p["category_id"] for p in mine] == inst.pred_classes.tolist()
        assert [p["score"] for p in mine] == pytest.approx(inst.scores.tolist(), abs=1e-6)
        xyxy = inst.pred_boxes.tensor
        xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
        assert np.allclose([p["bbox"] for p in mine], xywh.numpy(), atol=2e-3)
        decoded = mask_util.decode([p["segmentation"] for p in mine]).transpose(2, 0, 1)
        assert np.array_equal(decoded.astype(bool), inst.pred_masks.numpy())
        drawing = np.asarray(Image.open(out / (name.split(".")[0] + ".png")))
        assert drawing.shape == image.shape  # drawn at the original resolution
        assert np.array_equal(drawing, draw_instances(image, inst, CLASSES))


def test_single_image_and_score_threshold(checkpoint, folder, tmp_path):
    src, images = folder
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--input", str(src / "a.png"), "--output", str(out),
               "--score-thresh", "1.01"])
    assert rc == 0
    assert json.loads((out / "predictions.json").read_text()) == []
    assert np.array_equal(np.asarray(Image.open(out / "a.png")), images["a.png"])  # nothing drawn


def test_config_override_and_test_resize(checkpoint, folder, tmp_path):
    src, _ = folder
    seen = []
    model, cfg, _ = load_model(checkpoint, "cpu", ["dataloader.min_size_test=32"])
    assert cfg.dataloader.min_size_test == 32 and cfg.dataloader.max_size_test == 96
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(args[0][0]))
    inst = predict_image(model, np.zeros((48, 64, 3), np.uint8), 32, 96)
    hook.remove()
    assert tuple(seen[0]["image"].shape) == (3, 32, 43)  # short side 32 (64 * 32 / 48 = 42.7)
    assert (seen[0]["height"], seen[0]["width"]) == (48, 64)
    assert inst.image_size == (48, 64)  # predictions come back at the original size
    rc = main(["--checkpoint", checkpoint, "--input", str(src), "--output", str(tmp_path / "o"),
               "--config-override", "dataloader.min_size_tst=32"])
    assert rc == 2  # unknown key


def test_missing_or_corrupt_checkpoint(folder, tmp_path, capsys):
    src, _ = folder
    rc = main(["--checkpoint", str(tmp_path / "nope.pth"), "--input", str(src),
               "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "nope.pth" in err and "does not exist" in err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"truncated")
    assert main(["--checkpoint", str(bad), "--input", str(src), "--output",
                 str(tmp_path / "o")]) == 2
    assert "bad.pth" in capsys.readouterr().err
    assert not (tmp_path / "o" / "predictions.json").exists()


def test_missing_input(checkpoint, tmp_path, capsys):
    rc = main(["--checkpoint", checkpoint, "--input", str(tmp_path / "none"),
               "--output", str(tmp_path / "o")])
    assert rc == 2 and "neither an image file nor a folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error path")
def test_cuda_device_without_cuda_is_a_clear_error(checkpoint, folder, tmp_path, capsys):
    src, _ = folder
    rc = main(["--checkpoint", checkpoint, "--input", str(src), "--output", str(tmp_path / "o"),
               "--device", "cuda"])
    assert rc == 2 and "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
def test_demo_on_cuda_matches_cpu_drawing_size(checkpoint, folder, tmp_path):
    src, images = folder
    out = tmp_path / "out"
    rc = main(["--checkpoint", checkpoint, "--input", str(src / "a.png"), "--output", str(out),
               "--device", "cuda", "--score-thresh", "0.0"])
    assert rc == 0
    preds = json.loads((out / "predictions.json").read_text())
    assert preds and all(p["file_name"] == "a.png" for p in preds)
    assert np.asarray(Image.open(out / "a.png")).shape == images["a.png"].shape
