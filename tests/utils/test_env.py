"""Environment report: versions as strings, and a failing backend report never stops a run."""
import torch

import segkit
from segkit.utils.env import collect_env_info


def test_report_has_versions_as_strings():
    info = collect_env_info()
    assert info["torch"] == torch.__version__ and info["segkit"] == segkit.__version__
    assert {"python", "torchvision", "cuda available"} <= set(info)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())


def test_backend_report_is_merged_and_its_failure_recorded(monkeypatch):
    monkeypatch.setattr(segkit, "collect_env", lambda: {"ops backend": "cpu"}, raising=False)
    assert collect_env_info()["ops backend"] == "cpu"

    def broken():
        raise RuntimeError("no compiled ops")

    monkeypatch.setattr(segkit, "collect_env", broken, raising=False)
    assert "no compiled ops" in collect_env_info()["collect_env error"]
