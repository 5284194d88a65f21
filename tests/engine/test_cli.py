"""End to end on a tiny Mask R-CNN and a tiny embedded dataset: train (checkpoints, metrics,
TensorBoard, evaluation, PNGs), resume reproducing the uninterrupted run, and ``segkit-eval``
on the checkpoint; plus the evaluation config logic."""
import json
import logging
import os
import shutil

import pytest
import torch

from segkit.checkpoint import load_checkpoint
from segkit.config import compose
from segkit.engine.cli import checkpoint_config, eval_config, eval_main, run_eval, run_train

TINY = [
    "solver.max_iter=4", "solver.steps=[3]", "solver.warmup_iters=1",
    "dataloader.batch_size=2", "dataloader.num_workers=0", "dataloader.min_size_train=[64]",
    "dataloader.max_size_train=96", "dataloader.min_size_test=64",
    "dataloader.max_size_test=96", "train.checkpoint_period=2", "train.log_period=1",
    "train.num_vis_images=2", "evaluation.max_images=3",
    "model.backbone.bottom_up.base_channels=8", "model.backbone.out_channels=16",
    "model.roi_heads.box_head.fc_dim=32", "model.roi_heads.mask_head.conv_dim=16",
    "model.roi_heads.batch_size_per_image=32",
]


def _overrides(tmp_path, out):
    data = {"root": str(tmp_path / "embedded"), "num_train_images": 6, "num_val_images": 3,
            "image_size": 96}
    ds = [f"+dataset.{s}.{k}={v}" for s in ("train", "val") for k, v in data.items()]
    return TINY + ds + [f"train.output_dir={out}"]


