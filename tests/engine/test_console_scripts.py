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
    assert "%|" not in log and "\r" not in log  # no progress bars off a terminal (CI logs)
    assert {"model_final.pth", "metrics.json", "config.yaml", "vis"} <= set(os.listdir(run_dir))
    final = json.loads((run_dir / "final_results.json").read_text())
    assert "bbox" in json.dumps(final) and "segm" in json.dumps(final)
    assert not (tmp_path / "outputs").exists()  # nothing outside the run folder

    # segkit-eval on the run's checkpoint: config from the checkpoint, exit code 0, the table
    out = _run(["segkit-eval", "--checkpoint", str(run_dir / "model_final.pth"),
                "evaluation.max_images=2"], tmp_path, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| bbox" in out.stdout and "'AP'" not in out.stderr  # no results dict dumped
    assert (run_dir / "eval_model_final" / "eval_results.json").is_file()


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


def test_segkit_eval_and_demo_missing_checkpoint_is_one_line(tmp_path):
    missing = str(tmp_path / "nope.pth")
    for args in (["segkit-eval", "--checkpoint", missing],
                 ["segkit-demo", "--checkpoint", missing, "--input", str(tmp_path),
                  "--output", str(tmp_path / "o")]):
        out = _run(args, tmp_path)
        assert out.returncode == 2, (args[0], out.stderr[-2000:])
        assert "nope.pth" in out.stderr and "does not exist" in out.stderr
        assert "Traceback" not in out.stderr, args[0]
