"""The training loop: hook order, the NaN guard (weights and checkpoints untouched), gradient
clipping, and resume continuing the same run exactly."""
import copy
import hashlib
import os

import pytest
import torch

from segkit.checkpoint import Checkpointer
from segkit.engine import (
    HookBase, LRScheduler, PeriodicCheckpointer, SimpleTrainer, get_rng_state, seed_all,
    set_rng_state,
)
from segkit.engine.lr_scheduler import build_lr_scheduler

SOLVER = {"schedule": "step", "max_iter": 10, "steps": [6], "gamma": 0.1, "warmup_iters": 2,
          "warmup_factor": 0.1}


class Recorder(HookBase):
    def __init__(self, log):
        self.log = log

    def before_train(self):
        self.log.append("before_train")

    def before_step(self):
        self.log.append(("before_step", self.trainer.iter))

    def after_step(self):
        self.log.append(("after_step", self.trainer.iter))

    def after_train(self):
        self.log.append(("after_train", self.trainer.completed))


class Snapshot(HookBase):
    """Weights after every finished iteration."""

    def __init__(self):
        self.states = {}

    def after_step(self):
        self.states[self.trainer.iter] = copy.deepcopy(self.trainer.model.state_dict())


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_hooks_run_in_order_and_storage_follows_iterations(toy_model, toy_batches):
    log = []
    model = toy_model()
    trainer = SimpleTrainer(model, toy_batches(), torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.register_hooks([Recorder(log), None])
    trainer.train(3, 5)
    assert log == ["before_train", ("before_step", 3), ("after_step", 3), ("before_step", 4),
                   ("after_step", 4), ("after_train", True)]
    assert trainer.iter == 5 and trainer.completed
    hist = trainer.storage.history("loss_a").values()
    assert [it for _, it in hist] == [3, 4]
    total = trainer.storage.history("total_loss").latest()
    parts = trainer.storage.history("loss_a").latest() + trainer.storage.history("loss_b").latest()
    assert total == pytest.approx(parts)


def test_nan_guard_names_loss_and_iteration_and_keeps_weights(tmp_path, toy_model, toy_batches):
    model = toy_model(nan_at=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = build_lr_scheduler(SOLVER, opt)
    checkpointer = Checkpointer(model, str(tmp_path), opt, sched)
    snap, log = Snapshot(), []
    trainer = SimpleTrainer(model, toy_batches(), opt)
    trainer.register_hooks([LRScheduler(sched), PeriodicCheckpointer(checkpointer, 2), snap,
                            Recorder(log)])
    saved = {}

    class HashAfterSave(HookBase):
        def after_step(self):
            path = tmp_path / "model_0000001.pth"
            if path.exists() and not saved:
                saved["sha"] = _sha(path)

    trainer.register_hooks([HashAfterSave()])
    with pytest.raises(FloatingPointError) as err:
        trainer.train(0, 10)
    msg = str(err.value)
    assert "loss_b=nan" in msg and "iteration 3" in msg and "loss_a=" in msg
    # the failing step never reached the weights: they are the ones after iteration 2 (BN
    # running statistics are buffers updated by the forward itself, so only parameters count)
    after_2 = snap.states[2]
    assert all(torch.equal(p, after_2[k]) for k, p in model.named_parameters())
    assert 3 not in snap.states and log[-1] == ("after_train", False)
    # the last saved checkpoint is untouched and no "final" model was written
    assert _sha(tmp_path / "model_0000001.pth") == saved["sha"]
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert checkpointer.get_checkpoint_file().endswith("model_0000001.pth")


def test_gradient_clipping_bounds_the_update(toy_model, toy_batches):
    model = toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # update = -clipped gradient
    trainer = SimpleTrainer(model, toy_batches(), opt, clip_grad_norm=0.01)
    trainer.train(0, 1)
    step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)
    assert trainer.storage.history("grad_norm").latest() > 0.01  # the raw norm was larger


def _run(tmp_path, toy_model, toy_batches, start, stop, resume=False, crash_at=None):
    """Train with the standard LR + checkpoint hooks; return the model."""
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = build_lr_scheduler(SOLVER, opt)
    checkpointer = Checkpointer(model, str(tmp_path), opt, sched)
    if resume:
        ckpt = checkpointer.resume_or_load(None, resume=True)
        start = ckpt["iteration"] + 1
        set_rng_state(ckpt["rng"])
    trainer = SimpleTrainer(model, toy_batches(), opt)
    iters = []

    class Stop(HookBase):
        def before_step(self):
            iters.append(self.trainer.iter)
            if self.trainer.iter == crash_at:
                raise KeyboardInterrupt  # e.g. the job was pre-empted

    trainer.register_hooks([LRScheduler(sched), PeriodicCheckpointer(checkpointer, 5), Stop()])
    try:
        trainer.train(start, stop)
    except KeyboardInterrupt:
        pass
    return model, iters, opt


def test_resume_continues_from_saved_iteration_identically(tmp_path, toy_model, toy_batches):
    seed_all(123)
    full, _, _ = _run(tmp_path / "full", toy_model, toy_batches, 0, 10)

    seed_all(123)
    _, iters, _ = _run(tmp_path / "cut", toy_model, toy_batches, 0, 10, crash_at=7)
    assert iters[-1] == 7 and not (tmp_path / "cut" / "model_final.pth").exists()
    torch.manual_seed(999)  # a new process: different RNG until the checkpoint restores it
    resumed, iters, opt = _run(tmp_path / "cut", toy_model, toy_batches, 0, 10, resume=True)
    assert iters == [5, 6, 7, 8, 9]  # checkpoint model_0000004 -> next iteration 5
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1)  # after the step at 6


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    import random

    import numpy as np

    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(1), expected[2])


