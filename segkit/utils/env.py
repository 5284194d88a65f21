"""Environment report: the versions and devices that matter for reproducing a result.

``default_setup`` logs it at the start of every run (``log.txt``); ``python -m segkit.utils.env``
prints it, including whether the compiled ops ``segkit._C`` are built and for which devices.
"""
from __future__ import annotations

import platform
import sys
from typing import Dict

import torch

__all__ = ["collect_env_info", "main"]


def collect_env_info() -> Dict[str, str]:
    """Versions and devices that matter for reproducing a result."""
    import torchvision

    import segkit

    info = {
        "python": sys.version.split()[0], "platform": platform.platform(),
        "segkit": segkit.__version__, "torch": torch.__version__,
        "torchvision": torchvision.__version__, "cpu threads": str(torch.get_num_threads()),
        "cuda available": str(torch.cuda.is_available()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = str(torch.version.cuda)
    collect = getattr(segkit, "collect_env", None)  # compiled-ops backend report, when present
    if callable(collect):
        try:
            extra = collect()
            if isinstance(extra, dict):
                info.update({str(k): str(v) for k, v in extra.items()})
        except Exception as e:  # an env report must never stop a run
            info["collect_env error"] = repr(e)
    return info


def main() -> None:
    """``python -m segkit.utils.env``: print the report, one ``key: value`` per line."""
    info = collect_env_info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
