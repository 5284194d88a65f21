"""segkit: FAIR's segmentation lineage in one PyTorch code base.

``pip install .`` installs the library, its Hydra configs (``configs/`` ships as
``segkit.configs``) and the console scripts ``segkit-train``, ``segkit-eval`` and ``segkit-demo``.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


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
        "segkit.configs",
    ],
    # configs/ lives at the top level (DESIGN.md) but ships inside the package so that
    # `pip install .` (not only -e) can compose them.
    package_dir={"segkit.configs": "configs"},
    package_data={"segkit.configs": ["*.yaml", "**/*.yaml"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "numpy",
        "pillow>=9.4",
        "pycocotools>=2.0.7",
        "fvcore>=0.1.5",
        "iopath>=0.1.9",
        "hydra-core>=1.3",
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
        ],
    },
)
