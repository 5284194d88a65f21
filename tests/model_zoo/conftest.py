"""Shared model-zoo test set-up: a local HTTP server on 127.0.0.1 (no internet needed), a
per-test cache with the zoo's environment variables cleared, small files in the publishers'
formats (torchvision state dict, detectron2 .pkl) and temporary catalogs pointing at them."""
import http.server
import os
import threading
import time

import pytest
import zoo_samples


class _Handler(http.server.BaseHTTPRequestHandler):
    # routes: path -> (kind, arg); kinds: ok, truncate, fail_then_ok, status, slow.
    # A path with a body in srv.bodies but no route is served "ok".
    def do_GET(self):  # noqa: N802
        srv = self.server
        with srv.lock:
            srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
            n = srv.hits[self.path]
        default = ("ok", None) if self.path in srv.bodies else ("status", 404)
        kind, arg = srv.routes.get(self.path, default)
        if kind == "status":
            self.send_error(arg)
            return
        if kind == "fail_then_ok" and n <= arg:
            self.send_error(500)
            return
        body = srv.bodies.get(self.path, srv.default_body)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if kind == "truncate":
            self.send_header("Content-Length", str(len(body) + 1000))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if kind == "slow":
            time.sleep(arg)
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """``server.base`` is ``http://127.0.0.1:<port>``; set ``routes``, ``bodies`` (path ->
    bytes) or ``default_body``; ``hits`` counts the requests per path."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.lock = threading.Lock()
    srv.hits, srv.routes, srv.bodies, srv.default_body = {}, {}, {}, b""
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    """A fresh cache per test; yields the session's cache (tests/conftest.py), where the
    embedded dataset is generated once for all tests."""
    session_cache = os.environ.get("SEGKIT_CACHE")
    monkeypatch.setenv("SEGKIT_CACHE", str(tmp_path / "cache"))
    for name in ("SEGKIT_OFFLINE", "SEGKIT_ZOO_MIRROR", "SEGKIT_ZOO_CATALOG"):
        monkeypatch.delenv(name, raising=False)
    yield session_cache


@pytest.fixture(scope="session")
def torchvision_mask_rcnn():
    return zoo_samples.torchvision_mask_rcnn()


@pytest.fixture(scope="session")
def detectron2_mask_rcnn():
    return zoo_samples.detectron2_mask_rcnn()


@pytest.fixture(scope="session")
def detectron2_retinanet():
    return zoo_samples.detectron2_retinanet()


@pytest.fixture
def make_catalog(tmp_path, server):
    """``make_catalog({name: {entry fields}, ...})`` -> path of a catalog YAML; every entry gets
    defaults (served by ``server`` from its ``published`` file, a ``zoo_samples.Published``)."""
    import yaml

    def make(entries, filename="zoo.yaml"):
        models = {}
        for name, fields in entries.items():
            fields = dict(fields)
            published = fields.pop("published", None)
            node = {"task": "instance_segmentation", "source": "torchvision",
                    "experiment": "mask_rcnn_r50_fpn_torchvision",
                    "overrides": zoo_samples.THIN_RCNN, "classes": zoo_samples.CLASSES,
                    "license": "test", "page": "https://example.org/zoo",
                    "metrics": {"box_ap": 1.0, "mask_ap": 1.0, "dataset": "none",
                                "source": "https://example.org/zoo"}}
            if published is not None:
                server.bodies[f"/zoo/{published.filename}"] = published.body
                node["urls"] = [f"{server.base}/zoo/{published.filename}"]
            node.update(fields)
            models[name] = node
        path = tmp_path / filename
        path.write_text(yaml.safe_dump({"format": "segkit-model-zoo", "version": 1,
                                        "models": models}))
        return path

    return make
