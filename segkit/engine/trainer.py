"""The training loop: :class:`TrainerBase` with hooks, and :class:`SimpleTrainer`'s SGD step.

The loop only iterates; everything else (LR schedule, checkpoints, evaluation, metric writers)
is a :class:`HookBase` called around each step, so a recipe adds or drops behaviour without
touching the loop.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import weakref
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from segkit.utils.comm import reduce_mean
from segkit.utils.events import EventStorage

__all__ = ["HookBase", "SimpleTrainer", "TrainerBase", "amp_dtype_for", "check_losses_finite"]

logger = logging.getLogger(__name__)


class HookBase:
    """Base class of training hooks; override any of the four callbacks.

    ``self.trainer`` is set (as a weak proxy, to avoid a reference cycle) when the hook is
    registered. Hooks run in registration order.
    """

    trainer: "TrainerBase"

    def before_train(self) -> None:
        """Called once before the first iteration."""

    def after_train(self) -> None:
        """Called once after the last iteration, also when training raised
        (``self.trainer.completed`` tells which)."""

    def before_step(self) -> None:
        """Called before each iteration."""

    def after_step(self) -> None:
        """Called after each iteration (not after one that raised)."""


class TrainerBase:
    """Iterates ``run_step`` from ``start_iter`` to ``max_iter`` with hooks around it.

    Attributes:
        iter: the current iteration (``max_iter`` after a completed run).
        start_iter, max_iter: the range given to :meth:`train`.
        storage: the :class:`EventStorage` of the running ``train`` call.
        completed: True once every iteration ran; hooks that write final artifacts
            (``model_final.pth``, the final evaluation) check it so a crash does not produce
            a "final" model.
    """

    def __init__(self) -> None:
        self._hooks: List[HookBase] = []
        self.iter = self.start_iter = self.max_iter = 0
        self.completed = False
        self.storage: Optional[EventStorage] = None

    def register_hooks(self, hooks: Sequence[Optional[HookBase]]) -> None:
        """Append hooks (None entries are skipped) in the order they should run."""
        for hook in hooks:
            if hook is None:
                continue
            if not isinstance(hook, HookBase):
                raise TypeError(f"hooks must subclass HookBase, got {type(hook).__name__}")
            hook.trainer = weakref.proxy(self)
            self._hooks.append(hook)

    def train(self, start_iter: int, max_iter: int) -> None:
        """Run iterations ``start_iter .. max_iter - 1``.

        Raises:
            FloatingPointError: a loss became NaN/inf (see :meth:`SimpleTrainer.run_step`).
        """
        logger.info("Starting training from iteration %d to %d", start_iter, max_iter)
        self.iter = self.start_iter = start_iter
        self.max_iter = max_iter
        self.completed = False
        with EventStorage(start_iter) as self.storage:
            try:
                for h in self._hooks:
                    h.before_train()
                for self.iter in range(start_iter, max_iter):
                    self.storage.iter = self.iter
                    for h in self._hooks:
                        h.before_step()
                    self.run_step()
                    for h in self._hooks:
                        h.after_step()
                self.iter = max_iter
                self.completed = True
            except Exception:
                logger.exception("Training stopped by an exception at iteration %d", self.iter)
                raise
            finally:
                # Writers still flush/close after a failure; hooks skip final artifacts.
                for h in self._hooks:
                    h.after_train()

    def run_step(self) -> None:
        raise NotImplementedError


class SimpleTrainer(TrainerBase):
    """One SGD step per iteration: losses -> sum -> backward -> (clip) -> optimizer step.

    Args:
        model: module returning a ``dict[str, Tensor]`` of scalar losses in training mode for a
            batch (``list[dict]``) from ``data_loader``.
        data_loader: iterable of batches; restarted when exhausted (finite loaders work, the
            segkit train loader is infinite). May be None if assigned before :meth:`train`.
        optimizer: torch optimizer over the model's parameters.
        clip_grad_norm: max global L2 norm of the gradients, or None for no clipping.
        amp: run the forward in autocast (mixed precision; see :func:`amp_dtype_for`). The
            backward, the optimizer step and the parameters stay float32.
        amp_dtype: ``auto`` (bfloat16 on CPU, float16 on CUDA), ``bfloat16`` or ``float16``.
            float16 steps go through a ``GradScaler``: its 5-bit exponent underflows small
            gradients unless the loss is scaled up first. bfloat16 has float32's exponent
            range and needs no scaling.
    """

    def __init__(self, model: nn.Module, data_loader: Optional[Iterable],
                 optimizer: torch.optim.Optimizer, clip_grad_norm: Optional[float] = None,
                 amp: bool = False, amp_dtype: str = "auto"):
        super().__init__()
        model.train()
        self.model = model
        self.data_loader = data_loader
        self._data_iter: Optional[Any] = None  # created on first use: no workers start early
        self.optimizer = optimizer
        self.clip_grad_norm = clip_grad_norm
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._device_type = device.type
        # None: no autocast (amp off)
        self.amp_dtype = amp_dtype_for(device.type, amp_dtype) if amp else None
        self._scaler = (torch.amp.GradScaler(device.type)
                        if self.amp_dtype == torch.float16 else None)

    def _next_batch(self) -> Any:
        if self._data_iter is None:
            if self.data_loader is None:
                raise RuntimeError("SimpleTrainer has no data_loader; set it before train()")
            self._data_iter = iter(self.data_loader)
        try:
            return next(self._data_iter)
        except StopIteration:  # finite loader: start a new epoch
            self._data_iter = iter(self.data_loader)
            try:
                return next(self._data_iter)
            except StopIteration:
                raise ValueError("the training data loader yields no batches") from None

    def run_step(self) -> None:
        """One iteration. The NaN guard checks the losses before backward and the gradient
        norm before the optimizer step, so a non-finite value never reaches the parameters (or,
        through them, a later checkpoint). BatchNorm running statistics are updated by the
        forward itself and are not rolled back.
        """
        if not self.model.training:
            raise RuntimeError("SimpleTrainer.run_step: the model is in eval mode; call "
                               "model.train() after evaluating inside the loop")
        start = time.perf_counter()
        data = self._next_batch()
        data_time = time.perf_counter() - start

        autocast = (torch.autocast(self._device_type, dtype=self.amp_dtype)
                    if self.amp_dtype is not None else contextlib.nullcontext())
        with autocast:
            try:
                loss_dict = self.model(data)
            except FloatingPointError as e:  # a model's own finiteness check (diverged boxes)
                raise FloatingPointError(f"at iteration {self.iter}: {e}. {_NAN_ADVICE}") from e
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        if not isinstance(loss_dict, Mapping) or not loss_dict:
            raise TypeError(f"in training mode the model must return a non-empty dict of "
                            f"losses, got {type(loss_dict).__name__}")
        # averaged over the processes of a distributed job: every process logs and checks the
        # same numbers, so a NaN on one process stops all of them at this iteration
        values = reduce_mean(_loss_values(loss_dict))
        check_losses_finite(values, self.iter)
        losses = sum(loss_dict.values())

        self.optimizer.zero_grad(set_to_none=True)
        if self._scaler is not None:
            self._scaler.scale(losses).backward()
            self._scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
        else:
            losses.backward()
        grad_norm = self._clip_gradients()
        self._write_metrics(values, data_time, grad_norm)
        if self._scaler is not None:
            self._scaler.step(self.optimizer)  # skips the step itself on inf/NaN gradients
            self._scaler.update()
        else:
            self.optimizer.step()

    def _clip_gradients(self) -> Optional[float]:
        """The global L2 norm of the gradients (clipped to ``clip_grad_norm`` when set).

        A non-finite norm stops training before the step, clipping or not: finite losses can
        still give NaN/inf gradients, which would reach the weights. Under a GradScaler such
        steps are expected and skipped by the scaler itself.
        """
        params = [p for g in self.optimizer.param_groups for p in g["params"]
                  if p.grad is not None]
        if not params:
            return None
        if self.clip_grad_norm is None:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
        else:
            norm = float(torch.nn.utils.clip_grad_norm_(params, float(self.clip_grad_norm)))
        if not math.isfinite(norm) and self._scaler is None:
            raise FloatingPointError(
                f"gradient norm became {norm} at iteration {self.iter} although every loss was "
                f"finite. {_NAN_ADVICE}")
        return norm

    def _write_metrics(self, values: Mapping[str, float], data_time: float,
                       grad_norm: Optional[float]) -> None:
        storage = self.storage
        if storage is None:  # run_step called outside train(): nothing to record into
            return
        storage.put_scalar("data_time", data_time)
        if len(values) > 1 or "total_loss" not in values:
            storage.put_scalar("total_loss", sum(values.values()))
        storage.put_scalars(**values)
        if grad_norm is not None:
            storage.put_scalar("grad_norm", grad_norm)


# Why the weights and checkpoints are still good after a NaN stop, and what usually helps.
_NAN_ADVICE = ("The optimizer step was skipped, so the weights are those after the previous "
               "iteration and saved checkpoints are untouched. Try a lower solver.base_lr, a "
               "longer solver.warmup_iters or solver.clip_grad_norm.")


_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
               "fp16": torch.float16, "half": torch.float16}


def amp_dtype_for(device_type: str, name: str = "auto") -> torch.dtype:
    """The autocast dtype for ``train.amp_dtype``: ``auto`` is bfloat16 on CPU (the CPU
    autocast's native low precision, on oneDNN's bf16 kernels) and float16 on CUDA (the fast
    tensor-core type on every CUDA GPU; set ``bfloat16`` on GPUs that have it).

    Raises:
        ValueError: an unknown name.
    """
    key = str(name).lower()
    if key == "auto":
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if key not in _AMP_DTYPES:
        raise ValueError(f"train.amp_dtype must be auto, bfloat16 or float16, got {name!r}")
    return _AMP_DTYPES[key]


def _loss_values(loss_dict: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """The scalar losses as floats, read from the device in one synchronisation."""
    stacked = torch.stack([v.detach().float().reshape(()) for v in loss_dict.values()])
    return dict(zip(loss_dict.keys(), stacked.tolist()))


def check_losses_finite(loss_dict: Mapping[str, Union[torch.Tensor, float]],
                        iteration: int) -> None:
    """Raise ``FloatingPointError`` naming every non-finite loss term, its value and the
    iteration (the usual causes are a too-high LR or bad boxes; say so).

    Args:
        loss_dict: scalar losses, as tensors or floats.
        iteration: named in the message.
    """
    values = {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
              for k, v in loss_dict.items()}
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if not bad:
        return
    ok = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k not in bad) or "none"
    raise FloatingPointError(
        f"non-finite loss at iteration {iteration}: "
        + ", ".join(f"{k}={v}" for k, v in bad.items())
        + f" (finite terms: {ok}). {_NAN_ADVICE}")
