"""The compiled backend: present in CI, reported by the env report, and a visible fallback.

``test_compiled_ops_are_built`` is the check that makes CI fail when ``segkit._C`` did not
build or does not load: every other test would still pass on torchvision's ops, only slower.
"""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import segkit
from segkit.layers import _compiled, get_backend
from segkit.utils.env import collect_env_info


def test_compiled_ops_are_built():
    assert _compiled.available(), (
        f"segkit._C is not available: {_compiled.load_error()}. Build it with "
        f"`pip install --no-build-isolation -e .`")
    info = _compiled.build_info()
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert "cpu" in info["devices"]
    assert set(get_backend().values()) == {"segkit._C"}
    assert {"roi_align", "roi_pool", "multilevel_roi_align", "multicontext_roi_align", "nms",
            "batched_nms"} <= set(get_backend())


def test_env_report_names_the_build_and_backend():
    report = collect_env_info()
    assert report["segkit._C"].startswith(f"built for torch {torch.__version__}")
    assert "devices cpu" in report["segkit._C"]
    assert "roi_align=segkit._C" in report["ops backend"]
    assert segkit.collect_env()["segkit._C"] == report["segkit._C"]
    out = subprocess.run([sys.executable, "-m", "segkit.utils.env"], capture_output=True,
                         text=True, check=True).stdout
    assert "segkit._C" in out and "ops backend" in out


def test_missing_build_falls_back_to_torchvision_with_one_warning():
    # A fresh interpreter in which `import segkit._C` fails, as on a machine without the build.
    code = textwrap.dedent("""
        import importlib.abc, sys, warnings
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "segkit._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, segkit.layers
            from segkit.layers import get_backend, roi_align, nms
            import segkit.modeling  # more importers of segkit.layers: still one warning
            out = roi_align(torch.ones(1, 1, 4, 4), torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), 2)
            keep = nms(torch.tensor([[0, 0, 2, 2.0]]), torch.tensor([1.0]), 0.5)
        msgs = [str(w.message) for w in caught if "compiled ops unavailable" in str(w.message)]
        print(len(msgs), msgs[0] if msgs else "")
        print(sorted(set(get_backend().values())), float(out.sum()), keep.tolist())
    """)
    env = dict(os.environ, PYTHONWARNINGS="default")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=env).stdout.strip().splitlines()
    assert lines[0].startswith("1 ") and "blocked for the test" in lines[0]
    assert "pip install --no-build-isolation" in lines[0]
    assert lines[1] == "['torch.grid_sample', 'torchvision'] 4.0 [0]"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no CUDA toolkit (nvcc) installed")
def test_cuda_kernels_compile_with_force_cuda(tmp_path):
    """On a machine without a GPU the CUDA kernels are still compiled and linked, so they
    cannot rot unseen: ``FORCE_CUDA=1 setup.py build_ext`` into a scratch directory."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, FORCE_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0")
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-temp", str(tmp_path / "tmp"),
         "--build-lib", str(tmp_path / "lib")], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = list((tmp_path / "lib" / "segkit").glob("_C*.so"))
    assert len(built) == 1
    # the CUDA objects are in the library (it cannot be loaded here: one segkit._C per process)
    symbols = subprocess.run(["nm", "-C", "-D", "--defined-only", str(built[0])],
                             capture_output=True, text=True).stdout
    assert "segkit::cuda_build_version" in symbols