class OneWeight(torch.nn.Module):
    """A single weight ``w = 1`` and the forward given as ``forward(self, batch)``."""

    def __init__(self, forward):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))
        self._forward = forward

    def forward(self, batch):
        return self._forward(self, batch)


def test_model_output_must_be_a_loss_dict(toy_batches):
    model = OneWeight(lambda self, batch: [self.w])
    trainer = SimpleTrainer(model, toy_batches(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="dict of losses"):
        trainer.train(0, 1)


def _amp_steps(model, batches, device):
    model.to(device)
    before = [p.detach().clone() for p in model.parameters()]

    def on_device():
        for batch in batches:
            yield [{k: v.to(device) for k, v in d.items()} for d in batch]

    trainer = SimpleTrainer(model, on_device(), torch.optim.SGD(model.parameters(), lr=0.1),
                            clip_grad_norm=1.0, amp=True)
    trainer.train(0, 3)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    return trainer


def test_amp_on_cpu_uses_bfloat16_autocast(toy_model, toy_batches):
    trainer = _amp_steps(toy_model(), toy_batches(), "cpu")
    assert trainer._scaler is None  # bf16 needs no loss scaling


@pytest.mark.gpu
def test_amp_on_cuda_uses_grad_scaler(toy_model, toy_batches):
    trainer = _amp_steps(toy_model(), toy_batches(), "cuda")
    assert trainer._scaler is not None and trainer._scaler.get_scale() > 0


def test_a_model_raising_floating_point_error_gets_the_iteration(toy_batches):
    def diverges(self, batch):
        raise FloatingPointError("rpn: predicted boxes are not finite")

    model = OneWeight(diverges)
    trainer = SimpleTrainer(model, toy_batches(), torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(FloatingPointError, match="at iteration 4: rpn: predicted boxes") as err:
        trainer.train(4, 6)
    assert "solver.base_lr" in str(err.value) and torch.equal(model.w, torch.ones(1))


def test_non_finite_gradient_stops_before_the_step_without_clipping(toy_batches):
    # sqrt at 0: the loss is a finite 0, its gradient 0 * inf = NaN
    model = OneWeight(lambda self, batch: {"loss_sqrt": torch.sqrt((self.w - 1) ** 2 * 0).sum()})
    trainer = SimpleTrainer(model, toy_batches(), torch.optim.SGD(model.parameters(), lr=0.1))
    assert trainer.clip_grad_norm is None
    with pytest.raises(FloatingPointError, match="gradient norm became nan at iteration 0"):
        trainer.train(0, 2)
    assert torch.equal(model.w, torch.ones(1))  # the NaN gradient never reached the weight


def test_gradient_norm_is_recorded_without_clipping(toy_model, toy_batches):
    model = toy_model()
    trainer = SimpleTrainer(model, toy_batches(), torch.optim.SGD(model.parameters(), lr=0.01))
    trainer.train(0, 2)
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert trainer.storage.history("grad_norm").latest() == pytest.approx(float(expected))
