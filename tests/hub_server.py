"""A small Hub-compatible HTTP server for tests: the routes huggingface_hub 2.x calls to create a repository, commit
files ("regular" upload mode only, so no LFS or Xet), create a branch, list a tree and download files.

It runs on 127.0.0.1 in a background thread and keeps blobs on disk (content-addressed by their git blob id) and the
repositories' branches and commits in memory. Tests drive it through :class:`HubServer`: ``tokens`` (token ->
"write" or "read"), ``fail(route, status)`` to inject errors, and ``received`` (every file path a commit carried).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Repo:
    private: bool
    branches: dict[str, str] = dataclasses.field(default_factory=dict)  # branch -> commit oid
    commits: dict[str, dict[str, tuple[str, int]]] = dataclasses.field(default_factory=dict)  # oid -> {path: blob}
    messages: dict[str, str] = dataclasses.field(default_factory=dict)  # oid -> commit summary


@dataclasses.dataclass
class Fault:
    route: str
    status: int
    message: str
    skip: int  # successful calls to let through first
    times: int


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


_REPO = r"/api/models/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(_REPO + r"/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(_REPO + r"/commit/(?P<rev>[^/]+)$")),
    ("POST", "paths_info", re.compile(_REPO + r"/paths-info/(?P<rev>[^/]+)$")),
    ("POST", "branch", re.compile(_REPO + r"/branch/(?P<branch>[^/]+)$")),
    ("GET", "info", re.compile(_REPO + r"(?:/revision/(?P<rev>[^/]+))?$")),
    ("GET", "tree", re.compile(_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")),
    ("GET", "resolve", re.compile(r"^/(?P<ns>[^/]+)/(?P<name>[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


class HubServer:
    """Start with ``with HubServer(tmp_path) as hub:``; ``hub.url`` is the endpoint to give huggingface_hub."""

    def __init__(self, storage: Path):
        self.blobs = Path(storage) / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.tokens: dict[str, str] = {}
        self.received: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail(self, route: str, status: int, message: str = "injected failure", *, skip: int = 0, times: int = 1):
        """Answer ``status`` to the next ``times`` calls of ``route`` (after letting ``skip`` calls through)."""
        self._faults.append(Fault(route, status, message, skip, times))

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The content of every file of a repository at a branch."""
        repo = self.repos[repo_id]
        tree = repo.commits[repo.branches[revision]]
        return {path: (self.blobs / oid).read_bytes() for path, (oid, _) in tree.items()}

    # -- request handling (called from the handler thread, under the lock) --------------------------------------
    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes):
        self.requests.append((method, path))
        for verb, route, pattern in _ROUTES:
            if verb != ("GET" if method == "HEAD" else method):
                continue
            m = pattern.match(path)
            if m is None:
                continue
            params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
            self._inject_fault(route)
            return getattr(self, f"_{route}")(params, query, headers, body)
        raise HubError(404, f"no route for {method} {path}")

    def _inject_fault(self, route: str) -> None:
        for fault in self._faults:
            if fault.route != route or fault.times <= 0:
                continue
            if fault.skip > 0:
                fault.skip -= 1
                return
            fault.times -= 1
            raise HubError(fault.status, fault.message)

    def _auth(self, headers: Any, *, write: bool) -> str | None:
        value = headers.get("Authorization") or ""
        token = value.removeprefix("Bearer ").strip() or None
        if token is None:
            if write:
                raise HubError(401, "Authorization header is missing")
            return None
        if token not in self.tokens:
            # Echo the token back, as a careless server might: the client must redact it.
            raise HubError(401, f"Invalid credentials in Authorization header (token {token})")
        if write and self.tokens[token] != "write":
            raise HubError(403, "You don't have the rights to write to this repository")
        return token

    def _repo(self, params: dict[str, str], headers: Any, *, write: bool) -> Repo:
        token = self._auth(headers, write=write)
        repo = self.repos.get(f"{params['ns']}/{params['name']}")
        if repo is None or (repo.private and token is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_oid(repo: Repo, rev: str) -> str:
        if rev in repo.branches:
            return repo.branches[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _new_commit(self, repo: Repo, tree: dict[str, tuple[str, int]], summary: str) -> str:
        oid = hashlib.sha1(json.dumps([sorted(tree.items()), summary, len(repo.commits)]).encode()).hexdigest()
        repo.commits[oid] = tree
        repo.messages[oid] = summary
        return oid

    def _store_blob(self, data: bytes) -> tuple[str, int]:
        oid = git_blob_id(data)
        (self.blobs / oid).write_bytes(data)
        return oid, len(data)

    def _entry(self, path: str, blob: tuple[str, int]) -> dict[str, Any]:
        return {"type": "file", "oid": blob[0], "size": blob[1], "path": path}

    # -- routes ------------------------------------------------------------------------------------------------
    def _create(self, params, query, headers, body):
        self._auth(headers, write=True)
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.branches["main"] = self._new_commit(repo, {".gitattributes": self._store_blob(b"")}, "initial commit")
        self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def _validate(self, params, query, headers, body):
        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        try:
            if m:
                yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return 400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []}
        return 200, {"errors": [], "warnings": []}

    def _preupload(self, params, query, headers, body):
        repo = self._repo(params, headers, write=True)
        tree = repo.commits[self._commit_oid(repo, params["rev"])]
        files = json.loads(body)["files"]
        answers = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": tree.get(f["path"], (None,))[0]}
            for f in files
        ]
        return 200, {"files": answers}

    def _commit(self, params, query, headers, body):
        repo = self._repo(params, headers, write=True)
        branch = params["rev"]
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        tree = dict(repo.commits[repo.branches[branch]])
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value["summary"]
            elif key == "file":
                tree[value["path"]] = self._store_blob(base64.b64decode(value["content"]))
                self.received.append(value["path"])
            elif key in ("deletedFile", "deletedFolder"):
                tree = {p: b for p, b in tree.items() if p != value["path"] and not p.startswith(value["path"] + "/")}
            else:
                raise HubError(400, f"unsupported commit line {key!r} (this server takes regular files only)")
        oid = self._new_commit(repo, tree, summary)
        repo.branches[branch] = oid
        url = f"{self.url}/{params['ns']}/{params['name']}/commit/{oid}"
        return 200, {"success": True, "commitOid": oid, "commitUrl": url}

    def _paths_info(self, params, query, headers, body):
        repo = self._repo(params, headers, write=False)
        tree = repo.commits[self._commit_oid(repo, params["rev"])]
        paths = parse_qs(body.decode()).get("paths", [])
        return 200, [self._entry(p, tree[p]) for p in paths if p in tree]

    def _branch(self, params, query, headers, body):
        repo = self._repo(params, headers, write=True)
        if params["branch"] in repo.branches:
            return 409, {"error": "Reference already exists"}
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.branches[params["branch"]] = self._commit_oid(repo, start)
        return 200, {}

    def _info(self, params, query, headers, body):
        repo = self._repo(params, headers, write=False)
        oid = self._commit_oid(repo, params.get("rev", "main"))
        return 200, {
            "id": f"{params['ns']}/{params['name']}",
            "sha": oid,
            "private": repo.private,
            "siblings": [{"rfilename": p} for p in sorted(repo.commits[oid])],
        }

    def _tree(self, params, query, headers, body):
        repo = self._repo(params, headers, write=False)
        tree = repo.commits[self._commit_oid(repo, params["rev"])]
        prefix = params.get("path", "").strip("/")
        prefix = prefix + "/" if prefix else ""
        return 200, [self._entry(p, b) for p, b in sorted(tree.items()) if p.startswith(prefix)]

    def _resolve(self, params, query, headers, body):
        repo = self._repo(params, headers, write=False)
        oid = self._commit_oid(repo, params["rev"])
        blob = repo.commits[oid].get(params["path"])
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        data = (self.blobs / blob[0]).read_bytes()
        return 200, data, {"X-Repo-Commit": oid, "ETag": f'"{blob[0]}"'}


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
            pass

        def _serve(self) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            extra: dict[str, str] = {}
            try:
                with server._lock:
                    result = server.handle(self.command, url.path, parse_qs(url.query), self.headers, body)
                status, payload = result[0], result[1]
                if len(result) == 3:
                    extra = result[2]
            except HubError as e:
                status, payload = e.status, {"error": e.message}
                if e.code:
                    extra = {"X-Error-Code": e.code}
            if isinstance(payload, bytes):
                data, ctype = payload, "application/octet-stream"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_POST = do_HEAD = _serve

    return Handler
