"""``dataloader.name`` picks the training-data builder from ``TRAIN_LOADERS``: the detection
loader by default, a project's own otherwise; the builder gets this process's share of the
total batch, its rank and the resume iteration, and the Trainer trains on what it returns."""
import itertools
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from segkit.config import compose
from segkit.engine import Trainer, default_setup
from segkit.engine import defaults as D
from segkit.registry import DATASETS, META_ARCHS, TRAIN_LOADERS, BuildError
from segkit.utils import comm

CALLS = []


class _Regression(nn.Module):
    """Batches of ``{"x": (4,), "y": ()}`` -> ``{"loss_mse"}`` (no evaluation)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 1)

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        y = torch.stack([d["y"] for d in batch])
        return {"loss_mse": ((self.fc(x).squeeze(1) - y) ** 2).mean()}


def _toy_loader(cfg, records, *, batch_size, rank, world_size, start_iter):
    """Records the call; batch ``i`` is a pure function of ``i`` (and of ``dataloader.scale``),
    so a resumed stream equals the uninterrupted one."""
    CALLS.append({"records": len(records), "batch_size": batch_size, "rank": rank,
                  "world_size": world_size, "start_iter": start_iter,
                  "scale": cfg.dataloader.scale})
    for i in itertools.count(start_iter):
        x = torch.randn(batch_size, 4, generator=torch.Generator().manual_seed(i))
        yield [{"x": xi, "y": xi.sum() * cfg.dataloader.scale} for xi in x]


def _toy_records(split, config_path=""):
    records = [{"file_name": f"{split}{i}.png", "image_id": i, "height": 8, "width": 8,
                "annotations": []} for i in range(3)]
    return records, {"name": f"train_loader_test_{split}", "thing_classes": ["a"]}


for registry, key, obj in ((TRAIN_LOADERS, "toy", _toy_loader),
                           (META_ARCHS, "train_loader_test_model", _Regression),
                           (DATASETS, "train_loader_test_data", _toy_records)):
    if key not in registry:
        registry.register(key, scope="enginetest")(obj)


def _cfg(tmp_path, **dataloader):
    cfg = OmegaConf.create({
        "experiment": "toy",
        "model": {"name": "enginetest.train_loader_test_model"},
        "dataset": {"num_classes": None,
                    "train": {"name": "enginetest.train_loader_test_data", "split": "train"},
                    "val": {"name": "enginetest.train_loader_test_data", "split": "val"}},
        "dataloader": {"name": "enginetest.toy", "batch_size": 4, "scale": 2.0, **dataloader},
        "solver": {"optimizer": "sgd", "base_lr": 0.01, "momentum": 0.9, "weight_decay": 0.0,
                   "weight_decay_norm": 0.0, "schedule": "step", "steps": [], "gamma": 0.1,
                   "max_iter": 4, "warmup_iters": 0, "clip_grad_norm": None},
        "train": {"output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 0,
                  "deterministic": True, "init_weights": None, "checkpoint_period": 2,
                  "eval_period": 0, "log_period": 1, "metrics_window": 1,
                  "num_vis_images": 0},
        "evaluation": {"iou_types": ["bbox"], "max_images": None},
    })
    OmegaConf.set_struct(cfg, True)
    return cfg


def test_the_named_builder_gets_this_process_share(tmp_path, monkeypatch):
    CALLS.clear()
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_rank", lambda: 1)
    loader = D.build_train_loader(_cfg(tmp_path), [{}] * 5, start_iter=7)
    assert len(next(iter(loader))) == 2  # dataloader.batch_size is the total over processes
    assert CALLS == [{"records": 5, "batch_size": 2, "rank": 1, "world_size": 2,
                      "start_iter": 7, "scale": 2.0}]
    with pytest.raises(ValueError, match="multiple of 2"):
        D.build_train_loader(_cfg(tmp_path, batch_size=3), [{}])


def test_detection_is_the_default_and_unknown_names_are_listed(tmp_path):
    assert TRAIN_LOADERS.get("detection") is D.build_detection_train_loader
    assert compose(["train.device=cpu"]).dataloader.name == "detection"
    with pytest.raises(BuildError) as e:
        D.build_train_loader(_cfg(tmp_path, name="enginetest.tyo"), [{}])
    assert "dataloader.name: unknown train_loader 'enginetest.tyo'" in str(e.value)
    assert "did you mean 'enginetest.toy'" in str(e.value) and "detection" in str(e.value)


class _NoEvalTrainer(Trainer):
    def test(self):  # the toy model has no evaluator; only the training data matters here
        return {}


def _train(cfg, resume=False):
    default_setup(cfg)
    trainer = _NoEvalTrainer(cfg)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    with open(f"{cfg.train.output_dir}/metrics.json") as f:
        return {d["iteration"]: d["total_loss"] for d in map(json.loads, f)}


def test_trainer_trains_and_resumes_on_the_named_loader(tmp_path):
    CALLS.clear()
    full = _train(_cfg(tmp_path / "a"))
    assert [c["start_iter"] for c in CALLS] == [0] and sorted(full) == [0, 1, 2, 3]
    # resume from the iteration-1 checkpoint: the builder starts at 2, losses continue
    cfg = _cfg(tmp_path / "b")
    default_setup(cfg)
    out = tmp_path / "b" / "run"
    (out / "model_0000001.pth").write_bytes((tmp_path / "a" / "run" / "model_0000001.pth")
                                            .read_bytes())
    (out / "last_checkpoint").write_text("model_0000001.pth\n")
    resumed = _train(cfg, resume=True)
    assert CALLS[-1]["start_iter"] == 2 and sorted(resumed) == [2, 3]
    for it in (2, 3):
        assert resumed[it] == pytest.approx(full[it], rel=1e-6)
