"""detectron2 -> segkit conversion: names, stem rule, RetinaNet head layout, experiment names,
.pkl/.pth through the CLI, strict load."""
import math
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segkit.checkpoint.convert import main
from segkit.checkpoint.detectron2 import (COCO_CLASSES, SEGKIT_PIXEL_STD,
                                          UnsupportedDetectron2Error, convert_detectron2)
from segkit.checkpoint.io import load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEM = "backbone.bottom_up.stem.conv1.weight"
# detectron2 model-zoo names (model_final_f10217.pkl) and the segkit names they must become
D2_NAMES = {
    "backbone.bottom_up.stem.conv1.weight": STEM,
    "backbone.bottom_up.stem.conv1.norm.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
    "backbone.bottom_up.res2.0.conv1.weight": "backbone.bottom_up.res2.0.conv1.weight",
    "backbone.bottom_up.res2.0.shortcut.norm.bias": "backbone.bottom_up.res2.0.shortcut.norm.bias",
    "backbone.bottom_up.res4.5.conv3.norm.weight": "backbone.bottom_up.res4.5.conv3.norm.weight",
    "backbone.bottom_up.res5.2.conv2.weight": "backbone.bottom_up.res5.2.conv2.weight",
    "backbone.fpn_lateral2.weight": "backbone.fpn_lateral2.weight",
    "backbone.fpn_output5.bias": "backbone.fpn_output5.bias",
    "proposal_generator.rpn_head.conv.weight": "proposal_generator.rpn_head.conv.weight",
    "proposal_generator.rpn_head.objectness_logits.bias": "proposal_generator.rpn_head.objectness_logits.bias",
    "proposal_generator.rpn_head.anchor_deltas.weight": "proposal_generator.rpn_head.anchor_deltas.weight",
    "roi_heads.box_head.fc1.weight": "roi_heads.box_head.fc1.weight",
    "roi_heads.box_head.fc2.bias": "roi_heads.box_head.fc2.bias",
    "roi_heads.box_predictor.cls_score.weight": "roi_heads.box_predictor.cls_score.weight",
    "roi_heads.box_predictor.bbox_pred.weight": "roi_heads.box_predictor.bbox_pred.weight",
    "roi_heads.mask_head.mask_fcn1.weight": "roi_heads.mask_head.mask_fcn1.weight",
    "roi_heads.mask_head.deconv.weight": "roi_heads.mask_head.deconv.weight",
    "roi_heads.mask_head.predictor.bias": "roi_heads.mask_head.predictor.bias",
}
# leftovers of older detectron2 files, dropped by the converter
D2_LEFTOVERS = {"pixel_mean": np.zeros((3, 1, 1), np.float32),
                "pixel_std": np.ones((3, 1, 1), np.float32),
                "proposal_generator.anchor_generator.cell_anchors.0": np.zeros((3, 4), np.float32)}


def _build(experiment):
    from segkit.config import compose
    from segkit.engine.defaults import build_model

    return build_model(compose([f"experiment={experiment}", "train.device=cpu"]))


@pytest.fixture(scope="module")
def model():
    return _build("mask_rcnn_r50_fpn_3x_detectron2")


@pytest.fixture(scope="module")
def segkit_state(model):
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in model.state_dict().items()}


def _to_d2(state):
    """Inverse of the converter, written independently: names unchanged, stem back to BGR with
    std 1 (w_d2[:, bgr] = w_segkit[:, rgb] / segkit_std[rgb])."""
    out = {k: v.numpy().copy() for k, v in state.items()}
    std = np.asarray(SEGKIT_PIXEL_STD, np.float64).reshape(1, 3, 1, 1)
    out[STEM] = (state[STEM].double().numpy() / std)[:, ::-1].astype(np.float32).copy()
    out.update(D2_LEFTOVERS)
    return out


def test_representative_names(segkit_state):
    d2 = _to_d2(segkit_state)
    assert set(D2_NAMES) <= set(d2) and set(D2_NAMES.values()) <= set(segkit_state)
    out, report = convert_detectron2({"model": d2, "__author__": "Detectron2 Model Zoo"})
    for d2_name, name in D2_NAMES.items():
        if name != STEM:
            assert torch.equal(out[name], torch.from_numpy(d2[d2_name])), d2_name
    assert set(out) == set(segkit_state)
    assert report["dropped"] == sorted(D2_LEFTOVERS)
    assert report["num_classes"] == 80 and report["has_mask"] and report["depth"] == 50
    assert report["experiment"] == "mask_rcnn_r50_fpn_3x_detectron2"
    assert "model.backbone.bottom_up.stride_in_1x1=true" in report["config_overrides"]
    # background last in both code bases: the classifier rows are not moved
    assert out["roi_heads.box_predictor.cls_score.weight"].shape == (81, 1024)
    assert out["roi_heads.box_predictor.bbox_pred.weight"].shape == (320, 1024)