@pytest.mark.slow
def test_train_resume_and_eval(tmp_path):
    out = tmp_path / "run"
    results = run_train(compose(_overrides(tmp_path, out)))
    assert set(results) == {"bbox", "segm"} and "AP" in results["bbox"]
    names = set(os.listdir(out))
    assert {"model_0000001.pth", "model_final.pth", "last_checkpoint", "metrics.json",
            "config.yaml", "log.txt", "final_results.json", "vis"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert len(os.listdir(out / "vis")) == 2
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert [d["iteration"] for d in lines if "loss_mask" in d] == [0, 1, 2, 3]
    assert "bbox/AP" in lines[-1]
    final = load_checkpoint(str(out / "model_final.pth"))
    assert final["meta"]["config"]["solver"]["max_iter"] == 4
    assert final["meta"]["classes"][0] == "circle" and final["iteration"] == 3

    # resume from the iteration-1 checkpoint in a fresh folder: iterations 2, 3 again, same
    # weights as the uninterrupted run (iteration, LR, momentum, RNG and data order restored)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(out / "model_0000001.pth", resumed)
    (resumed / "last_checkpoint").write_text("model_0000001.pth\n")
    torch.manual_seed(12345)
    run_train(compose(_overrides(tmp_path, resumed) + ["train.resume=true",
                                                       "train.num_vis_images=0"]))
    lines = [json.loads(x) for x in (resumed / "metrics.json").read_text().splitlines()]
    assert [d["iteration"] for d in lines if "loss_mask" in d] == [2, 3]
    again = load_checkpoint(str(resumed / "model_final.pth"))["model"]
    for key, value in final["model"].items():
        assert torch.allclose(value, again[key], atol=1e-5), key

    # segkit-eval: config from the checkpoint, overrides on top, results JSON written
    res = run_eval(str(out / "model_final.pth"), ["evaluation.max_images=2",
                                                  "evaluation.iou_types=[bbox]"])
    data = json.loads((out / "eval_model_final" / "eval_results.json").read_text())
    assert set(res) == {"bbox"} and set(data["results"]) == {"bbox"}
    assert data["results"]["bbox"]["AP"] == pytest.approx(res["bbox"]["AP"])
    assert data["checkpoint"].endswith("model_final.pth") and data["dataset"] == "embedded_val"
    assert eval_main([f"checkpoint={out / 'model_final.pth'}", "evaluation.max_images=1",
                      f"train.output_dir={tmp_path / 'eval2'}"]) == 0  # an exit code
    assert (tmp_path / "eval2" / "eval_results.json").is_file()


@pytest.mark.slow
def test_interrupted_run_names_the_last_checkpoint_and_empty_resume_warns(tmp_path, caplog):
    from segkit.engine import HookBase, Trainer, default_setup

    class Crash(HookBase):
        def before_step(self):
            if self.trainer.iter == 3:
                raise KeyboardInterrupt  # e.g. the job was pre-empted

    out = tmp_path / "run"
    cfg = compose(_overrides(tmp_path, out) + ["train.resume=true", "train.num_vis_images=0"])
    default_setup(cfg)
    trainer = Trainer(cfg)
    trainer.register_hooks([Crash()])
    with caplog.at_level(logging.WARNING, logger="segkit"):
        trainer.resume_or_load(resume=True)  # a fresh folder: nothing to resume
        assert trainer.start_iter == 0
        assert "train.resume is true" in caplog.text and "hydra.run.dir" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            trainer.train()
    assert not (out / "model_final.pth").exists()
    stop = [r.getMessage() for r in caplog.records if "Training stopped at" in r.getMessage()]
    assert len(stop) == 1 and "iteration 3" in stop[0]
    assert str(out / "model_0000001.pth") in stop[0] and "train.resume=true" in stop[0]


def test_checkpoint_config_sources():
    stored = {"experiment": "x", "train": {"device": "cpu"}}
    cfg = checkpoint_config({"config": stored}, ["train.device=cuda"])
    assert cfg.train.device == "cuda" and cfg.experiment == "x"  # the stored config
    # converted weights: no config, but the experiment they were converted for
    tv = {"config": None, "experiment": "faster_rcnn_r50_fpn_torchvision"}
    cfg = checkpoint_config(tv, ["solver.base_lr=0.5"])
    assert cfg.experiment == "faster_rcnn_r50_fpn_torchvision" and cfg.solver.base_lr == 0.5
    assert cfg.dataset.num_classes == 90
    cfg = checkpoint_config(tv, ["experiment=mask_rcnn_r50_fpn_torchvision"])  # override wins
    assert cfg.experiment == "mask_rcnn_r50_fpn_torchvision"
    with pytest.raises(ValueError, match="plain.pth. stores neither a config nor an experiment"):
        checkpoint_config({"config": None, "experiment": None}, [], "plain.pth")


def test_eval_config_applies_overrides_to_the_stored_config():
    stored = {"experiment": "x", "train": {"device": "cpu"},
              "dataset": {"num_classes": 6, "val": {"name": "embedded", "split": "val"}},
              "evaluation": {"iou_types": ["bbox", "segm"], "max_images": None}}
    cfg = eval_config(stored, ["evaluation.max_images=5", "+train.amp=true", "~experiment"])
    assert cfg.evaluation.max_images == 5 and cfg.train.amp is True and "experiment" not in cfg
    assert cfg.dataset.num_classes == 6  # untouched values stay as trained
    cfg = eval_config(stored, ["dataset=coco_format"])  # a group swaps the whole subtree
    assert cfg.dataset == compose(["dataset=coco_format", "~experiment"]).dataset
    with pytest.raises(ValueError, match="unknown config key 'evaluation.max_imgs'"):
        eval_config(stored, ["evaluation.max_imgs=5"])
    composed = eval_config(stored, ["experiment=mask_rcnn_r50_fpn_1x_coco"])
    assert composed.experiment == "mask_rcnn_r50_fpn_1x_coco"  # an experiment recomposes
    assert eval_config(None, []).experiment == compose().experiment


def test_eval_main_needs_a_checkpoint(capsys):
    with pytest.raises(SystemExit):
        eval_main(["evaluation.max_images=2"])
    assert "no checkpoint given" in capsys.readouterr().err


def test_eval_main_missing_truncated_or_configless_checkpoint(tmp_path, capsys):
    """One line on stderr naming the file and exit code 2, not a traceback."""
    assert eval_main(["--checkpoint", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segkit-eval: error: ") and "nope.pth' does not exist" in err
    assert "Traceback" not in err and err.count("\n") == 1
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"w": torch.zeros(1000)}}, bad)
    bad.write_bytes(bad.read_bytes()[:300])
    assert eval_main(["--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.pth" in err and "truncated or corrupt" in err and "Traceback" not in err
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.zeros(2)}, plain)  # a bare state dict: no config, no experiment
    assert eval_main(["--checkpoint", str(plain)]) == 2
    assert "experiment=<name>" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL right after a checkpoint, restarted with train.resume=true,
    continues from that checkpoint and ends with the weights of a run that was never killed."""
    import signal
    import subprocess
    import sys
    import time

    longer = ["solver.max_iter=8", "solver.steps=[6]", "train.num_vis_images=0",
              "train.deterministic=true", "train.metrics_window=1"]
    ref_out, killed_out = tmp_path / "reference", tmp_path / "killed"
    run_train(compose(_overrides(tmp_path, ref_out) + longer))

    overrides = _overrides(tmp_path, killed_out) + longer + [f"hydra.run.dir={killed_out}"]
    proc = subprocess.Popen([sys.executable, "-c", "from segkit.engine.cli import train_main; "
                             "train_main()", *overrides], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint, metrics = killed_out / "model_0000003.pth", killed_out / "metrics.json"

    def logged_iteration_3():  # the writer logs an iteration after its checkpoint is saved
        return metrics.exists() and '"iteration": 3' in metrics.read_text()

    deadline = time.monotonic() + 120
    while not (checkpoint.exists() and logged_iteration_3()) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert checkpoint.exists() and not (killed_out / "model_final.pth").exists()

    results = run_train(compose(overrides[:-1] + ["train.resume=true"]))
    assert "bbox" in results

    # every iteration was logged, 4..7 after the restart; with metrics_window=1 the logged
    # values are each iteration's own losses, and after the restart they equal the
    # uninterrupted run's (deterministic CPU mode: same weights, batches, RNG draws)
    def losses(out):
        lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
        return [(d["iteration"], {k: v for k, v in d.items() if k.startswith("loss_")})
                for d in lines if "total_loss" in d]

    logged = losses(killed_out)
    iterations = [it for it, _ in logged]
    # 0-3 ran once: resumed at 4 (which the killed process may have logged too, when the
    # kill came a moment after its checkpoint)
    assert set(iterations) == set(range(8)) and iterations[:4] == [0, 1, 2, 3]
    assert all(iterations.count(it) == 1 for it in range(4))
    reference, after_restart = dict(losses(ref_out)), dict(logged)  # the last line per iteration
    for it in range(4, 8):
        values = after_restart[it]
        assert values.keys() == reference[it].keys() and len(values) == 5
        for name, value in values.items():
            assert value == pytest.approx(reference[it][name], rel=1e-6, abs=1e-7), (it, name)
    final = load_checkpoint(str(ref_out / "model_final.pth"))["model"]
    again = load_checkpoint(str(killed_out / "model_final.pth"))["model"]
    for key, value in final.items():
        assert torch.allclose(value, again[key], atol=1e-5), key
