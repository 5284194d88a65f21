"""Distributed training on CPU (gloo): ``launch()`` in its modes, the process-group helpers, and
a 2-process run that ends with the weights of a 1-process run with the same total batch."""
import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from segkit.checkpoint import load_checkpoint
from segkit.config import compose
from segkit.engine.cli import requeued, run_train
from segkit.engine.launch import (DistributedEnvironment, ProcessFailedError,
                                 detect_environment, launch, master_port_for_job)
from segkit.utils import comm

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             "SUBMITIT_EXECUTOR", "SLURM_RESTART_COUNT")


@pytest.fixture(autouse=True)
def _no_job_environment(monkeypatch):
    """The tests start from a process that belongs to no job (CI may run under SLURM)."""
    for key in _ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def _collectives(scale):
    """Run in every process of a 2-process job: the comm helpers against hand values."""
    rank, world = comm.get_rank(), comm.get_world_size()
    assert world == 2 and comm.is_distributed() and comm.get_local_rank() == rank
    assert comm.all_gather(rank * scale) == [0, scale]
    assert comm.broadcast_object(f"from {rank}") == "from 0"
    # counts 3 and 0: each process divides by the batch's mean count, (3 + 0) / 2
    assert comm.global_mean_count(torch.tensor([True, True, True]) if rank == 0
                                  else torch.zeros(0, dtype=torch.bool)) == 1.5
    assert comm.reduce_mean({"a": float(rank), "b": 4.0}) == {"a": 0.5, "b": 4.0}
    comm.synchronize()
    return {"rank": rank, "threads": torch.get_num_threads()}


def _fails_on_rank_one():
    if comm.get_rank() == 1:
        raise ValueError("rank one failed on purpose")
    comm.synchronize()  # rank 0 waits here until the launcher stops it