def test_stem_rule_preserves_features():
    gen = torch.Generator().manual_seed(1)
    w_d2 = torch.randn(8, 3, 7, 7, generator=gen)
    rgb = torch.rand(1, 3, 20, 24, generator=gen) * 255
    mean_rgb = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    d2_input = (rgb - mean_rgb).flip(1)  # BGR, std 1
    segkit_input = (rgb - mean_rgb) / torch.tensor(SEGKIT_PIXEL_STD).view(1, 3, 1, 1)
    out, _ = convert_detectron2({STEM: w_d2, "proposal_generator.rpn_head.conv.weight":
                                 torch.zeros(1)})
    ref = F.conv2d(d2_input, w_d2, stride=2, padding=3)
    got = F.conv2d(segkit_input, out[STEM], stride=2, padding=3)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    kept, _ = convert_detectron2({STEM: w_d2, "proposal_generator.rpn_head.conv.weight":
                                  torch.zeros(1)}, bake_input=False)
    assert torch.equal(kept[STEM], w_d2)


def test_experiment_names(segkit_state):
    """The experiment named is the one made for detectron2's weights, by head and depth."""
    def experiment(state):
        keys = {k: torch.zeros(v.shape[:1]) for k, v in state.items()}  # names and row counts
        return convert_detectron2(keys, bake_input=False)[1]["experiment"]

    r101 = dict(segkit_state, **{f"backbone.bottom_up.res4.{i}.conv1.weight": torch.zeros(1)
                                 for i in range(6, 23)})
    boxes_only = {k: v for k, v in segkit_state.items() if "mask_head" not in k}
    assert experiment(r101) == "mask_rcnn_r101_fpn_3x_detectron2"
    assert experiment(boxes_only) == "faster_rcnn_r50_fpn_3x_detectron2"
    assert experiment({k: v for k, v in r101.items() if "mask_head" not in k}) is None
    rpn = {k: v for k, v in boxes_only.items() if not k.startswith("roi_heads.")}
    assert experiment(rpn) == "rpn_r50_fpn_1x_coco"


def _d2_cell_anchors(sizes, ratios):
    """detectron2's DefaultAnchorGenerator.generate_cell_anchors, as its source describes it:
    size-major, w = sqrt(s^2 / a), h = a * w, centred on 0."""
    out = []
    for s in sizes:
        for a in ratios:
            w = math.sqrt(s * s / a)
            h = a * w
            out.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(out)


