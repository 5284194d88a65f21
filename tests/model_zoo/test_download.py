"""segkit.model_zoo.download against a local HTTP server on 127.0.0.1 (conftest.py)."""
import hashlib
import io
import json
import os
import subprocess
import sys
import time

import iopath.common.download as iopath_download
import pytest

from segkit.model_zoo import DownloadError, cache_dir, download, file_sha256

BODY = os.urandom(300_000) + b"segkit"
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture(autouse=True)
def _body(server):
    server.default_body = BODY  # the shared server (conftest.py) serves BODY unless told


def _cached_files():
    d = cache_dir()
    return sorted(p.name for p in d.iterdir() if not p.name.endswith(".lock")) if d.exists() else []


def test_cache_dir(tmp_path):
    assert cache_dir() == tmp_path / "cache" / "model_zoo"


def test_download_verifies_and_caches(server):
    server.routes["/m/w.bin"] = ("ok", None)
    path = download(server.base + "/m/w.bin", SHA, progress=False)
    assert path == cache_dir() / "w.bin"
    assert path.read_bytes() == BODY and file_sha256(path) == SHA
    assert server.hits["/m/w.bin"] == 1
    # cache hit: no request
    assert download(server.base + "/m/w.bin", SHA, progress=False) == path
    assert download(server.base + "/m/w.bin", progress=False) == path
    assert server.hits["/m/w.bin"] == 1
    assert _cached_files() == ["w.bin"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_iopath_is_the_transport(server, monkeypatch):
    """The bytes come through iopath's download(), into a private folder inside the cache that
    is gone afterwards; its tqdm bar is asked for only when stderr is a terminal."""
    calls = []
    real = iopath_download.download

    def recording(url, dir, *, filename=None, progress=True):
        calls.append({"url": url, "dir": dir, "filename": filename, "progress": progress})
        return real(url, dir, filename=filename, progress=progress)

    monkeypatch.setattr(iopath_download, "download", recording)
    for name in ("a.bin", "b.bin", "c.bin"):
        server.routes[f"/{name}"] = ("ok", None)
    # progress asked for, but stderr is not a terminal (as in CI): no bar
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    path = download(server.base + "/a.bin", SHA)
    assert path.read_bytes() == BODY and sys.stderr.getvalue() == ""
    # a terminal: iopath draws its bar, unless progress=False
    monkeypatch.setattr(sys, "stderr", _Terminal())
    download(server.base + "/b.bin", SHA)
    assert "b.bin" in sys.stderr.getvalue()
    download(server.base + "/c.bin", SHA, progress=False)
    assert [(c["url"], c["filename"], c["progress"]) for c in calls] == [
        (server.base + "/a.bin", "a.bin", False), (server.base + "/b.bin", "b.bin", True),
        (server.base + "/c.bin", "c.bin", False)]
    for c in calls:  # a fresh folder inside the cache, not the cache folder itself
        assert os.path.dirname(c["dir"]) == str(cache_dir()) and not os.path.exists(c["dir"])
    assert _cached_files() == ["a.bin", "b.bin", "c.bin"]
    assert download(server.base + "/a.bin", SHA) == path and len(calls) == 3  # cache hit


def test_prefix_hash_and_filename(server):
    server.routes["/w.bin"] = ("ok", None)
    path = download(server.base + "/w.bin", SHA[:8].upper(), filename=f"w-{SHA[:8]}.pth",
                    progress=False)
    assert path.name == f"w-{SHA[:8]}.pth" and path.read_bytes() == BODY
    assert download(server.base + "/w.bin", SHA[:8], filename=path.name) == path
    assert server.hits["/w.bin"] == 1


def test_bad_sha_argument():
    with pytest.raises(ValueError, match="hex"):
        download("http://127.0.0.1:9/w.bin", "abc")
    with pytest.raises(ValueError, match="hex"):
        download("http://127.0.0.1:9/w.bin", "zz" * 8)


def test_stale_cached_file_is_replaced(server):
    server.routes["/w.bin"] = ("ok", None)
    cache_dir().mkdir(parents=True)
    (cache_dir() / "w.bin").write_bytes(b"corrupt")
    path = download(server.base + "/w.bin", SHA, progress=False)
    assert path.read_bytes() == BODY and server.hits["/w.bin"] == 1


def test_truncated_download_retried_then_fails(server):
    server.routes["/t.bin"] = ("truncate", None)
    with pytest.raises(DownloadError, match=r"after 3 attempt.*(truncated|connection dropped)"):
        download(server.base + "/t.bin", SHA, retries=2, backoff=0.01, progress=False)
    assert server.hits["/t.bin"] == 3
    assert _cached_files() == []  # no partial file, no leftover temp


def test_hash_mismatch(server):
    server.routes["/h.bin"] = ("ok", None)
    wrong = "0" * 64
    with pytest.raises(DownloadError) as info:
        download(server.base + "/h.bin", wrong, retries=3, backoff=0.01, progress=False)
    assert wrong in str(info.value) and SHA in str(info.value)
    assert server.hits["/h.bin"] == 2  # retried once, not `retries` times
    assert _cached_files() == []


def test_server_error_then_ok(server):
    server.routes["/f.bin"] = ("fail_then_ok", 1)
    path = download(server.base + "/f.bin", SHA, backoff=0.01, progress=False)
    assert path.read_bytes() == BODY
    assert server.hits["/f.bin"] == 2


def test_server_error_exhausts_retries(server):
    server.routes["/f.bin"] = ("fail_then_ok", 100)
    with pytest.raises(DownloadError, match="HTTP 500"):
        download(server.base + "/f.bin", SHA, retries=1, backoff=0.01, progress=False)
    assert server.hits["/f.bin"] == 2
    assert _cached_files() == []


def test_404_not_retried(server):
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download(server.base + "/missing.bin", SHA, retries=3, backoff=1, progress=False)
    assert "/missing.bin" in str(info.value)
    assert server.hits["/missing.bin"] == 1
    assert _cached_files() == []


def test_connection_refused_retried(server):
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="after 2 attempt"):
        download(f"http://127.0.0.1:{port}/w.bin", SHA, retries=1, backoff=0.01, timeout=2,
                 progress=False)
    assert time.monotonic() - t0 < 5


