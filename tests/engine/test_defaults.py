"""Config -> object builders and run set-up, on small hand-written configs."""
import json
import logging
import math
import os

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from segkit.engine.defaults import (
    build_datasets, build_lr_scheduler, build_model, build_optimizer, default_setup,
    format_results_table, iou_types, save_results_json,
)
from segkit.layers import FrozenBatchNorm2d
from segkit.registry import DATASETS, META_ARCHS


class _Net(nn.Module):
    def __init__(self, num_classes: int, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3)
        self.bn = nn.BatchNorm2d(width)
        self.gn = nn.GroupNorm(2, width)
        self.frozen = FrozenBatchNorm2d(width)
        self.stem = nn.Conv2d(3, width, 1)
        self.stem.requires_grad_(False)  # frozen stage, like freeze_at
        self.head = nn.Linear(width, num_classes)
        self.tied = self.head  # shared module: its parameters must be listed once


if "engine_test_net" not in META_ARCHS:
    META_ARCHS.register("engine_test_net")(_Net)


def _toy_dataset(split: str, classes=("a", "b", "c"), config_path: str = ""):
    records = [{"file_name": f"{split}{i}.png", "image_id": i, "height": 8, "width": 8,
                "annotations": []} for i in range(2)]
    return records, {"name": f"engine_test_toy_{split}_{len(classes)}",
                     "thing_classes": list(classes), "contiguous_to_category_id": None,
                     "json_file": None, "image_root": ""}


if "engine_test_toy" not in DATASETS:
    DATASETS.register("engine_test_toy")(_toy_dataset)


@pytest.fixture(autouse=True)
def _drop_log_handlers():
    """default_setup adds handlers to the "segkit" logger; later tests must not write to the
    log.txt of a finished test's temporary folder."""
    yield
    log = logging.getLogger("segkit")
    for h in [h for h in log.handlers if getattr(h, "_segkit", False)]:
        log.removeHandler(h)
        h.close()


def _cfg(tmp_path, **over):
    cfg = OmegaConf.create({
        "experiment": "toy",
        "model": {"name": "engine_test_net", "num_classes": "${dataset.num_classes}"},
        "dataset": {"num_classes": None, "train": {"name": "engine_test_toy", "split": "train"},
                    "val": {"name": "engine_test_toy", "split": "val"}},
        "solver": {"optimizer": "sgd", "base_lr": 0.02, "momentum": 0.9, "weight_decay": 1e-4,
                   "weight_decay_norm": 0.0, "schedule": "step", "steps": [6], "gamma": 0.1,
                   "max_iter": 10, "warmup_iters": 2, "warmup_factor": 0.25,
                   "clip_grad_norm": None},
        "train": {"output_dir": str(tmp_path / "run"), "device": "cpu", "seed": 7,
                  "deterministic": False},
        "evaluation": {"iou_types": ["bbox", "segm"], "max_images": None},
    })
    cfg.merge_with(OmegaConf.create(over))
    OmegaConf.set_struct(cfg, True)  # like a Hydra-composed config
    return cfg


def test_build_datasets_fills_num_classes_and_model_uses_it(tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match="model.num_classes is null .*dataset.num_classes"):
        build_model(cfg)
    data = build_datasets(cfg)
    assert set(data) == {"train", "val"} and cfg.dataset.num_classes == 3
    model = build_model(cfg)
    assert model.head.out_features == 3 and next(model.parameters()).device.type == "cpu"


def test_build_datasets_rejects_inconsistent_classes(tmp_path):
    cfg = _cfg(tmp_path, dataset={"num_classes": 5})
    with pytest.raises(ValueError, match="dataset.num_classes=5 .* 3 classes"):
        build_datasets(cfg)
    cfg = _cfg(tmp_path, dataset={"val": {"classes": ["a", "b"]}})
    with pytest.raises(ValueError, match="dataset.val has classes"):
        build_datasets(cfg)