def test_retinanet_head_relaid():
    """detectron2 numbers the subnet convs 0, 2, 4, 6 and orders a location's 9 anchors
    size-major. After conversion the weights load into retinanet_r50_fpn_3x_detectron2 and
    each segkit anchor predicts what the detectron2 anchor of the same box predicted (matched
    by comparing boxes, not by the converter's formula)."""
    retinanet = _build("retinanet_r50_fpn_3x_detectron2")
    head = retinanet.head
    k, a = head.num_classes, head.num_anchors
    gen = torch.Generator().manual_seed(2)
    segkit = {n: torch.randn(v.shape, generator=gen) for n, v in retinanet.state_dict().items()}
    d2 = {re.sub(r"^head\.(cls|bbox)_subnet\.(\d+)\.",
                 lambda m: f"head.{m[1]}_subnet.{2 * int(m[2])}.", n): v for n, v in segkit.items()}
    # predictors: zero weights, and detectron2 anchor i outputs 1000 * i + c (class / delta c)
    for name, per_anchor in (("cls_score", k), ("bbox_pred", 4)):
        d2[f"head.{name}.weight"] = torch.zeros_like(d2[f"head.{name}.weight"])
        d2[f"head.{name}.bias"] = torch.tensor([1000.0 * i + c for i in range(a)
                                                for c in range(per_anchor)])
    assert "head.cls_subnet.6.weight" in d2 and "head.cls_subnet.1.weight" not in d2
    out, report = convert_detectron2({"model": d2})
    assert report["experiment"] == "retinanet_r50_fpn_3x_detectron2" and report["num_classes"] == 80
    result = retinanet.load_state_dict(out, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(out["head.cls_subnet.3.weight"], segkit["head.cls_subnet.3.weight"])
    assert torch.equal(out["head.bbox_subnet.1.bias"], segkit["head.bbox_subnet.1.bias"])

    with torch.no_grad():
        logits, deltas = head.predict([torch.zeros(1, 256, 2, 3)])  # P3 only: 6 locations
    sizes = [32 * 2 ** (j / 3) for j in range(3)]  # detectron2's RetinaNet anchors on P3
    d2_cells = _d2_cell_anchors(sizes, [0.5, 1.0, 2.0])
    segkit_cells = head.anchor_generator.cell_anchors[0]
    logits, deltas = logits[0].view(6, a, k), deltas[0].view(6, a, 4)
    moved = 0
    for j in range(a):
        (i,) = [i for i in range(a) if torch.allclose(d2_cells[i], segkit_cells[j], atol=1e-3)]
        moved += i != j
        assert torch.equal(logits[:, j], torch.tensor([[1000.0 * i + c for c in range(k)]] * 6))
        assert torch.equal(deltas[:, j], torch.tensor([[1000.0 * i + d for d in range(4)]] * 6))
    assert moved == 6  # all but the three anchors with ratio index == size index


def test_retinanet_head_refusals_and_one_size():
    def head(anchors, k=2):
        rows = {"cls_score": anchors * k, "bbox_pred": anchors * 4}
        state = {STEM: torch.zeros(4, 3, 7, 7)}
        for name, n in rows.items():
            state[f"head.{name}.weight"] = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
            state[f"head.{name}.bias"] = torch.arange(n, dtype=torch.float32)
        return state

    with pytest.raises(UnsupportedDetectron2Error, match="norm layers"):
        convert_detectron2({**head(9), "head.cls_subnet.1.weight": torch.zeros(1)})
    with pytest.raises(UnsupportedDetectron2Error, match="9 anchors per location"):
        convert_detectron2(head(9), retinanet_anchors=(1, 3))
    # one size per location: size-major and ratio-major agree, nothing moves
    out, report = convert_detectron2(head(3), retinanet_anchors=(1, 3))
    assert report["num_classes"] == 2
    for key, value in head(3).items():
        if key != STEM:
            assert torch.equal(out[key], value), key


def _check_converted(dst, model, segkit_state):
    ckpt = load_checkpoint(dst)
    meta = ckpt["meta"]
    assert meta["experiment"] == "mask_rcnn_r50_fpn_3x_detectron2"
    assert meta["classes"] == COCO_CLASSES
    assert meta["source"]["from"] == "detectron2"
    result = model.load_state_dict(ckpt["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in segkit_state.items():
        if k == STEM:
            torch.testing.assert_close(ckpt["model"][k], v, rtol=1e-5, atol=1e-5)
        else:
            assert torch.equal(ckpt["model"][k], v), k


def test_pkl_through_cli(tmp_path, model, segkit_state):
    src, dst = tmp_path / "model_final.pkl", tmp_path / "converted.pth"
    with open(src, "wb") as f:
        pickle.dump({"model": _to_d2(segkit_state), "__author__": "Detectron2 Model Zoo"}, f)
    proc = subprocess.run([sys.executable, "-m", "segkit.checkpoint.convert", "--from",
                           "detectron2", str(src), str(dst)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stride_in_1x1=true" in proc.stdout
    assert "experiment mask_rcnn_r50_fpn_3x_detectron2" in proc.stdout
    _check_converted(str(dst), model, segkit_state)


def test_pth_through_cli(tmp_path, model, segkit_state):
    src, dst = tmp_path / "model_final.pth", tmp_path / "converted.pth"
    d2 = {k: torch.from_numpy(v) for k, v in _to_d2(segkit_state).items()}
    torch.save({"model": {"module." + k: v for k, v in d2.items()}, "iteration": 89999}, src)
    assert main(["--from", "detectron2", str(src), str(dst)]) == 0
    _check_converted(str(dst), model, segkit_state)


def test_unknown_keys_refused(tmp_path, capsys):
    with pytest.raises(UnsupportedDetectron2Error, match="roi_heads.keypoint_head"):
        convert_detectron2({STEM: np.zeros((64, 3, 7, 7), np.float32),
                            "roi_heads.keypoint_head.conv_fcn1.weight": np.zeros(1)})
    with pytest.raises(UnsupportedDetectron2Error, match="blobs"):
        convert_detectron2({"blobs": {"conv1_w": np.zeros(1)}})
    src = tmp_path / "bad.pkl"
    src.write_bytes(pickle.dumps({"model": {"foo.weight": np.zeros(2)}}))
    assert main(["--from", "detectron2", str(src), str(tmp_path / "o.pth")]) == 2
    assert "foo.weight" in capsys.readouterr().err
