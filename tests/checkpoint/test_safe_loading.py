"""Safe loading: pickles that would run code are refused before anything runs."""
import os
import pickle
import subprocess
from collections import OrderedDict

import numpy as np
import pytest
import torch

from segkit.checkpoint.convert import main
from segkit.checkpoint.detectron2 import (UnsafePickleError, read_detectron2_checkpoint,
                                          read_pickle_weights)
from segkit.checkpoint.io import CheckpointError, load_checkpoint


class _Payload:
    """Unpickling this calls ``func(*args)``: the classic code-execution pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _evil_pkl(path, marker, func=os.system, protocol=4):
    arg = f"touch {marker}" if func is os.system else None
    if func is subprocess.Popen:
        payload = _Payload(subprocess.Popen, ["touch", str(marker)])
    elif func is eval:
        payload = _Payload(eval, f"open({str(marker)!r}, 'w').close()")
    else:
        payload = _Payload(func, arg)
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.zeros(3, np.float32)}, "x": payload}, f, protocol=protocol)
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_os_system_pickle_refused_and_nothing_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    src = _evil_pkl(str(tmp_path / "evil.pkl"), marker, protocol=protocol)
    with pytest.raises(UnsafePickleError) as e:
        read_pickle_weights(src)
    msg = str(e.value)
    assert ("posix.system" in msg or "os.system" in msg) and src in msg
    assert isinstance(e.value, pickle.UnpicklingError)
    assert not marker.exists()


@pytest.mark.parametrize("func,name", [(eval, "builtins.eval"),
                                       (subprocess.Popen, "subprocess.Popen")])
def test_other_code_globals_refused(tmp_path, func, name):
    marker = tmp_path / "pwned"
    src = _evil_pkl(str(tmp_path / "evil.pkl"), marker, func=func)
    with pytest.raises(UnsafePickleError, match=name):
        read_detectron2_checkpoint(src)
    assert not marker.exists()


def test_cli_refuses_evil_pkl(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src = _evil_pkl(str(tmp_path / "evil.pkl"), marker)
    dst = tmp_path / "out.pth"
    assert main(["--from", "detectron2", src, str(dst)]) == 2
    err = capsys.readouterr().err
    assert "system" in err and src in err
    assert not marker.exists() and not dst.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_arrays_in_nested_dicts_load(tmp_path, protocol):
    rng = np.random.default_rng(0)
    obj = {"model": OrderedDict(a=rng.standard_normal((2, 3)).astype(np.float32),
                                b=np.arange(5, dtype=np.int64)),
           "nested": {"deep": [np.ones((1, 2), np.float64), (1, "x", None)], "s": np.float32(2.5)},
           "__author__": "Detectron2 Model Zoo"}
    src = tmp_path / "ok.pkl"
    src.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = read_pickle_weights(str(src))
    assert out["__author__"] == "Detectron2 Model Zoo"
    assert np.array_equal(out["model"]["a"], obj["model"]["a"])
    assert out["model"]["b"].dtype == np.int64 and list(out["model"]["b"]) == list(range(5))
    assert np.array_equal(out["nested"]["deep"][0], np.ones((1, 2)))
    assert out["nested"]["deep"][1] == (1, "x", None) and out["nested"]["s"] == 2.5


def test_load_checkpoint_refuses_code_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.zeros(2)}, "x": _Payload(os.system, f"touch {marker}")},
               path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert path in str(e.value) and "weights_only" in str(e.value)
    assert not marker.exists()
    # the detectron2 reader uses the same weights_only path for .pth files
    with pytest.raises(ValueError, match="weights_only"):
        read_detectron2_checkpoint(path)
    assert not marker.exists()