_CHILD = """
import json, sys, time
from segkit.model_zoo import cache_dir, download
url, sha = sys.argv[1], sys.argv[2]
existed = (cache_dir() / "c.bin").exists()
t0 = time.monotonic()
path = download(url, sha, backoff=0.01, progress=False)
print(json.dumps({"path": str(path), "existed_before": existed,
                  "seconds": time.monotonic() - t0}))
"""


def test_concurrent_processes_download_once(server):
    server.routes["/c.bin"] = ("slow", 1.5)
    env = {**os.environ, "SEGKIT_CACHE": os.environ["SEGKIT_CACHE"]}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, server.base + "/c.bin", SHA],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert server.hits["/c.bin"] == 1
    assert {r["path"] for r in results} == {str(cache_dir() / "c.bin")}
    # both started before the file existed, so the lock (not a plain cache hit) saved a download
    assert not any(r["existed_before"] for r in results)
    assert (cache_dir() / "c.bin").read_bytes() == BODY


def test_offline_with_cache(server, monkeypatch):
    server.routes["/o.bin"] = ("ok", None)
    url = server.base + "/o.bin"
    path = download(url, SHA, progress=False)
    server.shutdown()
    server.server_close()
    monkeypatch.setenv("SEGKIT_OFFLINE", "1")
    assert download(url, SHA, progress=False) == path
    assert download("http://nowhere.invalid/o.bin", SHA[:10]) == path


def test_offline_without_cache(server, monkeypatch):
    server.routes["/o.bin"] = ("ok", None)
    monkeypatch.setenv("SEGKIT_OFFLINE", "1")
    url = server.base + "/o.bin"
    with pytest.raises(DownloadError) as info:
        download(url, SHA, progress=False)
    msg = str(info.value)
    assert "SEGKIT_OFFLINE" in msg and url in msg and str(cache_dir() / "o.bin") in msg
    assert server.hits == {}


def test_offline_with_bad_cached_file(monkeypatch):
    cache_dir().mkdir(parents=True)
    (cache_dir() / "o.bin").write_bytes(b"corrupt")
    monkeypatch.setenv("SEGKIT_OFFLINE", "1")
    with pytest.raises(DownloadError, match="SEGKIT_OFFLINE"):
        download("http://nowhere.invalid/o.bin", SHA)


def test_mirror(server, monkeypatch):
    server.routes["/mirror/models/r50.bin"] = ("ok", None)
    monkeypatch.setenv("SEGKIT_ZOO_MIRROR", server.base + "/mirror/")
    path = download("https://zoo.example.invalid/models/r50.bin", SHA, progress=False)
    assert path == cache_dir() / "r50.bin" and path.read_bytes() == BODY
    assert server.hits == {"/mirror/models/r50.bin": 1}


def test_md5_prefix_and_size(server):
    """detectron2-style files: an md5 prefix (6+ hex) and an exact size, checked with sha256."""
    server.routes["/d2/model_final.pkl"] = ("ok", None)
    md5 = hashlib.md5(BODY).hexdigest()
    url = server.base + "/d2/model_final.pkl"
    path = download(url, md5=md5[:6], size=len(BODY), progress=False)
    assert path.read_bytes() == BODY
    assert download(url, SHA[:8], md5=md5.upper(), size=len(BODY)) == path  # cache hit
    assert server.hits["/d2/model_final.pkl"] == 1
    with pytest.raises(ValueError, match="md5 must be 6 to 32 hex"):
        download(url, md5="abc")
    with pytest.raises(ValueError, match="size must be a byte count"):
        download(url, size=-1)


def test_md5_or_size_mismatch(server):
    server.routes["/m.pkl"] = ("ok", None)
    url = server.base + "/m.pkl"
    with pytest.raises(DownloadError, match=r"md5 mismatch: expected 000000\.\.\. \(prefix\)"):
        download(url, md5="000000", backoff=0.01, progress=False)
    with pytest.raises(DownloadError, match=f"size {len(BODY)} bytes, expected 12"):
        download(url, size=12, backoff=0.01, progress=False)
    assert _cached_files() == []
    # a cached file that fails the md5 is replaced, as one that fails the sha256
    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "m.pkl").write_bytes(b"corrupt")
    assert download(url, md5=hashlib.md5(BODY).hexdigest()[:6]).read_bytes() == BODY
