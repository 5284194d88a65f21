"""The installed console scripts, run as a user runs them (subprocesses, Hydra command line)."""
import json
import os
import subprocess

import pytest

from test_cli import TINY


def _run(args, tmp_path, **kw):
    env = {**os.environ, "SEGKIT_CACHE": str(tmp_path / "cache")}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.mark.slow
def test_segkit_train_command_line(tmp_path):
    run_dir = tmp_path / "run"
    data = {"num_train_images": 6, "num_val_images": 3, "image_size": 96}
    ds = [f"+dataset.{s}.{k}={v}" for s in ("train", "val") for k, v in data.items()]
    out = _run(["segkit-train", *TINY, *ds, f"hydra.run.dir={run_dir}"], tmp_path,
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Final evaluation (mask_rcnn_r18_fpn_embedded)" in log and "| segm" in log
    assert "eta:" in log  # progress lines with an ETA
    assert {"model_final.pth", "metrics.json", "config.yaml", "vis"} <= set(os.listdir(run_dir))
    final = json.loads((run_dir / "final_results.json").read_text())
    assert "bbox" in json.dumps(final) and "segm" in json.dumps(final)
    assert not (tmp_path / "outputs").exists()  # nothing outside the run folder


def test_segkit_train_prints_config_and_rejects_typos(tmp_path):
    out = _run(["segkit-train", "model/backbone=resnet101_fpn", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "depth: 101" in out.stdout
    out = _run(["segkit-train", "solver.bse_lr=0.1"], tmp_path)
    assert out.returncode != 0
    assert "did you mean 'solver.base_lr'" in out.stderr


def test_segkit_demo_and_eval_help(tmp_path):
    for script in ("segkit-demo", "segkit-eval"):
        out = _run([script, "--help"], tmp_path)
        assert out.returncode == 0 and "--checkpoint" in out.stdout, (script, out.stderr)
