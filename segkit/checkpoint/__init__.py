"""Checkpoint save/load (``weights_only``-safe files) and converters from other code bases.

:mod:`segkit.checkpoint.io` defines the segkit checkpoint format and the run
:class:`Checkpointer`; the converters (torchvision, detectron2) write the same format.
"""
from .io import (
    CheckpointError,
    Checkpointer,
    IncompatibleKeys,
    format_incompatible,
    load_checkpoint,
    load_state_dict_report,
    save_checkpoint,
)
from .detectron2 import (
    UnsafePickleError,
    convert_detectron2,
    read_detectron2_checkpoint,
    read_pickle_weights,
)

__all__ = [
    "CheckpointError", "Checkpointer", "IncompatibleKeys", "format_incompatible",
    "load_checkpoint", "load_state_dict_report", "save_checkpoint",
    "UnsafePickleError", "convert_detectron2", "read_detectron2_checkpoint", "read_pickle_weights",
]
