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


@pytest.mark.slow
def test_multirun_with_the_submitit_local_preset(tmp_path):
    """`-m hydra/launcher=local` over two values runs both jobs through submitit. Each job
    has two tasks, so each is a 2-process (gloo) run whose ranks come from submitit's
    environment, as on SLURM."""
    sweep = tmp_path / "sweep"
    data = {"num_train_images": 6, "num_val_images": 3, "image_size": 96}
    ds = [f"+dataset.{s}.{k}={v}" for s in ("train", "val") for k, v in data.items()]
    args = [a for a in TINY if not a.startswith(("train.num_vis_images", "train.checkpoint"))]
    out = _run(["segkit-train", "-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}",
                "hydra.launcher.tasks_per_node=2", "solver.base_lr=0.01,0.005", *args, *ds,
                "train.num_vis_images=0", "train.checkpoint_period=0"], tmp_path, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    for job, lr in (("0", 0.01), ("1", 0.005)):
        folder = sweep / job
        results = json.loads((folder / "final_results.json").read_text())["results"]
        assert {"bbox", "segm"} <= set(results)
        assert "joining submitit-local: rank 0/2" in (folder / "log.txt").read_text()
        lines = [json.loads(x) for x in (folder / "metrics.json").read_text().splitlines()]
        assert [d["iteration"] for d in lines if "loss_mask" in d] == [0, 1, 2, 3]
        assert max(d["lr"] for d in lines if "lr" in d) == pytest.approx(lr)
    # submitit kept each task's log and pickled result (a SLURM sweep leaves the same)
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 4


@pytest.mark.slow
def test_requeued_slurm_job_resumes_from_its_checkpoint(tmp_path):
    """SLURM_RESTART_COUNT > 0 (a requeued job) resumes without train.resume=true."""
    run_dir = tmp_path / "run"
    data = {"num_train_images": 6, "num_val_images": 3, "image_size": 96}
    ds = [f"+dataset.{s}.{k}={v}" for s in ("train", "val") for k, v in data.items()]
    args = [*TINY, *ds, "train.num_vis_images=0", f"hydra.run.dir={run_dir}"]
    out = _run(["segkit-train", *args, "solver.max_iter=2", "solver.steps=[1]"], tmp_path,
               cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    env_requeued = {"SLURM_RESTART_COUNT": "1"}
    out = subprocess.run(["segkit-train", *args], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path,
                         env={**os.environ, "SEGKIT_CACHE": str(tmp_path / "cache"),
                              **env_requeued})
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "SLURM requeued this job (restart 1)" in log and "Resuming at iteration 2 of 4" in log


@pytest.mark.slow
def test_torchrun_job_of_two_cpu_processes(tmp_path):
    """`torchrun --nproc-per-node=2 --no-python segkit-train ...`: each process joins the job
    from torchrun's environment; rank 0 writes the run folder."""
    run_dir = tmp_path / "run"
    data = {"num_train_images": 6, "num_val_images": 3, "image_size": 96}
    ds = [f"+dataset.{s}.{k}={v}" for s in ("train", "val") for k, v in data.items()]
    out = _run(["torchrun", "--nproc-per-node=2", "--no-python", "segkit-train", *TINY, *ds,
                "train.num_vis_images=0", f"hydra.run.dir={run_dir}"], tmp_path, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    log = (run_dir / "log.txt").read_text()
    assert "joining torchrun: rank 0/2" in log and "joining torchrun: rank 1/2" in log
    lines = [json.loads(x) for x in (run_dir / "metrics.json").read_text().splitlines()]
    assert [d["iteration"] for d in lines if "loss_mask" in d] == [0, 1, 2, 3]
    assert "bbox" in json.loads((run_dir / "final_results.json").read_text())["results"]
