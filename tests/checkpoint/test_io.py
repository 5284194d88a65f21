"""Checkpoint files: format, atomic write, weights_only round trip, clear errors on corrupt
files, fallback to the previous checkpoint, and the one-table report of mismatched keys."""
import logging
import os

import pytest
import torch
from torch import nn

from segkit.checkpoint import (
    CheckpointError, Checkpointer, load_checkpoint, load_state_dict_report, save_checkpoint,
)


class Tiny(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, num_classes)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model, other = Tiny(), Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, model.state_dict(),
                    meta={"config": {"solver": {"base_lr": 0.1}}, "classes": ["a", "b", "c"],
                          "experiment": "exp"},
                    optimizer=opt.state_dict(), iteration=7)
    # the file must be readable by the restricted unpickler, without our helper
    raw = torch.load(path, weights_only=True)
    assert raw["meta"] == {"format": "segkit", "version": 1, "config": {"solver": {"base_lr": 0.1}},
                           "classes": ["a", "b", "c"], "experiment": "exp", "iteration": 7}
    assert raw["iteration"] == 7 and raw["optimizer"]["param_groups"][0]["lr"] == 0.1
    ckpt = load_checkpoint(path)
    other.load_state_dict(ckpt["model"])
    assert _same_weights(model, other)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # temp file renamed


def test_atomic_write_keeps_previous_file_when_save_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "model.pth")
    save_checkpoint(path, Tiny().state_dict())
    before = open(path, "rb").read()
    fsynced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))

    def crash_mid_write(obj, f):
        f.write(b"partial bytes")  # a half-written file must never replace the good one
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, Tiny().state_dict())
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["model.pth"]  # the temp file was cleaned up
    assert fsynced == []  # the failed write never reached fsync/rename
    monkeypatch.undo()
    monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))
    save_checkpoint(path, Tiny().state_dict())
    assert fsynced  # data flushed to disk before the rename


def test_truncated_file_gives_clear_error_naming_the_path(tmp_path):
    path = str(tmp_path / "model_0000009.pth")
    save_checkpoint(path, Tiny().state_dict(), iteration=9)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model_0000009.pth") as err:
        load_checkpoint(path)
    assert "truncated or corrupt" in str(err.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "missing.pth"))


def test_non_tensor_objects_are_refused(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "hook": Tiny}, path)  # a class reference: arbitrary code on load
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(path)


def test_plain_state_dict_file_loads(tmp_path):
    model = Tiny()
    path = str(tmp_path / "plain.pth")
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(path)
    assert ckpt["meta"]["format"] == "segkit" and set(ckpt["model"]) == set(model.state_dict())


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path, caplog):
    torch.manual_seed(0)
    model = Tiny()
    ckpt = Checkpointer(model, str(tmp_path), meta={"classes": ["a", "b", "c"]})
    ckpt.save("model_0000004", iteration=4)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.head.weight.add_(1.0)
    newest = ckpt.save("model_0000009", iteration=9)
    assert open(tmp_path / "last_checkpoint").read().split() == ["model_0000009.pth",
                                                                  "model_0000004.pth"]
    with open(newest, "r+b") as f:
        f.truncate(100)

    fresh = Tiny()
    with caplog.at_level(logging.WARNING, logger="segkit.checkpoint"):
        result = Checkpointer(fresh, str(tmp_path)).resume_or_load(None, resume=True)
    assert result["iteration"] == 4
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in good.items())
    assert "model_0000009.pth" in caplog.text and "falling back" in caplog.text

    with open(tmp_path / "model_0000004.pth", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        Checkpointer(Tiny(), str(tmp_path)).resume_or_load(None, resume=True)


def test_resume_restores_optimizer_and_load_only_weights_otherwise(tmp_path):
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.head(torch.randn(2, 6)).sum().backward()
    opt.step()
    Checkpointer(model, str(tmp_path), optimizer=opt).save("model_final", iteration=19)

    m2 = Tiny()
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.5, momentum=0.9)
    res = Checkpointer(m2, str(tmp_path), optimizer=opt2).resume_or_load(None, resume=True)
    assert res["iteration"] == 19 and opt2.param_groups[0]["lr"] == 0.1
    assert torch.equal(opt2.state_dict()["state"][4]["momentum_buffer"],
                       opt.state_dict()["state"][4]["momentum_buffer"])

    m3 = Tiny()
    opt3 = torch.optim.SGD(m3.parameters(), lr=0.5)
    res = Checkpointer(m3, str(tmp_path / "new_run"), optimizer=opt3).resume_or_load(
        str(tmp_path / "model_final.pth"), resume=True)  # nothing to resume: init weights
    assert "iteration" not in res and opt3.param_groups[0]["lr"] == 0.5
    assert _same_weights(m3, model)


