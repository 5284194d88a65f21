"""`pip install` (not only -e) of segkit-deepmask ships the configs and the entry point."""
import configparser
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "segkit_deepmask" / "configs"


def _pip(*args):
    subprocess.run([sys.executable, "-m", "pip", *args, "--no-deps", "-q"], check=True,
                   capture_output=True, text=True)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", str(ROOT), "--no-build-isolation", "-w", str(out))
    (path,) = out.glob("segkit_deepmask-*.whl")
    return path


@pytest.mark.slow
def test_wheel_holds_configs_and_entry_point(wheel):
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    yamls = {f"segkit_deepmask/configs/{p.relative_to(CONFIGS)}" for p in CONFIGS.rglob("*.yaml")}
    assert yamls and yamls <= names
    assert "segkit_deepmask/modeling/meta_arch.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    parser = configparser.ConfigParser()
    parser.read_string(archive.read(entry_points).decode())
    assert dict(parser["segkit.plugins"]) == {"deepmask": "segkit_deepmask"}


@pytest.mark.slow
def test_installed_wheel_composes_and_resolves_names(wheel, tmp_path):
    """Away from the sources, the configs compose and ``deepmask.*`` names resolve through
    the entry point without importing the package by hand."""
    site = tmp_path / "site"
    _pip("install", "--target", str(site), str(wheel))
    script = tmp_path / "probe.py"
    script.write_text(textwrap.dedent("""
        import sys
        from importlib.resources import files

        from segkit.config import compose
        from segkit.registry import META_ARCHS

        cfg = compose(["~experiment", "model=sharpmask"])
        META_ARCHS.get(cfg.model.name)  # loads the plugin through its entry point
        print(sys.modules["segkit_deepmask"].__file__, files("segkit_deepmask.configs"),
              cfg.model.refinement.k)
    """))
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    module, configs, k = run.stdout.split()
    assert Path(module).is_relative_to(site) and Path(configs).is_relative_to(site)
    assert k == "32"
