"""segkit: FAIR's segmentation lineage in one PyTorch code base.

``pip install --no-build-isolation .`` installs the library, its Hydra configs (``configs/``
ships as ``segkit.configs``), the model-zoo catalog (``model_zoo/`` ships as
``segkit.model_zoo_catalog``), the console scripts ``segkit-train``, ``segkit-eval``,
``segkit-demo`` and ``segkit-zoo``, and the compiled ops ``segkit._C`` built from ``csrc/``.

The C++ ops are compiled against the torch already installed in the environment, because an
extension only loads under the torch it was built with; that is why the build needs torch
first and ``--no-build-isolation`` (an isolated build environment would fetch some other
torch). Environment variables:

* ``FORCE_CUDA=1``: build the CUDA kernels even where no GPU is visible (a CUDA toolkit must be
  installed). Without it they are built when ``torch.cuda.is_available()`` and a toolkit exists.
* ``SEGKIT_CPU_ARCH``: ``-march`` value of the CPU kernels, default ``native`` (the building
  machine's vector units); set e.g. ``x86-64-v3`` to build for other machines.
* ``MAX_JOBS``: parallel compile jobs (ninja is used when installed).
* ``SEGKIT_SKIP_CSRC=1``: do not build ``segkit._C``; ``segkit.layers`` then falls back to
  torchvision's ops with a warning.
"""
import glob
import os
import shutil
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _find_cuda_home() -> None:
    """Point ``CUDA_HOME`` at a complete toolkit when torch's guess would not be one.

    Without ``CUDA_HOME``, torch takes the parent of the ``nvcc`` on ``PATH``; when that
    ``nvcc`` is a wrapper script (``/usr/local/bin/nvcc`` exec-ing the real one), the guess
    has no CUDA headers or libraries and the link fails on ``-lcudart``.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guess = Path(nvcc).resolve().parent.parent if nvcc else None
    if guess is not None and (guess / "include" / "cuda_runtime_api.h").exists():
        return
    for candidate in [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True):
        if (candidate / "include" / "cuda_runtime_api.h").exists():
            os.environ["CUDA_HOME"] = str(candidate)
            return


def _ext_modules():
    """``segkit._C`` from ``csrc/``: CPU kernels always, CUDA kernels when asked or possible."""
    if os.environ.get("SEGKIT_SKIP_CSRC", "0") == "1":
        return [], {}
    _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise RuntimeError(
            "segkit compiles its C++ ops against the installed torch. Install torch first, then "
            "segkit without build isolation:\n"
            "    pip install 'torch>=2.14' 'torchvision>=0.29' setuptools wheel ninja\n"
            "    pip install --no-build-isolation -e .") from e
    os.chdir(ROOT)  # relative source paths keep the ninja file and error messages short
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    arch = os.environ.get("SEGKIT_CPU_ARCH", "native")
    cxx = ["-O3", "-fopenmp", f"-DSEGKIT_TORCH_VERSION=\"{torch.__version__}\""]
    if arch:
        cxx.append(f"-march={arch}")
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None)
    kwargs = dict(name="segkit._C", sources=sources, include_dirs=[str(ROOT / "csrc")],
                  extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["cxx"].append("-DWITH_CUDA")
        # (cpp_extension adds --expt-relaxed-constexpr and the no-half-operator macros itself)
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-DWITH_CUDA"]
        ext = cpp_extension.CUDAExtension(**kwargs)
    else:
        ext = cpp_extension.CppExtension(**kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=cpp_extension.is_ninja_available())
    return [ext], {"build_ext": build_ext}


EXT_MODULES, CMDCLASS = _ext_modules()


def _version() -> str:
    for line in (ROOT / "segkit" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=")[1].strip().strip("\"'")
    raise RuntimeError("segkit/__init__.py has no __version__")


setup(
    name="segkit",
    version=_version(),
    description="Object detection and instance segmentation: DeepMask to Mask^X R-CNN",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    packages=find_packages(include=["segkit", "segkit.*"]) + [
        "segkit.configs", "segkit.model_zoo_catalog",
    ],
    # configs/ lives at the top level (DESIGN.md) but ships inside the package so that
    # `pip install .` (not only -e) can compose them.
    package_dir={"segkit.configs": "configs", "segkit.model_zoo_catalog": "model_zoo"},
    package_data={"segkit.configs": ["*.yaml", "**/*.yaml"],
                  "segkit.model_zoo_catalog": ["catalog.yaml", "README.md"]},
    include_package_data=True,
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    # torch/torchvision must already be installed (see the module docstring); listing them
    # keeps pip from replacing them with versions the extension was not built against.
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "numpy",
        "pillow>=9.4",
        "pycocotools>=2.0.7",
        "fvcore>=0.1.5",
        "iopath>=0.1.9",
        "hydra-core>=1.3",
        # the hydra/launcher=slurm and =local presets (configs/hydra/launcher)
        "hydra-submitit-launcher>=1.2",
        "omegaconf>=2.3",
        "tqdm",
        "tabulate",
        "tensorboard",
    ],
    extras_require={"test": ["pytest>=7", "pytest-xdist"]},
    entry_points={
        "console_scripts": [
            "segkit-train=segkit.engine.cli:train_main",
            "segkit-eval=segkit.engine.cli:eval_main",
            "segkit-demo=segkit.engine.demo:main",
            "segkit-zoo=segkit.model_zoo.cli:main",
        ],
    },
)
