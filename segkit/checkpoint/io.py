"""Checkpoint files: atomic save, ``weights_only`` load, and a :class:`Checkpointer` for runs.

File format (README.md, "Conventions")::

    {"model": state_dict,
     "meta": {"format": "segkit", "version": 1, "config": dict | None, "classes": [str],
              "experiment": str | None, "iteration": int},
     "optimizer": ..., "scheduler": ..., "iteration": int, ...extra}

Every value is a tensor or a plain container, so ``torch.load(path, weights_only=True)`` can
read it without running arbitrary pickled code from a downloaded file.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections import OrderedDict, defaultdict
from typing import IO, Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn

from segkit.utils import comm

__all__ = [
    "CheckpointError", "Checkpointer", "IncompatibleKeys", "FORMAT", "VERSION",
    "format_incompatible", "load_checkpoint", "load_state_dict_report", "save_checkpoint",
]

logger = logging.getLogger(__name__)

FORMAT = "segkit"
VERSION = 1
LAST_CHECKPOINT = "last_checkpoint"
# How many earlier checkpoint names ``last_checkpoint`` remembers for the corrupt-file fallback.
_HISTORY = 5


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not in a loadable format."""


def _default_meta() -> Dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "config": None, "classes": [],
            "experiment": None, "iteration": -1}


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write through ``write(file)`` to a temp file beside ``path``, fsync, then rename.

    The temp file must live in the same folder: a rename is only atomic within one file
    system, and only an atomic rename guarantees readers see the old or the new file, whole.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # persist the rename too, where the FS allows it
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path: str, model_state: Mapping[str, torch.Tensor],
                    meta: Optional[Mapping[str, Any]] = None, **extra: Any) -> str:
    """Write a checkpoint atomically (temp file in the same folder, fsync, ``os.replace``):
    a crash in the middle of a save never leaves a half-written file under the real name.

    Args:
        path: destination file (``.pth``).
        model_state: the model's ``state_dict()``.
        meta: metadata merged over the defaults (``config``, ``classes``, ``experiment``,
            ``iteration``); ``format``/``version`` are always set by this function.
        **extra: further top-level entries (``optimizer``, ``scheduler``, ``iteration``, ...);
            they must be tensors or plain containers so ``weights_only`` loading works.

    Returns:
        ``path``.
    """
    full_meta = _default_meta()
    full_meta.update(dict(meta or {}))
    full_meta.update(format=FORMAT, version=VERSION)
    if "iteration" in extra:
        full_meta["iteration"] = int(extra["iteration"])
    payload = {"model": OrderedDict(model_state), "meta": full_meta, **extra}
    _atomic_write(path, lambda f: torch.save(payload, f))
    return path


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Args:
        path: checkpoint file.
        map_location: for ``torch.load`` (CPU by default: a GPU-saved file loads anywhere).

    Returns:
        The checkpoint dict. A file holding a bare state dict is returned as
        ``{"model": state_dict, "meta": {...defaults}}`` so callers see one shape.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, holds objects that
            ``weights_only`` refuses, or is not a dict. The message names the file.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError/EOFError/UnpicklingError/... here
        size = os.path.getsize(path)
        reason = str(e).strip().rstrip(".")
        raise CheckpointError(
            f"cannot read checkpoint '{path}' ({size} bytes): {type(e).__name__}: {reason}. "
            "The file is truncated or corrupt (e.g. an interrupted download or copy), or it "
            "holds Python objects that torch.load(weights_only=True) refuses."
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"checkpoint '{path}' holds a {type(obj).__name__}, expected a dict with 'model'"
        )
    if "model" not in obj:
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {"model": obj, "meta": _default_meta()}  # plain state_dict file
        raise CheckpointError(
            f"checkpoint '{path}' has no 'model' entry; top-level keys: {sorted(obj)[:10]}"
        )
    obj.setdefault("meta", _default_meta())
    return obj


class IncompatibleKeys(NamedTuple):
    """Keys that did not load: names, and ``(name, ckpt_shape, model_shape)`` for shapes."""

    missing: List[str]
    unexpected: List[str]
    shape_mismatch: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]


def format_incompatible(report: IncompatibleKeys) -> str:
    """One table (tabulate) of missing / unexpected / shape-mismatched keys."""
    from tabulate import tabulate

    rows = []
    for status, keys in (("missing in checkpoint", report.missing),
                         ("unexpected in checkpoint", report.unexpected)):
        groups: Dict[str, List[str]] = defaultdict(list)  # a.b.{weight,bias}: one row
        for key in keys:
            prefix, _, leaf = key.rpartition(".")
            groups[prefix].append(leaf)
        for module, leaves in sorted(groups.items()):
            rows.append([module or "<root>", status, ", ".join(leaves)])
    for key, ck, md in report.shape_mismatch:
        rows.append([key, "shape mismatch (skipped)",
                     f"checkpoint {tuple(ck)} vs model {tuple(md)}"])
    return tabulate(rows, headers=["parameter / module", "status", "detail"], tablefmt="github")


def load_state_dict_report(model: nn.Module, state: Mapping[str, torch.Tensor],
                           source: str = "checkpoint") -> IncompatibleKeys:
    """Load ``state`` into ``model`` non-strictly and log ONE table of what did not fit.

    Shape-mismatched tensors are dropped before loading (a fine-tuning run with a different
    ``num_classes`` must still get the backbone weights), and listed in the table. A
    ``module.`` prefix from DistributedDataParallel is stripped when every key has it.

    Returns:
        The :class:`IncompatibleKeys` (logged as one warning table when not empty).
    """
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    mismatch = []
    for key in list(state):
        if key in own and tuple(state[key].shape) != tuple(own[key].shape):
            mismatch.append((key, tuple(state[key].shape), tuple(own[key].shape)))
            del state[key]
    result = model.load_state_dict(state, strict=False)
    mismatched = {m[0] for m in mismatch}
    report = IncompatibleKeys(
        missing=[k for k in result.missing_keys if k not in mismatched],
        unexpected=list(result.unexpected_keys), shape_mismatch=mismatch)
    if report.missing or report.unexpected or report.shape_mismatch:
        logger.warning("Weights from %s did not all match the model:\n%s", source,
                       format_incompatible(report))
    else:
        logger.info("Loaded all %d tensors from %s", len(state), source)
    return report


