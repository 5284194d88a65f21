"""Mixed precision (``train.amp``): bfloat16 autocast on CPU, float16 with gradient scaling,
and the GradScaler state saved with the checkpoints."""
import pytest
import torch

from segkit.checkpoint import load_checkpoint
from segkit.config import compose
from segkit.engine.cli import run_train
from segkit.engine.defaults import build_datasets, build_model, build_optimizer, \
    build_train_loader
from segkit.engine.trainer import SimpleTrainer, amp_dtype_for
from segkit.utils.events import EventStorage
from test_cli import _overrides


def test_amp_dtype_names():
    assert amp_dtype_for("cpu") == torch.bfloat16
    assert amp_dtype_for("cuda") == torch.float16
    assert amp_dtype_for("cuda", "bf16") == torch.bfloat16
    assert amp_dtype_for("cpu", "float16") == torch.float16
    with pytest.raises(ValueError, match="train.amp_dtype must be auto, bfloat16 or float16, "
                                         "got 'fp8'"):
        amp_dtype_for("cpu", "fp8")


def _steps(cfg, amp, amp_dtype="auto", steps=2):
    """Train ``steps`` iterations from the same seed; the backbone's output dtypes and the
    per-iteration losses."""
    records = build_datasets(cfg)["train"][0]
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = set()
    model.backbone.register_forward_hook(lambda m, i, out: seen.update(v.dtype for v in
                                                                      out.values()))
    trainer = SimpleTrainer(model, build_train_loader(cfg, records), build_optimizer(cfg, model),
                            amp=amp, amp_dtype=amp_dtype)
    losses = []
    with EventStorage(0) as storage:
        trainer.storage = storage
        for it in range(steps):
            trainer.iter = storage.iter = it
            trainer.run_step()
            losses.append({k: h.latest() for k, h in storage.histories().items()
                           if k.startswith("loss_")})
    return model, trainer, seen, losses


def test_bfloat16_autocast_on_cpu_trains_in_low_precision_with_float32_weights(tmp_path):
    cfg = compose(_overrides(tmp_path, tmp_path / "out"))
    model, trainer, seen, losses = _steps(cfg, amp=True)
    assert trainer.amp_dtype == torch.bfloat16 and trainer._scaler is None  # bf16: no scaling
    assert seen == {torch.bfloat16}  # the convolutions ran in bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    _, _, seen32, losses32 = _steps(cfg, amp=False)
    assert seen32 == {torch.float32}
    # the first step starts from the same weights and batch: the losses agree to bf16 precision
    for name, value in losses32[0].items():
        assert losses[0][name] == pytest.approx(value, rel=0.05, abs=0.01), name


@pytest.mark.slow
def test_float16_run_scales_gradients_and_checkpoints_the_scaler(tmp_path):
    """train.amp_dtype=float16 steps through a GradScaler (CPU has one too); its scale is part
    of every checkpoint, so a resumed run does not restart from the initial scale."""
    out = tmp_path / "run"
    run_train(compose(_overrides(tmp_path, out) + [
        "train.amp=true", "train.amp_dtype=float16", "train.num_vis_images=0",
        "evaluation.max_images=1"]))
    ckpt = load_checkpoint(str(out / "model_final.pth"))
    assert ckpt["grad_scaler"]["scale"] > 0
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values()
               if v.is_floating_point())


@pytest.mark.gpu
def test_float16_autocast_on_cuda_uses_a_grad_scaler(tmp_path):
    cfg = compose(_overrides(tmp_path, tmp_path / "out") + ["train.device=cuda"])
    model, trainer, seen, losses = _steps(cfg, amp=True)
    assert trainer._scaler is not None and seen == {torch.float16}
    assert all(torch.isfinite(torch.tensor(list(d.values()))).all() for d in losses)
