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
        self.datasets: dict[str, dict] = {}  # dataset repositories: {"files": {path: bytes}, "commit": ..., "gated": bool}
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

            def do_POST(self):
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

    def _json(self, handler, value, status: int = 200) -> None:
        body = json.dumps(value).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(body)

    @staticmethod
    def _entry(path: str, data: bytes | None) -> dict:
        if data is None:
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
        return {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": path}

    def _dataset(self, handler, parts: list[str]) -> None:
        """The dataset API huggingface_hub's file system uses: repo info, tree, paths-info, and ranged file reads."""
        from urllib.parse import parse_qs, unquote

        api = parts[0] == "api"
        rest = parts[2:] if api else parts[1:]
        repo, rest = "/".join(rest[:2]), rest[2:]
        entry = self.datasets.get(repo)
        if entry is None:
            return self._error(handler, 401, "RepoNotFound", "Repository Not Found")
        if entry.get("gated") and handler.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(handler, 401, "GatedRepo", f"Access to dataset {repo} is restricted.")
        files, commit = entry["files"], entry["commit"]
        directories = sorted({"/".join(p.split("/")[:i]) for p in files for i in range(1, p.count("/") + 1)})
        if api and (not rest or rest[0] == "revision"):
            if rest and unquote(rest[1]) not in ("main", commit):
                return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
            return self._json(handler, {"id": repo, "sha": commit, "private": False,
                                        "siblings": [{"rfilename": p} for p in sorted(files)]})
        revision = unquote(rest[1]) if len(rest) > 1 else "main"
        if revision not in ("main", commit):
            return self._error(handler, 404, "RevisionNotFound", "Invalid rev id")
        if api and rest[0] == "tree":
            query = parse_qs(handler.path.partition("?")[2])
            under = unquote("/".join(rest[2:])).strip("/")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            found = [self._entry(d, None) for d in directories] + [self._entry(p, files[p]) for p in sorted(files)]
            prefix = f"{under}/" if under else ""
            found = [e for e in found if e["path"].startswith(prefix)
                     and (recursive or "/" not in e["path"][len(prefix):])]
            return self._json(handler, found)
        if api and rest[0] == "paths-info":
            length = int(handler.headers.get("Content-Length") or 0)
            form = parse_qs(handler.rfile.read(length).decode())
            wanted = form.get("paths", [])
            out = [self._entry(p, files[p]) for p in wanted if p in files]
            out += [self._entry(p, None) for p in wanted if p in directories]
            return self._json(handler, out)
        if not api and rest[0] == "resolve":
            name = unquote("/".join(rest[2:]))
            data = files.get(name)
            if data is None:
                return self._error(handler, 404, "EntryNotFound", f"{name} does not exist")
            start, stop, status = 0, len(data), 200
            ranged = handler.headers.get("Range") or handler.headers.get("range")
            if ranged:
                first, _, last = ranged.removeprefix("bytes=").partition("-")
                start, stop, status = int(first), min(len(data), int(last) + 1 if last else len(data)), 206
            handler.send_response(status)
            handler.send_header("X-Repo-Commit", commit)
            handler.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            handler.send_header("Content-Length", str(stop - start))
            handler.send_header("Accept-Ranges", "bytes")
            if status == 206:
                handler.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
            handler.end_headers()
            if handler.command == "GET":
                handler.wfile.write(data[start:stop])
            return None
        return self._error(handler, 404, "EntryNotFound", "unknown dataset route")

    def _answer(self, handler, *, body: bool) -> None:
        self.requests.append((handler.command, handler.path, handler.headers.get("Authorization")))
        path = handler.path.split("?")[0].lstrip("/")
        parts = path.split("/")
        if parts[0] == "datasets" or parts[:2] == ["api", "datasets"]:
            return self._dataset(handler, parts)
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
