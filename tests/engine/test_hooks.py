"""Standard hooks and metric writers: checkpoint files, evaluation schedule, JSON lines,
TensorBoard events and the console line."""
import glob
import json
import logging

import pytest
import torch

from segkit.checkpoint import Checkpointer, load_checkpoint
from segkit.engine import (
    EvalHook, HookBase, IterationTimer, LRScheduler, PeriodicCheckpointer, PeriodicWriter,
    SimpleTrainer,
)
from segkit.engine.hooks import flatten_results
from segkit.engine.lr_scheduler import build_lr_scheduler
from segkit.registry import HOOKS
from segkit.utils.events import (
    CommonMetricPrinter, EventStorage, JSONWriter, TensorboardXWriter, get_event_storage,
)

SOLVER = {"schedule": "step", "max_iter": 6, "steps": [4], "gamma": 0.1, "warmup_iters": 0,
          "warmup_factor": 1.0}


def _trainer(model, batches, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return SimpleTrainer(model, batches, opt), opt


def test_hooks_are_registered():
    for key in ("iteration_timer", "lr_scheduler", "periodic_checkpointer", "eval",
                "periodic_writer"):
        assert key in HOOKS


def test_periodic_checkpointer_files_and_final(tmp_path, toy_model, toy_batches):
    model = toy_model()
    trainer, opt = _trainer(model, toy_batches())
    ckpt = Checkpointer(model, str(tmp_path), opt, meta={"classes": ["a"], "experiment": "toy"})
    trainer.register_hooks([PeriodicCheckpointer(ckpt, period=2)])
    trainer.train(0, 6)
    files = sorted(p.split("/")[-1] for p in glob.glob(str(tmp_path / "*.pth")))
    assert files == ["model_0000001.pth", "model_0000003.pth", "model_final.pth"]
    final = load_checkpoint(str(tmp_path / "model_final.pth"))
    assert final["iteration"] == 5 and final["meta"]["iteration"] == 5
    assert final["meta"]["experiment"] == "toy" and final["meta"]["classes"] == ["a"]
    assert all(torch.equal(final["model"][k], v) for k, v in model.state_dict().items())
    assert ckpt.get_checkpoint_file().endswith("model_final.pth")


def test_eval_hook_schedule_and_results(toy_model, toy_batches):
    model = toy_model()
    trainer, _ = _trainer(model, toy_batches())
    calls = []

    def eval_fn():
        calls.append((trainer.iter, model.training))
        model.eval()  # an evaluation leaves the model in eval mode; the hook restores it
        return {"bbox": {"AP": 10.0 * len(calls), "AP-cat": float("nan")}}

    hook = EvalHook(3, eval_fn)
    trainer.register_hooks([hook])
    trainer.train(0, 7)
    # after iterations 2 and 5 (every 3), then once at the end
    assert [it for it, _ in calls] == [2, 5, 7]
    assert hook.latest_results == {"bbox": pytest.approx({"AP": 30.0, "AP-cat": float("nan")},
                                                         nan_ok=True)}
    assert [it for it, _ in hook.results] == [2, 5, 7]
    assert model.training
    assert [v for v, _ in trainer.storage.history("bbox/AP").values()] == [10.0, 20.0, 30.0]


def test_flatten_results():
    assert flatten_results({"bbox": {"AP": 1, "x": "s"}, "n": 2.5, "f": True}) == {
        "bbox/AP": 1.0, "n": 2.5}


def test_json_lines_written_and_parseable(tmp_path, toy_model, toy_batches):
    model = toy_model()
    trainer, opt = _trainer(model, toy_batches())
    sched = build_lr_scheduler(SOLVER, opt)
    path = tmp_path / "metrics.json"
    trainer.register_hooks([
        IterationTimer(warmup_iter=0), LRScheduler(sched),
        EvalHook(0, lambda: {"bbox": {"AP": 42.0}}),
        PeriodicWriter([JSONWriter(str(path), window_size=2)], period=2),
    ])
    trainer.train(0, 6)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [d["iteration"] for d in lines] == [1, 3, 5, 5]
    for d in lines[:3]:
        assert {"loss_a", "loss_b", "total_loss", "lr", "time", "data_time"} <= set(d)
    assert lines[0]["lr"] == pytest.approx(0.1) and lines[2]["lr"] == pytest.approx(0.01)
    # smoothed losses are the median over the window (2 values -> their mean)
    hist = [v for v, _ in trainer.storage.history("loss_a").values()]
    assert lines[1]["loss_a"] == pytest.approx((hist[2] + hist[3]) / 2)
    assert lines[3] == {"iteration": 5, "bbox/AP": 42.0}  # final evaluation, written once


def test_tensorboard_event_file(tmp_path, toy_model, toy_batches):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = toy_model()
    trainer, _ = _trainer(model, toy_batches())
    trainer.register_hooks([PeriodicWriter([TensorboardXWriter(str(tmp_path))], period=1)])
    trainer.train(0, 3)
    files = glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("loss_a")
    assert [e.step for e in events] == [0, 1, 2]
    first = trainer.storage.history("loss_a").values()[0][0]
    assert events[0].value == pytest.approx(first, rel=1e-6)


def test_console_line_and_progress_bar(toy_model, toy_batches, caplog, capsys):
    model = toy_model()
    trainer, opt = _trainer(model, toy_batches())
    sched = build_lr_scheduler(SOLVER, opt)
    printer = CommonMetricPrinter(max_iter=6, progress_bar=True)
    bar_positions = []

    class BarProbe(HookBase):
        def after_step(self):
            bar_positions.append(printer._bar.n)

    trainer.register_hooks([IterationTimer(warmup_iter=1), LRScheduler(sched),
                            PeriodicWriter([printer], period=3), BarProbe()])
    with caplog.at_level(logging.INFO, logger="segkit.utils.events"):
        trainer.train(0, 6)
    lines = [r.getMessage() for r in caplog.records if r.name == "segkit.utils.events"]
    assert len(lines) == 2  # iterations 3 and 6; the end-of-training write is not repeated
    assert lines[0].startswith("eta: 0:00:") and "iter: 3/6" in lines[0]
    for key in ("total_loss:", "loss_a:", "loss_b:", "time:", "data_time:", "lr: 0.1"):
        assert key in lines[0], key
    assert "iter: 6/6" in lines[1] and "lr: 0.01" in lines[1]
    assert bar_positions == [1, 2, 3, 4, 5, 6]  # every iteration, not only at the log lines
    assert "/6 [" in capsys.readouterr().err  # the tqdm bar is drawn on stderr
    assert printer._bar is None  # closed at the end of training


def test_console_line_after_a_failure_reports_the_last_finished_iteration(
        toy_model, toy_batches, caplog):
    model = toy_model(nan_at=4)
    trainer, _ = _trainer(model, toy_batches())
    trainer.register_hooks([PeriodicWriter([CommonMetricPrinter(6, progress_bar=False)], 3)])
    with caplog.at_level(logging.INFO, logger="segkit.utils.events"), \
            pytest.raises(FloatingPointError):
        trainer.train(0, 6)
    lines = [r.getMessage() for r in caplog.records if r.name == "segkit.utils.events"]
    # iteration 4 failed before recording anything: the end-of-training line reports 4
    # finished iterations (0..3), not 5
    assert [line.split("iter: ")[1].split()[0] for line in lines] == ["3/6", "4/6"]


def test_no_console_line_when_the_first_iteration_fails(toy_model, toy_batches, caplog):
    model = toy_model(nan_at=0)
    trainer, _ = _trainer(model, toy_batches())
    trainer.register_hooks([PeriodicWriter([CommonMetricPrinter(6, progress_bar=False)], 3)])
    with caplog.at_level(logging.INFO, logger="segkit.utils.events"), \
            pytest.raises(FloatingPointError, match="iteration 0"):
        trainer.train(0, 6)
    assert not [r for r in caplog.records if r.name == "segkit.utils.events"]


def test_event_storage_basics():
    with pytest.raises(RuntimeError, match="outside"):
        get_event_storage()
    with EventStorage(start_iter=10) as storage:
        assert get_event_storage() is storage
        for v in (1.0, 5.0, 3.0, 100.0):
            storage.put_scalar("loss", torch.tensor(v))
            storage.step()
        storage.put_scalar("lr", 0.5, smoothing_hint=False)
        assert storage.history("loss").median(3) == 5.0  # robust to the 100 outlier
        assert storage.history("loss").global_avg() == pytest.approx(27.25)
        assert storage.latest_with_smoothing_hint(3) == {"loss": (5.0, 13), "lr": (0.5, 14)}
        with pytest.raises(ValueError, match="smoothing_hint"):
            storage.put_scalar("lr", 0.1)
        with pytest.raises(KeyError, match="recorded: \\['loss', 'lr'\\]"):
            storage.history("los")


def test_history_buffer_windows_and_bounded_memory():
    from segkit.utils.events import HistoryBuffer

    h = HistoryBuffer(max_length=5)
    for i in range(8):
        h.update(float(i), i)
    assert [v for v, _ in h.values()] == [3.0, 4.0, 5.0, 6.0, 7.0]  # oldest dropped
    assert h.median(3) == 6.0 and h.avg(2) == 6.5 and h.median(100) == 5.0
    assert h.global_avg() == pytest.approx(3.5)  # still counts the dropped values
    assert h.latest() == 7.0
