"""torchvision -> segkit checkpoint conversion: key mapping, class order, CLI round trip, errors."""
import os
import subprocess
import sys

import pytest
import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from segkit.checkpoint.convert import main, torchvision_coco_classes
from segkit.checkpoint.io import load_checkpoint
from segkit.checkpoint.torchvision import UnsupportedCheckpointError, convert_torchvision_detection

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tv_state():
    torch.manual_seed(0)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    return {k: v for k, v in model.state_dict().items()}


def test_mapping_moves_background_last(tv_state):
    out, info = convert_torchvision_detection(tv_state)
    assert info == {"arch": "maskrcnn_resnet50_fpn", "depth": 50, "num_classes": 90,
                    "has_mask": True, "experiment": "mask_rcnn_r50_fpn_torchvision"}
    cls_w = tv_state["roi_heads.box_predictor.cls_score.weight"]
    cls_b = tv_state["roi_heads.box_predictor.cls_score.bias"]
    assert torch.equal(out["roi_heads.box_predictor.cls_score.weight"][:90], cls_w[1:])
    assert torch.equal(out["roi_heads.box_predictor.cls_score.weight"][90], cls_w[0])  # background
    assert torch.equal(out["roi_heads.box_predictor.cls_score.bias"][90], cls_b[0])
    box_w = tv_state["roi_heads.box_predictor.bbox_pred.weight"]
    assert out["roi_heads.box_predictor.bbox_pred.weight"].shape == (360, 1024)
    # segkit class 6 ("train") = torchvision label 7: rows 24..27 <- 28..31
    assert torch.equal(out["roi_heads.box_predictor.bbox_pred.weight"][24:28], box_w[28:32])
    mask_w = tv_state["roi_heads.mask_predictor.mask_fcn_logits.weight"]
    assert torch.equal(out["roi_heads.mask_head.predictor.weight"], mask_w[1:])
    assert torch.equal(out["roi_heads.mask_head.mask_fcn3.weight"], tv_state["roi_heads.mask_head.2.0.weight"])
    assert torch.equal(out["roi_heads.mask_head.deconv.bias"], tv_state["roi_heads.mask_predictor.conv5_mask.bias"])
    assert torch.equal(out["roi_heads.box_head.fc2.weight"], tv_state["roi_heads.box_head.fc7.weight"])
    assert torch.equal(out["proposal_generator.rpn_head.conv.weight"], tv_state["rpn.head.conv.0.0.weight"])
    assert torch.equal(out["backbone.fpn_lateral3.weight"], tv_state["backbone.fpn.inner_blocks.1.0.weight"])
    assert torch.equal(out["backbone.bottom_up.res4.5.conv2.norm.running_var"],
                       tv_state["backbone.body.layer3.5.bn2.running_var"])
    # every torchvision tensor is used once, except the dropped background rows
    assert len(out) == len([k for k in tv_state if not k.endswith("num_batches_tracked")])


def test_old_key_names_and_wrapped_dict(tv_state):
    """Pre-0.13 torchvision files name the mask convs mask_fcn{i} and the RPN conv head.conv."""
    old = {}
    for k, v in tv_state.items():
        k = k.replace("rpn.head.conv.0.0.", "rpn.head.conv.")
        for i in range(4):
            k = k.replace(f"roi_heads.mask_head.{i}.0.", f"roi_heads.mask_head.mask_fcn{i + 1}.")
        old[k] = v
    new_out, _ = convert_torchvision_detection(tv_state)
    old_out, _ = convert_torchvision_detection({"model": old})
    assert new_out.keys() == old_out.keys()
    assert all(torch.equal(new_out[k], old_out[k]) for k in new_out)


def test_faster_rcnn_and_strict_load_into_experiment_model(tv_state):
    from segkit.config import compose
    from segkit.engine.defaults import build_model

    faster = {k: v for k, v in tv_state.items() if "mask" not in k}
    out, info = convert_torchvision_detection(faster)
    assert info["experiment"] == "faster_rcnn_r50_fpn_torchvision" and not info["has_mask"]
    model = build_model(compose(["experiment=faster_rcnn_r50_fpn_torchvision"]))
    model.load_state_dict(out, strict=True)


def test_unsupported_state_dicts_are_named(tv_state):
    keypoint = dict(tv_state, **{"roi_heads.keypoint_head.0.0.weight": torch.zeros(1)})
    with pytest.raises(UnsupportedCheckpointError, match=r"roi_heads\.keypoint_head\.0\.0\.weight"):
        convert_torchvision_detection(keypoint)
    v2 = {k.replace("box_head.fc6", "box_head.0.0"): v for k, v in tv_state.items()}
    with pytest.raises(UnsupportedCheckpointError, match=r"box_head\.0\.0\.weight.*fasterrcnn_resnet50_fpn \(v1\)"):
        convert_torchvision_detection(v2)
    no_box = {k: v for k, v in tv_state.items() if "box_predictor" not in k}
    with pytest.raises(UnsupportedCheckpointError, match="missing parts.*cls_score"):
        convert_torchvision_detection(no_box)
    with pytest.raises(UnsupportedCheckpointError, match="unexpected key"):
        convert_torchvision_detection({"rpn.head.conv.1.0.weight": torch.zeros(1)})  # v2 RPN


def test_cli_round_trip(tv_state, tmp_path, capsys):
    src, dst = str(tmp_path / "tv.pth"), str(tmp_path / "out" / "segkit.pth")
    torch.save(tv_state, src)
    assert main(["--from", "torchvision", src, dst]) == 0
    assert "90 classes" in capsys.readouterr().out
    ckpt = torch.load(dst, weights_only=True)  # plain tensors and containers only
    meta = ckpt["meta"]
    assert meta["format"] == "segkit" and meta["version"] == 1 and meta["config"] is None
    assert meta["experiment"] == "mask_rcnn_r50_fpn_torchvision"
    assert meta["classes"] == torchvision_coco_classes() and len(meta["classes"]) == 90
    assert meta["classes"][:3] == ["person", "bicycle", "car"] and meta["classes"][11] == "N/A"
    expected, _ = convert_torchvision_detection(tv_state)
    assert ckpt["model"].keys() == expected.keys()
    assert all(torch.equal(ckpt["model"][k], expected[k]) for k in expected)
    assert main(["--from", "torchvision", src, dst, "--experiment", "my_exp"]) == 0
    assert load_checkpoint(dst)["meta"]["experiment"] == "my_exp"


def test_cli_errors(tv_state, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"roi_heads.keypoint_predictor.kps_score_lowres.weight": torch.zeros(1), **tv_state}, bad)
    assert main(["--from", "torchvision", str(bad), str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "keypoint_predictor" in err
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert main(["--from", "torchvision", str(junk), str(tmp_path / "x.pth")]) == 2
    assert f"cannot read '{junk}'" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()
    # the module entry point, with an unknown --from value
    proc = subprocess.run([sys.executable, "-m", "segkit.checkpoint.convert", "--from", "detectron3",
                           str(junk), str(tmp_path / "x.pth")], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2
    assert "unknown --from 'detectron3'; supported: detectron2, torchvision" in proc.stderr
