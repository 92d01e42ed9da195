"""A Hugging Face cache populated the way a download leaves it, and a server on 127.0.0.1 that answers as the Hub does.

:func:`cache_snapshot` writes ``models--ORG--NAME/blobs/ETAG``, ``snapshots/COMMIT/FILE`` (a
relative link to the blob) and ``refs/REVISION`` (the commit), which ``huggingface_hub`` reads with
``HF_HUB_OFFLINE=1``. :class:`FakeHub` serves the same files over HTTP for ``HF_ENDPOINT``: the
``HEAD``/``GET`` of ``/ORG/NAME/resolve/REVISION/FILE`` with the ``X-Repo-Commit``,
``X-Linked-Etag`` and ``Content-Length`` headers the client reads, 404 with ``X-Error-Code:
RevisionNotFound`` for an unknown revision, 401 with ``X-Error-Code: GatedRepo`` for a gated
repository asked without its token, and a connection closed half-way through a body on demand.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
from pathlib import Path

import torch

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_secretTOKENvalue0123456789"


def tiny_timm_files(*, seed: int = 0, num_classes: int = 10) -> dict[str, bytes]:
    """config.json and model.safetensors of timm's ``test_resnet`` (pretrained=False), as ``push_to_hf_hub`` writes them."""
    import timm
    from safetensors.torch import save

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    config = {"architecture": "test_resnet", "num_classes": num_classes, "num_features": model.num_features,
              "pretrained_cfg": {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3,
                                 "interpolation": "bilinear", "crop_pct": 1.0, "num_classes": num_classes,
                                 "classifier": "fc"}}
    weights = save({k: v.contiguous() for k, v in model.state_dict().items()})
    return {"config.json": json.dumps(config).encode(), "model.safetensors": weights}


def cache_snapshot(hub_cache: Path, repo: str, files: dict[str, bytes], *, commit: str = COMMIT,
                   ref: str = "main") -> Path:
    """Write ``files`` into a Hub cache as a download of ``repo`` at ``ref`` leaves them; returns the snapshot directory."""
    root = Path(hub_cache) / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        (root / "blobs" / etag).write_bytes(data)
        link = snapshot / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(root / "blobs" / etag, snapshot))
    return snapshot


class FakeHub:
    """A Hub on 127.0.0.1: ``repos[repo] = {"files": {...}, "commit": ..., "gated": bool}``; ``drop`` cuts bodies short."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.drop: set[str] = set()  # file names whose GET is cut off half-way
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _error(self, handler, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode() if handler.command == "GET" else b""
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("X-Error-Message", message)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def _answer(self, handler, *, body: bool) -> None:
        self.requests.append((handler.command, handler.path, handler.headers.get("Authorization")))
        path = handler.path.split("?")[0].lstrip("/")
        parts = path.split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return self._error(handler, 404, "EntryNotFound", "not a resolve URL")
        repo, revision, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        entry = self.repos.get(repo)
        if entry is None:
            return self._error(handler, 401, "RepoNotFound", "Repository Not Found")
        if entry.get("gated") and handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(handler, 401, "GatedRepo", f"Access to model {repo} is restricted.")
        if revision not in ("main", entry["commit"]):
            return self._error(handler, 404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = entry["files"].get(name)
        if data is None:
            return self._error(handler, 404, "EntryNotFound", f"{name} does not exist")
        handler.send_response(200)
        handler.send_header("X-Repo-Commit", entry["commit"])
        handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
        handler.send_header("X-Linked-Size", str(len(data)))
        handler.send_header("Content-Length", str(len(data)))
        handler.send_header("Content-Type", "application/octet-stream")
        handler.end_headers()
        if not body:
            return
        if name in self.drop:
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            import socket

            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(data)
