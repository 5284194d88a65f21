"""segkit: object detection and instance segmentation, from DeepMask to Mask^X R-CNN.

Importing ``segkit`` is light; sub-packages (``segkit.modeling``, ``segkit.data``, ...) register
their components when imported, and ``segkit.config.compose`` / ``build_model`` import what
they need.
"""
__version__ = "0.1.0"


def collect_env() -> dict:
    """Which implementation runs each op of ``segkit.layers`` (``{"ops backend": ...}``).

    The full environment report (versions, devices, this backend table) is
    :func:`segkit.utils.env.collect_env_info`, logged at the start of every run.
    """
    from segkit.layers.ops import get_backend

    backends = get_backend()
    return {"ops backend": ", ".join(f"{op}={name}" for op, name in sorted(backends.items()))}
