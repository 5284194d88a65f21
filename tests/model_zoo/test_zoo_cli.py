"""segkit-zoo list / download / verify, exit codes and one-line errors (local server only)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segkit.model_zoo.cli import main
from segkit.model_zoo.download import cache_dir
from segkit.model_zoo.sources import CONVERTER_VERSION

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def catalog(make_catalog, torchvision_mask_rcnn, detectron2_mask_rcnn, monkeypatch):
    tv, d2 = torchvision_mask_rcnn, detectron2_mask_rcnn
    path = make_catalog({
        "tv": {"published": tv, "sha256": tv.sha256[:8], "approx_size_mib": 47.5},
        "d2": {"published": d2, "source": "detectron2", "md5": d2.md5[:6],
               "size_bytes": len(d2.body), "experiment": "mask_rcnn_r50_fpn_3x_detectron2"}})
    monkeypatch.setenv("SEGKIT_ZOO_CATALOG", str(path))
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(catalog, capsys):
    code, out, _ = _run(capsys, "list")
    assert code == 0
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()[2:]}
    assert set(rows) == {"tv", "d2"}
    assert "box AP 1.0, mask AP 1.0" in rows["tv"] and "~48 MiB" in rows["tv"]
    assert "md5 prefix + size + sha256 pin" in rows["d2"] and "| no " in rows["d2"]


def test_download_then_verify_detects_corruption(server, catalog, capsys,
                                                 torchvision_mask_rcnn, detectron2_mask_rcnn):
    code, out, _ = _run(capsys, "download", "tv", "d2")
    assert code == 0
    paths = [Path(p) for p in out.split()]
    assert paths == [cache_dir() / torchvision_mask_rcnn.filename,
                     cache_dir() / detectron2_mask_rcnn.filename]
    assert paths[1].read_bytes() == detectron2_mask_rcnn.body
    code, out, _ = _run(capsys, "download", "--converted", "d2")
    assert code == 0 and Path(out.strip()).name.startswith(f"d2.segkit-v{CONVERTER_VERSION}-")
    code, out, _ = _run(capsys, "list")
    assert "| converted " in out and "| downloaded " in out

    code, out, _ = _run(capsys, "verify")
    assert code == 0 and out.count("| ok ") == 2
    data = bytearray(paths[0].read_bytes())
    data[1000] ^= 0xFF  # one flipped byte
    paths[0].write_bytes(bytes(data))
    code, out, err = _run(capsys, "verify", "tv", "d2")
    assert code == 1
    tv_row = next(line for line in out.splitlines() if line.startswith("| tv "))
    assert "corrupt" in tv_row and "sha256 mismatch" in tv_row
    assert "corrupt: tv" in err
    # download replaces a file that fails the publisher's hash
    code, _, _ = _run(capsys, "download", "tv")
    assert code == 0 and paths[0].read_bytes() == torchvision_mask_rcnn.body
    assert server.hits[f"/zoo/{torchvision_mask_rcnn.filename}"] == 2


def test_verify_missing_is_not_an_error(catalog, capsys):
    code, out, _ = _run(capsys, "verify")
    assert code == 0 and out.count("| missing ") == 2


def test_errors_are_one_line_with_exit_2(server, catalog, capsys, monkeypatch):
    code, out, err = _run(capsys, "download", "tv", "tvx")
    assert code == 2 and out == "" and server.hits == {}  # names checked before downloading
    assert err.count("\n") == 1 and "unknown model 'tvx'" in err and "did you mean 'tv'" in err
    monkeypatch.setenv("SEGKIT_OFFLINE", "1")
    code, out, err = _run(capsys, "download", "tv")
    assert code == 2 and err.startswith("segkit-zoo: error: SEGKIT_OFFLINE is set")
    assert err.count("\n") == 1
    code, _, err = _run(capsys, "--catalog", str(catalog) + ".missing", "list")
    assert code == 2 and "does not exist" in err


def test_python_m_entry_point(catalog):
    env = {**os.environ, "SEGKIT_ZOO_CATALOG": str(catalog)}
    proc = subprocess.run([sys.executable, "-m", "segkit.model_zoo", "list"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| tv " in proc.stdout and "| d2 " in proc.stdout


def test_segkit_eval_on_a_converted_zoo_checkpoint(make_catalog, capsys, tmp_path, _env,
                                                    monkeypatch):
    """README: `segkit-eval --checkpoint "$(segkit-zoo download --converted NAME)"` evaluates
    with the config stored in the converted file (here the embedded dataset, 2 images)."""
    import json

    import zoo_samples

    from segkit.engine.cli import eval_main

    published, classes = zoo_samples.detectron2_embedded_mask_rcnn()
    path = make_catalog({"shapes": {
        "published": published, "source": "detectron2", "md5": published.md5[:6],
        "experiment": "mask_rcnn_r18_fpn_embedded", "overrides": [], "classes": classes}})
    code, out, _ = _run(capsys, "--catalog", str(path), "download", "--converted", "shapes")
    assert code == 0
    checkpoint = out.strip()
    if _env:
        monkeypatch.setenv("SEGKIT_CACHE", _env)  # the embedded dataset, generated once
    assert eval_main(["--checkpoint", checkpoint, "evaluation.max_images=2",
                      "dataloader.num_workers=0", f"train.output_dir={tmp_path / 'eval'}"]) == 0
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert set(results["results"]) == {"bbox", "segm"}
