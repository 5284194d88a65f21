"""python -m segkit.engine.save_proposals: checkpoint -> proposal file; clear errors."""
import torch

from segkit.checkpoint import save_checkpoint
from segkit.config import compose
from segkit.data.proposals import load_proposals
from segkit.engine.defaults import build_datasets, build_model, checkpoint_meta
from segkit.engine.save_proposals import main

TINY = ["train.device=cpu", "model.backbone.bottom_up.base_channels=8",
        "model.backbone.out_channels=8", "model.proposal_generator.post_nms_topk_test=20",
        "dataloader.num_workers=0"]


def _checkpoint(tmp_path, experiment):
    cfg = compose([f"experiment={experiment}", *TINY])
    build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    model = build_model(cfg)
    path = str(tmp_path / "model.pth")
    save_checkpoint(path, model.state_dict(), meta=checkpoint_meta(cfg, ["a"]))
    return path


def test_saves_val_proposals_of_a_proposal_only_checkpoint(tmp_path):
    ckpt = _checkpoint(tmp_path, "rpn_r18_fpn_embedded")
    out = str(tmp_path / "props" / "val.pth")
    assert main(["--checkpoint", ckpt, "--output", out, "--max-images", "3",
                 "dataloader.min_size_test=96", "dataloader.max_size_test=160"]) == 0
    props = load_proposals(out)
    records, _ = build_datasets(compose(["experiment=rpn_r18_fpn_embedded"]),
                                splits=("val",))["val"]
    assert sorted(props.boxes) == sorted(r["image_id"] for r in records[:3])
    for r in records[:3]:
        boxes, scores = props.boxes[r["image_id"]], props.scores[r["image_id"]]
        assert props.image_sizes[r["image_id"]] == (r["height"], r["width"])
        assert 0 < len(boxes) <= 20 and (scores[:-1] >= scores[1:]).all()
        # original image coordinates
        assert boxes[:, 2].max() <= r["width"] and boxes[:, 3].max() <= r["height"]
    assert props.meta["split"] == "val" and props.meta["experiment"] == "rpn_r18_fpn_embedded"


def test_errors_are_one_line(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path, "mask_rcnn_r18_fpn_embedded")
    assert main(["--checkpoint", ckpt, "--output", str(tmp_path / "p.pth")]) == 2
    assert "needs a proposal_only model" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path / "missing.pth"),
                 "--output", str(tmp_path / "p.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