def test_optimizer_groups(tmp_path):
    cfg = _cfg(tmp_path, solver={"weight_decay_norm": 0.5}, dataset={"num_classes": 3})
    model = build_model(cfg)
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    regular, norm = opt.param_groups
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(norm["params"]) == ids([*model.bn.parameters(), *model.gn.parameters()])
    assert norm["weight_decay"] == 0.5 and regular["weight_decay"] == 1e-4
    assert ids(regular["params"]) == ids([*model.conv.parameters(), *model.head.parameters()])
    assert len(regular["params"]) == 4  # frozen stem excluded, tied head counted once
    assert all(g["lr"] == 0.02 for g in opt.param_groups)
    with pytest.raises(ValueError, match="solver.optimizer"):
        build_optimizer(_cfg(tmp_path, solver={"optimizer": "adam"}), model)


def test_lr_scheduler_from_config(tmp_path):
    cfg = _cfg(tmp_path, dataset={"num_classes": 3})
    opt = build_optimizer(cfg, build_model(cfg))
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.02 * 0.25, 0.02 * (0.25 * 0.5 + 0.5)] + [0.02] * 4 + [0.002] * 4
    assert lrs == pytest.approx(expected)


def test_default_setup_writes_run_folder(tmp_path):
    cfg = _cfg(tmp_path)
    out = default_setup(cfg)
    assert out == str(tmp_path / "run")
    saved = OmegaConf.load(os.path.join(out, "config.yaml"))
    assert saved.model.num_classes is None and saved.solver.base_lr == 0.02  # resolved values
    a = torch.rand(3)
    default_setup(cfg)  # seeds again: same stream; logging handlers not duplicated
    assert torch.equal(a, torch.rand(3))
    logging.getLogger("segkit.test").info("hello from the engine test")
    for h in logging.getLogger("segkit").handlers:
        h.flush()
    text = open(os.path.join(out, "log.txt")).read()
    assert text.count("hello from the engine test") == 1 and "torch:" in text


def test_random_seed_is_recorded(tmp_path):
    cfg = _cfg(tmp_path, train={"seed": -1})
    out = default_setup(cfg)
    seed = cfg.train.seed
    assert isinstance(seed, int) and seed >= 0  # the train loader and checkpoints get it
    assert OmegaConf.load(os.path.join(out, "config.yaml")).train.seed == seed
    a = torch.rand(3)
    default_setup(cfg)  # the recorded seed repeats the run
    assert cfg.train.seed == seed and torch.equal(a, torch.rand(3))


def test_log_file_not_opened_twice_when_the_root_logger_writes_it(tmp_path):
    """Hydra's job log pointed at log.txt: segkit adds no second handler on the same file."""
    out = tmp_path / "run"
    out.mkdir()
    root_file = logging.FileHandler(out / "log.txt")
    logging.getLogger().addHandler(root_file)
    try:
        default_setup(_cfg(tmp_path))
        mine = [h for h in logging.getLogger("segkit").handlers if getattr(h, "_segkit", False)]
        assert not any(isinstance(h, logging.FileHandler) for h in mine)
    finally:
        logging.getLogger().removeHandler(root_file)
        root_file.close()


def test_iou_types_drop_segm_without_mask_head(tmp_path):
    cfg = _cfg(tmp_path, model={"roi_heads": {"mask_head": None}})
    assert iou_types(cfg) == ["bbox"]
    cfg = _cfg(tmp_path, model={"roi_heads": {"mask_head": {"name": "m"}}})
    assert iou_types(cfg) == ["bbox", "segm"]


def test_results_table_and_json(tmp_path):
    results = {"bbox": {"AP": 37.123, "AP50": 58.0, "AP75": 40.0, "APs": math.nan,
                        "APm": 41.0, "APl": 48.5}, "segm": {"AP": 34.0}}
    table = format_results_table(results)
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == [
        "task", "AP", "AP50", "AP75", "APs", "APm", "APl"]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == [
        "bbox", "37.12", "58.00", "40.00", "nan", "41.00", "48.50"]
    assert lines[3].split("|")[1].strip() == "segm" and "34.00" in lines[3]
    path = save_results_json(results, str(tmp_path / "r" / "res.json"), checkpoint="x.pth")
    data = json.load(open(path))  # strict JSON: NaN became null
    assert data["results"]["bbox"]["APs"] is None and data["checkpoint"] == "x.pth"
