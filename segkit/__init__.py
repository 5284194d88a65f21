"""segkit: object detection and instance segmentation, from DeepMask to Mask^X R-CNN.

Importing ``segkit`` is light; sub-packages (``segkit.modeling``, ``segkit.data``, ...) register
their components when imported, and ``segkit.config.compose`` / ``build_model`` import what
they need.
"""
__version__ = "0.1.0"


def collect_env() -> dict:
    """The compiled-ops part of the environment report.

    ``{"segkit._C": "built for torch X, devices cpu[, cuda]" | "not available (why)",
    "ops backend": "roi_align=segkit._C, nms=segkit._C, ..."}``. The full report (versions,
    devices, this) is :func:`segkit.utils.env.collect_env_info`, logged at the start of every
    run and printed by ``python -m segkit.utils.env``.
    """
    from segkit.layers import _compiled
    from segkit.layers.ops import get_backend

    if _compiled.available():
        info = _compiled.build_info()
        parallel = str(info.get("parallel", "")).strip().splitlines()
        c_status = (f"built for torch {info.get('torch_version')}, devices "
                    f"{', '.join(info.get('devices', ()))}"
                    + (f", {parallel[-1].strip()}" if parallel else ""))
    else:
        c_status = f"not available ({_compiled.load_error()})"
    backends = get_backend()
    return {"segkit._C": c_status,
            "ops backend": ", ".join(f"{op}={name}" for op, name in sorted(backends.items()))}