def test_shape_mismatch_is_skipped_and_reported_in_one_table(tmp_path, caplog):
    src = Tiny(num_classes=5)
    state = src.state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["body.bias"]
    dst = Tiny(num_classes=3)
    head_before = dst.head.weight.clone()
    with caplog.at_level(logging.WARNING, logger="segkit.checkpoint"):
        report = load_state_dict_report(dst, state, source="ckpt.pth")
    assert report.missing == ["body.bias"]
    assert report.unexpected == ["extra.weight"]
    assert sorted(m[0] for m in report.shape_mismatch) == ["head.bias", "head.weight"]
    assert ("head.weight", (5, 6), (3, 6)) in report.shape_mismatch
    assert torch.equal(dst.head.weight, head_before)  # skipped, not half-loaded
    assert torch.equal(dst.body.weight, src.body.weight)  # everything else loaded
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # ONE table, not one line per key
    text = warnings[0].getMessage()
    for needle in ("ckpt.pth", "missing in checkpoint", "unexpected in checkpoint",
                   "shape mismatch", "checkpoint (5, 6) vs model (3, 6)", "| body ", "extra"):
        assert needle in text, needle


def test_checkpointer_load_with_mismatch_does_not_crash(tmp_path):
    Checkpointer(Tiny(num_classes=5), str(tmp_path)).save("model_final", iteration=0)
    model = Tiny(num_classes=3)
    rest = Checkpointer(model, str(tmp_path)).load(str(tmp_path / "model_final.pth"))
    assert rest["iteration"] == 0 and rest["meta"]["iteration"] == 0


class _Scale:
    """Stands for a GradScaler: plain state that a resumed run must get back."""

    def __init__(self, scale):
        self.scale = scale

    def state_dict(self):
        return {"scale": self.scale, "_growth_tracker": 3}

    def load_state_dict(self, state):
        self.scale = state["scale"]


def test_extra_checkpointables_round_trip(tmp_path):
    model = Tiny()
    Checkpointer(model, str(tmp_path), grad_scaler=_Scale(1024.0)).save("model_0000004",
                                                                        iteration=4)
    assert torch.load(tmp_path / "model_0000004.pth", weights_only=True)["grad_scaler"] == {
        "scale": 1024.0, "_growth_tracker": 3}
    scaler = _Scale(65536.0)
    res = Checkpointer(Tiny(), str(tmp_path), grad_scaler=scaler).resume_or_load(None)
    assert scaler.scale == 1024.0 and res["iteration"] == 4 and "grad_scaler" not in res
    # None (no AMP) is not saved; a file without the entry leaves the object as it is
    Checkpointer(model, str(tmp_path), grad_scaler=None).save("model_0000009", iteration=9)
    assert "grad_scaler" not in load_checkpoint(str(tmp_path / "model_0000009.pth"))
    Checkpointer(Tiny(), str(tmp_path), grad_scaler=scaler).resume_or_load(None)
    assert scaler.scale == 1024.0
    with pytest.raises(ValueError, match="reserved"):
        Checkpointer(model, str(tmp_path), meta=None, iteration=_Scale(1.0))
