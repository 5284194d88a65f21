"""`pip install .` (not only -e) must ship the configs, the console scripts and segkit._C."""
import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_configs_and_entry_points(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), "-q"],
        check=True, capture_output=True, text=True)
    (wheel,) = tmp_path.glob("segkit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n for n in names if n.startswith("segkit/configs/")}
    expected = {"segkit/configs/" + str(p.relative_to(ROOT / "configs"))
                for p in (ROOT / "configs").rglob("*.yaml")}
    assert expected and expected <= shipped
    assert "segkit/registry.py" in names
    assert any(n.startswith("segkit/_C") and n.endswith(".so") for n in names)
    (ep_name,) = [n for n in names if n.endswith("entry_points.txt")]
    eps = configparser.ConfigParser()
    eps.read_string(zipfile.ZipFile(wheel).read(ep_name).decode())
    assert set(eps["console_scripts"]) == {"segkit-train", "segkit-eval", "segkit-demo",
                                           "segkit-zoo"}
    # the zoo catalog (top-level model_zoo/) ships inside the package
    assert "segkit/model_zoo_catalog/catalog.yaml" in names

    # installed from the wheel (not editable), away from the sources, the configs compose
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, text=True)
    probe = ("import segkit; from segkit.config import compose; "
             "from segkit.layers import _compiled, get_backend; "
             "cfg = compose(['experiment=mask_rcnn_r50_fpn_1x_coco']); "
             "print(segkit.__file__); print(cfg.model.backbone.bottom_up.depth); "
             "print(_compiled._C.__file__); print(get_backend()['roi_align']); "
             "from segkit.model_zoo import list_models; "
             "print(len(list_models()) >= 8)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-2000:]
    where, depth, ext, backend, zoo = out.stdout.split()
    assert zoo == "True"  # the installed catalog is found
    assert Path(where).is_relative_to(target) and depth == "50"
    # the wheel's own compiled ops load, not the source tree's
    assert Path(ext).is_relative_to(target) and backend == "segkit._C"


def test_ci_runs_the_readme_test_command():
    """.ci/run reads its command from the README, so the two cannot drift apart."""
    out = subprocess.run(
        ["awk", '/<!-- test command -->/{f=1; next} f && /^```/{if (inblock) exit; inblock=1; '
         'next} f && inblock {print; exit}', str(ROOT / "README.md")],
        check=True, capture_output=True, text=True).stdout.strip()
    assert "pytest" in out and "pip install" in out
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