def test_launch_two_local_processes_runs_collectives_and_returns_rank0_result():
    result = launch(_collectives, (10,), num_processes_per_machine=2)
    assert result == {"rank": 0, "threads": max(1, (os.cpu_count() or 1) // 2)}
    assert not torch.distributed.is_initialized()  # the parent never joined a group


def test_launch_reports_the_process_that_failed_first():
    """Rank 1 raises; rank 0 then fails in its barrier. The report leads with rank 1's error."""
    with pytest.raises(ProcessFailedError) as info:
        launch(_fails_on_rank_one, num_processes_per_machine=2)
    message = str(info.value)
    assert message.index("--- rank 1: ValueError: rank one failed on purpose") < (
        message.index("--- rank 0:") if "--- rank 0:" in message else len(message))


def test_helpers_outside_a_job_are_single_process():
    assert (comm.get_rank(), comm.get_world_size(), comm.is_main_process()) == (0, 1, True)
    assert comm.all_gather(5) == [5] and comm.broadcast_object("x") == "x"
    assert comm.global_mean_count(torch.ones(4, dtype=torch.bool)) == 4.0
    assert comm.reduce_mean({"a": 2.0}) == {"a": 2.0}
    assert launch(lambda x: x + 1, (1,)) == 2  # one process: called in place


def test_launch_argument_errors():
    with pytest.raises(ValueError, match="num_processes_per_machine"):
        launch(print, num_processes_per_machine=0)
    with pytest.raises(ValueError, match="machine_rank must be in"):
        launch(print, num_machines=2, machine_rank=2)
    with pytest.raises(ValueError, match="dist_url=auto works on one machine only"):
        launch(print, num_processes_per_machine=1, num_machines=2)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _world():
    return comm.get_rank(), comm.get_world_size(), os.environ["MASTER_ADDR"]


def test_launch_joins_a_torchrun_job_from_its_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    env = detect_environment()
    assert (env.source, env.rank, env.world_size) == ("torchrun", 0, 1)
    # num_processes_per_machine is ignored: the job's own layout wins
    assert launch(_world, num_processes_per_machine=4) == (0, 1, "127.0.0.1")
    assert not torch.distributed.is_initialized()  # the group is torn down after the run


def test_slurm_task_environment_through_submitit(monkeypatch):
    """Task 5 of a 2-node x 4-GPU SLURM job: rank, local rank and the master address (first
    node of SLURM_JOB_NODELIST, as SLURM orders it) and a port from the job id."""
    values = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8",
              "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[017-018]"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    env = detect_environment()
    assert isinstance(env, DistributedEnvironment)
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    assert (env.master_addr, env.master_port) == ("gpu017", master_port_for_job("4242"))
    assert env.source == "submitit-slurm"
    assert 20000 <= master_port_for_job("4242") < 40000
    assert master_port_for_job("99_0") != master_port_for_job("99_1")  # array tasks differ
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task job is not distributed
    assert detect_environment() is None


def test_requeued_reads_slurm_restart_count(monkeypatch):
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    assert not requeued()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert requeued()


# ---------------------------------------------------------------------------------------------
# end to end: the Trainer under 2 processes


def _write_squares(root, num_images, size=64, seed=0):
    """COCO-format dataset of same-size images with 1-3 flat rectangles (two classes).

    Same-size images keep the padded batch the same whatever the split of a batch across
    processes: padding adds anchors (background for RetinaNet), so mixed sizes would change the
    loss of a 2-image batch against the same images in a 4-image batch.
    """
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    os.makedirs(root, exist_ok=True)
    for i in range(num_images):
        pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 4))):
            x0, y0 = (int(v) for v in rng.integers(0, size - 24, size=2))
            w, h = (int(v) for v in rng.integers(12, 24, size=2))
            cat = int(rng.integers(1, 3))
            pixels[y0:y0 + h, x0:x0 + w] = (200, 40, 40) if cat == 1 else (40, 200, 40)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat,
                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0,
                "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]})
        name = f"{i:03d}.png"
        Image.fromarray(pixels).save(os.path.join(root, name))
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
    data = {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}
    path = os.path.join(root, "ann.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def _squares_overrides(tmp_path):
    ann = _write_squares(str(tmp_path / "squares"), 12)
    images = str(tmp_path / "squares")
    return ["dataset=coco_format", f"dataset.train.json={ann}", f"dataset.train.images={images}",
            f"dataset.val.json={ann}", f"dataset.val.images={images}"]


RETINANET = [
    "experiment=retinanet_r18_fpn_embedded", "model.backbone.bottom_up.norm=frozen_bn",
    "model.backbone.bottom_up.base_channels=8", "model.backbone.out_channels=16",
    "model.head.num_convs=1", "model.head.norm=", "model.head.score_thresh_test=0.0",
    "solver.max_iter=3", "solver.steps=[2]", "solver.warmup_iters=1", "solver.base_lr=0.02",
    "dataloader.batch_size=4", "dataloader.num_workers=0", "dataloader.min_size_train=[64]",
    "dataloader.max_size_train=64", "dataloader.min_size_test=64", "dataloader.max_size_test=64",
    "dataloader.aspect_ratio_grouping=false",
    "train.checkpoint_period=2", "train.log_period=1", "train.num_vis_images=1",
    "evaluation.max_images=6", "train.seed=3",
]


def _losses(out):
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    return [(d["iteration"], d["loss_cls"], d["loss_box_reg"]) for d in lines if "loss_cls" in d]


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_total_batch(tmp_path):
    """The same 4-image batches as 2 x 2 images (gloo): same losses at every iteration, same
    final weights (float tolerance: the gradient sums are ordered differently), same sharded
    and gathered evaluation; rank 0 alone wrote the run's files."""
    data = _squares_overrides(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    res1 = run_train(compose(RETINANET + data + [f"train.output_dir={one}"]))
    res2 = run_train(compose(RETINANET + data + [f"train.output_dir={two}",
                                                 "train.num_processes_per_machine=2"]))
    w1 = load_checkpoint(str(one / "model_final.pth"))
    w2 = load_checkpoint(str(two / "model_final.pth"))
    assert w2["iteration"] == 2 and set(w1["model"]) == set(w2["model"])
    changed = 0
    for key, value in w1["model"].items():
        torch.testing.assert_close(w2["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        init = load_checkpoint(str(one / "model_0000001.pth"))["model"][key]
        changed += not torch.equal(init, value)
    assert changed > 10  # the comparison is about weights that training moved
    l1, l2 = _losses(one), _losses(two)
    assert [x[0] for x in l2] == [0, 1, 2]  # one metrics line per iteration: rank 0 only
    np.testing.assert_allclose(np.array(l2)[:, 1:], np.array(l1)[:, 1:], rtol=1e-4)
    # threshold 0: 100 detections per image even this early, so AP is not trivially 0
    assert res1["bbox"]["AP"] > 0
    assert res2["bbox"]["AP"] == pytest.approx(res1["bbox"]["AP"], abs=1e-3)
    # the returned results are those rank 0 wrote; every rank's checkpoint RNG is kept
    saved = json.loads((two / "final_results.json").read_text())["results"]
    assert saved["bbox"]["AP"] == pytest.approx(res2["bbox"]["AP"])
    assert isinstance(w2["rng"], list) and len(w2["rng"]) == 2
    names = os.listdir(two)
    assert sum(n.startswith("events.out.tfevents") for n in names) == 1
    assert len(os.listdir(two / "vis")) == 1
    assert "[rank 1]" not in (two / "log.txt").read_text()


@pytest.mark.slow
def test_mask_rcnn_trains_under_two_processes(tmp_path):
    """Two-stage model with a mask head under DDP: the mask loss's batch-wide normaliser is a
    collective that every process joins, with or without foreground RoIs."""
    out = tmp_path / "run"
    overrides = [
        "model.backbone.bottom_up.base_channels=8", "model.backbone.out_channels=16",
        "model.roi_heads.box_head.fc_dim=32", "model.roi_heads.mask_head.conv_dim=16",
        "model.roi_heads.batch_size_per_image=32", "solver.max_iter=2", "solver.steps=[1]",
        "solver.warmup_iters=1", "dataloader.batch_size=2", "dataloader.num_workers=0",
        "dataloader.min_size_train=[64]", "dataloader.max_size_train=64",
        "dataloader.min_size_test=64", "dataloader.max_size_test=64",
        "train.num_vis_images=0", "evaluation.max_images=3", "train.log_period=1",
        "train.num_processes_per_machine=2", f"train.output_dir={out}"]
    results = run_train(compose(overrides + _squares_overrides(tmp_path)))
    assert set(results) == {"bbox", "segm"}
    lines = [json.loads(x) for x in (out / "metrics.json").read_text().splitlines()]
    assert [d["iteration"] for d in lines if "loss_mask" in d] == [0, 1]