class Checkpointer:
    """Saves and restores a run: model, optimizer, scheduler, iteration and extras.

    ``save_dir/last_checkpoint`` is a text file listing the newest checkpoint first and a few
    earlier ones after it, so :meth:`resume_or_load` can fall back to an older file when the
    newest is corrupt (e.g. the disk filled up while it was copied elsewhere and back).

    Args:
        model: the model whose ``state_dict`` is saved / loaded.
        save_dir: folder for ``<name>.pth`` files and ``last_checkpoint``.
        optimizer: optional optimizer (saved as ``"optimizer"``).
        scheduler: optional LR scheduler (saved as ``"scheduler"``).
        meta: ``config`` (plain dict), ``classes``, ``experiment`` stored in every file.
        **checkpointables: further objects with ``state_dict()`` / ``load_state_dict()``
            saved under their keyword (e.g. ``grad_scaler=``); None values are ignored.
    """

    def __init__(self, model: nn.Module, save_dir: str, optimizer: Any = None,
                 scheduler: Any = None, meta: Optional[Mapping[str, Any]] = None,
                 **checkpointables: Any):
        self.model = model
        self.save_dir = save_dir
        self.meta = dict(meta or {})
        named = {"optimizer": optimizer, "scheduler": scheduler, **checkpointables}
        reserved = {"model", "meta", "iteration"} & set(checkpointables)
        if reserved:
            raise ValueError(f"checkpointable names {sorted(reserved)} are reserved by the "
                             "checkpoint format")
        self.checkpointables = {k: v for k, v in named.items() if v is not None}

    def save(self, name: str, iteration: int, **extra: Any) -> str:
        """Write ``save_dir/<name>.pth`` atomically and record it in ``last_checkpoint``.

        In a distributed job only rank 0 writes (every process holds the same weights); the
        others return the path it writes to.
        """
        path = os.path.join(self.save_dir, f"{name}.pth")
        if not comm.is_main_process():
            return path
        state = {k: obj.state_dict() for k, obj in self.checkpointables.items()}
        save_checkpoint(path, self.model.state_dict(), meta=self.meta, iteration=int(iteration),
                        **state, **extra)
        history = [os.path.basename(path)] + [
            n for n in self._listed() if n != os.path.basename(path)][: _HISTORY - 1]
        _atomic_write(os.path.join(self.save_dir, LAST_CHECKPOINT),
                      lambda f: f.write(("\n".join(history) + "\n").encode()))
        logger.info("Saved checkpoint %s (iteration %d)", path, iteration)
        return path

    def _listed(self) -> List[str]:
        try:
            with open(os.path.join(self.save_dir, LAST_CHECKPOINT)) as f:
                return [line.strip() for line in f if line.strip()]
        except OSError:
            return []

    def candidates(self) -> List[str]:
        """Existing checkpoint paths recorded in ``last_checkpoint``, newest first."""
        paths = [os.path.join(self.save_dir, n) for n in self._listed()]
        return [p for p in paths if os.path.isfile(p)]

    def get_checkpoint_file(self) -> Optional[str]:
        """Path of the newest recorded checkpoint that exists, or None."""
        return next(iter(self.candidates()), None)

    def has_checkpoint(self) -> bool:
        return self.get_checkpoint_file() is not None

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """Load ``path``: model weights (tolerant, one table of mismatches) and other state.

        Args:
            path: checkpoint file.
            checkpointables: which of ``optimizer`` / ``scheduler`` / ... to restore; None
                restores every one present in the file, ``[]`` only the model.

        Returns:
            The rest of the checkpoint (``iteration``, ``meta``, extras).

        Raises:
            CheckpointError: unreadable file (nothing is modified in that case).
        """
        ckpt = load_checkpoint(path)
        load_state_dict_report(self.model, ckpt.pop("model"), source=path)
        wanted = list(self.checkpointables) if checkpointables is None else checkpointables
        for key in wanted:
            if key in ckpt and key in self.checkpointables:
                self.checkpointables[key].load_state_dict(ckpt.pop(key))
        return ckpt

    def resume_or_load(self, path: Optional[str], resume: bool = True) -> Dict[str, Any]:
        """Resume from ``last_checkpoint`` when asked and possible, else load ``path`` weights.

        When resuming, a corrupt newest file is reported and the previous one is tried.

        Returns:
            The checkpoint remainder (``{}`` when nothing was loaded); the next iteration to
            run is ``result.get("iteration", -1) + 1``.
        """
        if resume and self.has_checkpoint():
            errors = []
            for candidate in self.candidates():
                try:
                    result = self.load(candidate)
                except CheckpointError as e:
                    logger.warning("Checkpoint %s is unusable, falling back to the previous "
                                   "one: %s", candidate, e)
                    errors.append(str(e))
                    continue
                logger.info("Resumed from %s (iteration %s)", candidate, result.get("iteration"))
                return result
            raise CheckpointError("no usable checkpoint in '%s':\n%s"
                                  % (self.save_dir, "\n".join(errors)))
        if path:
            result = self.load(path, checkpointables=[])
            result.pop("iteration", None)  # initial weights do not set where training starts
            return result
        return {}
