"""A tiny fake Hugging Face Hub HTTP server, for tests that check what a ``push_to_hub`` uploads.

CI has no network and no Hub, yet we want to assert exactly which files (names and bytes) a push would send, through
the *real* ``huggingface_hub`` client rather than a mock of it. :class:`FakeHub` runs a
``http.server.ThreadingHTTPServer`` on ``127.0.0.1`` (free port, background thread) that speaks just enough of the
Hub HTTP API for ``HfApi.create_repo``, ``HfApi.upload_folder`` / ``HfApi.create_commit`` (and the module-level
``huggingface_hub.upload_folder`` etc., see :meth:`FakeHub.route_default_client`) to return normally, and keeps every
committed file in memory in ``FakeHub.repos``.

Endpoints (checked against huggingface_hub 2.4 ``hf_api.py`` / ``_commit_api.py`` / ``_upload_pipeline.py``)::

    POST /api/repos/create                          -> {"url": ...}; 409 (+ "url") when it exists (exist_ok)
    POST /api/validate-yaml                         -> {"errors": [], "warnings": []} (sent when README.md is committed)
    POST /api/{type}s/{ns}/{name}/preupload/{rev}   -> every file {"uploadMode": "regular", "shouldIgnore": false,
                                                       "oid": <git blob sha1 of the stored copy, or null>}
    POST /api/{type}s/{ns}/{name}/commit/{rev}      -> NDJSON header/file/deletedFile/deletedFolder lines;
                                                       {"commitUrl", "commitOid", "success", "pullRequestUrl"}
    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]  -> repo_info (id, sha, siblings)
    GET  /api/{type}s/{ns}/{name}/tree/{rev}[/dir]  -> list_repo_tree / list_repo_files (for delete_patterns)
    GET  /api/whoami-v2                             -> a write-token user
    HEAD|GET /[{type}s/]{ns}/{name}/resolve/{rev}/{path} -> file bytes, or 404 EntryNotFound (hf_hub_download,
                                                       ModelCard.load in transformers' push_to_hub)

How Xet and LFS are avoided: the client never decides on its own how a file travels; it asks the server through the
``preupload`` endpoint, whose answer may only be ``"regular"`` or ``"lfs"`` per file (``_validate_preupload_info``).
With ``hf_xet`` installed (it is here), ``upload_folder`` takes the pipelined path (``_upload_pipeline``) and sends
every ``"lfs"`` file through Xet storage (CAS, token refresh at ``/api/.../xet-write-token``); without it, ``"lfs"``
files go to the git-LFS batch API. Both need servers we don't fake. Answering ``"regular"`` for *every* file, binary
``.safetensors`` included, makes the client put each file's content inline, base64-encoded, in the commit NDJSON body
(``{"key": "file", "value": {"path", "content", "encoding": "base64"}}``), so no Xet session upload or LFS transfer is
ever started, whichever path the client takes. An ``lfsFile`` line in a commit is answered with 400.

Other behaviour worth knowing:

* Repos start empty: unlike the real Hub, creation does not add a ``.gitattributes``, so ``repos[repo_id]`` holds
  exactly what was pushed.
* Write endpoints require an ``Authorization: Bearer ...`` header (any token) and answer 401 without one, like the
  Hub, so a push that forgets its token fails.
* Re-uploading an unchanged file is skipped by the client (preupload returns the stored git oid); when nothing changed
  it makes no commit and calls repo_info instead.
* Only the ``main`` revision exists; other revisions are 404 ``RevisionNotFound``; ``create_pr`` is answered 501.
* Unknown routes are 404 and listed in ``FakeHub.unhandled``; every request is in ``FakeHub.requests``.
* HTTP/1.0 responses (connection closed after each one), so no keep-alive connection outlives the server.
* ``HfApi(endpoint=hub.endpoint, token=...)`` reaches the server without any patching; module-level functions and
  ``HfApi()`` built without ``endpoint=`` use ``constants.ENDPOINT`` read at import, see
  :meth:`FakeHub.route_default_client`. ``HF_HUB_OFFLINE=1`` (read at import) blocks every request client-side, and
  an ``HTTP(S)_PROXY`` without ``127.0.0.1`` in ``NO_PROXY`` sends them to the proxy: use :func:`allow_hub_http`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_REPO = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)"
    r"(?:/(?P<action>preupload|commit|revision|tree)(?:/(?P<rev>[^/]+)(?:/(?P<rest>.*))?)?)?$"
)
_RESOLVE = re.compile(r"^/(?:(?P<type>datasets|spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_DATE = "2025-01-01T00:00:00.000Z"


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, what the Hub reports as a regular file's ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class FakeHub:
    """Context manager running a fake Hub on ``127.0.0.1``; see the module docstring.

    Attributes (read them after the client calls return; they are guarded by ``lock`` while the server runs):
        endpoint: ``"http://127.0.0.1:PORT"``, to pass as ``HfApi(endpoint=...)``.
        repos: repo_id -> {path_in_repo: content} as of the latest commit.
        repo_types: repo_id -> "model" / "dataset" / "space".
        commits: repo_id -> commit messages (summaries), oldest first.
        commit_files: repo_id -> per commit, {path_in_repo: content} of the files that commit added or replaced.
        requests: every (method, path) received, query string included.
        unhandled: the (method, path) of requests that matched no route (answered 404).
        username: the namespace of ``whoami`` and of ``create_repo`` calls without one.
    """

    def __init__(self, username: str = "user") -> None:
        self.username = username
        self.repos: dict[str, dict[str, bytes]] = {}
        self.repo_types: dict[str, str] = {}
        self.commits: dict[str, list[str]] = {}
        self.commit_files: dict[str, list[dict[str, bytes]]] = {}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._heads: dict[str, str] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.endpoint = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeHub:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.hub = self  # type: ignore[attr-defined]
        self._server = server
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers for tests

    def create_repo(self, repo_id: str, files: dict[str, bytes] | None = None, repo_type: str = "model") -> None:
        """Seed a repo server-side (e.g. to test a push onto an existing repo), as one commit "initial"."""
        with self.lock:
            self._create(repo_id, repo_type)
            if files:
                self._apply_commit(repo_id, "initial", dict(files), [], [])

    def route_default_client(self, monkeypatch: Any) -> None:
        """Point the clients built without ``endpoint=`` at this server, undone by ``monkeypatch`` after the test.

        That is ``huggingface_hub.constants.ENDPOINT`` (+ the download URL template built from it at import), the
        shared ``HfApi`` behind module-level functions (``huggingface_hub.upload_folder``, ``create_repo``, ...), and
        transformers' cached ``HfApi`` (used by ``PreTrainedModel.push_to_hub``) if transformers is imported. Also
        calls :func:`allow_hub_http`.
        """
        import sys

        from huggingface_hub import constants, hf_api

        allow_hub_http(monkeypatch)
        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", self.endpoint)
        tf_hub = sys.modules.get("transformers.utils.hub")
        if tf_hub is not None and hasattr(tf_hub, "_hf_api"):
            monkeypatch.setattr(tf_hub, "_hf_api", None)

    # ------------------------------------------------------------------ state (called with self.lock held)

    def _url(self, repo_id: str) -> str:
        prefix = {"dataset": "datasets/", "space": "spaces/"}.get(self.repo_types.get(repo_id, "model"), "")
        return f"{self.endpoint}/{prefix}{repo_id}"

    def _create(self, repo_id: str, repo_type: str) -> bool:
        if repo_id in self.repos:
            return False
        self.repos[repo_id] = {}
        self.repo_types[repo_id] = repo_type
        self.commits[repo_id] = []
        self.commit_files[repo_id] = []
        self._heads[repo_id] = hashlib.sha1(f"init:{repo_id}".encode()).hexdigest()
        return True

    def _apply_commit(
        self, repo_id: str, message: str, added: dict[str, bytes], deleted: list[str], deleted_dirs: list[str]
    ) -> str:
        files = self.repos[repo_id]
        for path in deleted:
            if path not in files:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            del files[path]
        for folder in deleted_dirs:
            prefix = folder.rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        files.update(added)
        self.commits[repo_id].append(message)
        self.commit_files[repo_id].append(added)
        head = hashlib.sha1(f"{self._heads[repo_id]}:{len(self.commits[repo_id])}:{message}".encode()).hexdigest()
        self._heads[repo_id] = head
        return head


def allow_hub_http(monkeypatch: Any) -> None:
    """Let the client reach a FakeHub, undone by ``monkeypatch`` after the test.

    Clears offline mode even if ``HF_HUB_OFFLINE=1`` was set when huggingface_hub was imported (CI has no network, so
    it may be), keeps telemetry off, and adds ``127.0.0.1`` to ``NO_PROXY``: the client's httpx session honours
    ``HTTP(S)_PROXY``/``ALL_PROXY`` and would send even loopback requests to a proxy. The shared session reads those
    variables when it is built, so it is closed here (``huggingface_hub.close_session``) to be rebuilt on next use.
    """
    import os

    from huggingface_hub import close_session, constants

    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(var, ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"])))
    close_session()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr access logs
        pass

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ plumbing

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json_body(self) -> Any:
        return json.loads(self.body) if self.body else {}

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        with hub.lock:
            hub.requests.append((method, self.path))
        self.body = self._read_body()  # always drain the request before answering, even with an error
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            if not self._route(method, url.path, query):
                with hub.lock:
                    hub.unhandled.append((method, self.path))
                raise _HubError(404, f"FakeHub: no route for {method} {url.path}")
        except _HubError as e:
            headers = {"X-Error-Message": e.message}
            if e.code:
                headers["X-Error-Code"] = e.code
            self._json(e.status, {"error": e.message, **e.extra}, headers)

    def _need_auth(self) -> None:
        if not self.headers.get("Authorization", "").startswith("Bearer "):
            raise _HubError(401, "Invalid username or password.")

    def _repo(self, repo_id: str, rev: str | None = None) -> dict[str, bytes]:
        # called with hub.lock held
        if repo_id not in self.hub.repos:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        if rev is not None and unquote(rev) != "main":
            raise _HubError(404, f"Invalid rev id: {unquote(rev)}", "RevisionNotFound")
        return self.hub.repos[repo_id]

    # ------------------------------------------------------------------ routes

    def _route(self, method: str, path: str, query: dict[str, str]) -> bool:
        hub = self.hub
        if method == "POST" and path == "/api/repos/create":
            self._need_auth()
            payload = self._json_body()
            namespace = payload.get("organization") or hub.username
            repo_id = f"{namespace}/{payload['name']}"
            with hub.lock:
                created = hub._create(repo_id, payload.get("type") or "model")
                url = hub._url(repo_id)
            if created:
                self._json(200, {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})
            else:
                raise _HubError(409, "You already created this model repo", extra={"url": url})
            return True
        if method == "POST" and path == "/api/validate-yaml":
            self._json(200, {"errors": [], "warnings": []})
            return True
        if method == "GET" and path == "/api/whoami-v2":
            self._need_auth()
            token = {"displayName": "fake", "role": "write"}
            self._json(200, {"type": "user", "name": hub.username, "fullname": hub.username, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": token}})  # fmt: skip
            return True
        m = _API_REPO.match(path)
        if m:
            repo_id, action, rev, rest = m["repo"], m["action"], m["rev"], m["rest"]
            if method == "POST" and action == "preupload" and rev and not rest:
                self._preupload(repo_id, rev)
                return True
            if method == "POST" and action == "commit" and rev and not rest:
                self._commit(repo_id, rev, query)
                return True
            if method == "GET" and (action is None or (action == "revision" and rev and not rest)):
                self._repo_info(repo_id, rev)
                return True
            if method == "GET" and action == "tree" and rev:
                self._tree(repo_id, rev, rest or "", query.get("recursive", "").lower() in ("1", "true"))
                return True
        m = _RESOLVE.match(path)
        if m and method in ("GET", "HEAD"):
            self._resolve(m["repo"], m["rev"], unquote(m["path"]))
            return True
        return False

    def _preupload(self, repo_id: str, rev: str) -> None:
        self._need_auth()
        payload = self._json_body()
        with self.hub.lock:
            files = self._repo(repo_id, rev)
            head = self.hub._heads[repo_id]
            answer = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",  # never "lfs": content goes inline in the commit, no Xet/LFS transfer
                    "shouldIgnore": False,
                    "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
                }
                for f in payload.get("files", [])
            ]
        self._json(200, {"files": answer, "commitOid": head})

    def _commit(self, repo_id: str, rev: str, query: dict[str, str]) -> None:
        self._need_auth()
        if query.get("create_pr") == "1":
            raise _HubError(501, "FakeHub does not support create_pr")
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        message, parent = "", None
        added: dict[str, bytes] = {}
        deleted: list[str] = []
        deleted_dirs: list[str] = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                message, parent = value.get("summary", ""), value.get("parentCommit")
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise _HubError(400, f"FakeHub: unsupported encoding {value.get('encoding')!r}")
                added[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                deleted.append(value["path"])
            elif key == "deletedFolder":
                deleted_dirs.append(value["path"])
            else:  # lfsFile: never announced by our preupload answer
                raise _HubError(400, f"FakeHub: unsupported commit operation {key!r} ({value.get('path')})")
        with self.hub.lock:
            self._repo(repo_id, rev)
            if parent is not None and not self.hub._heads[repo_id].startswith(parent):
                raise _HubError(412, "A commit has happened since. Please refresh and try again.")
            oid = self.hub._apply_commit(repo_id, message, added, deleted, deleted_dirs)
            url = self.hub._url(repo_id)
        self._json(200, {"success": True, "commitOid": oid, "commitUrl": f"{url}/commit/{oid}", "pullRequestUrl": None})

    def _repo_info(self, repo_id: str, rev: str | None) -> None:
        with self.hub.lock:
            files = self._repo(repo_id, rev)
            siblings = [{"rfilename": p, "size": len(c), "blobId": git_blob_oid(c)} for p, c in sorted(files.items())]
            info = {
                "id": repo_id,
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "author": repo_id.split("/")[0],
                "sha": self.hub._heads[repo_id],
                "private": False,
                "disabled": False,
                "gated": False,
                "tags": [],
                "lastModified": _DATE,
                "createdAt": _DATE,
                "siblings": siblings,
            }
        self._json(200, info)

    def _tree(self, repo_id: str, rev: str, folder: str, recursive: bool) -> None:
        prefix = unquote(folder).strip("/") + "/" if folder.strip("/") else ""
        with self.hub.lock:
            files = self._repo(repo_id, rev)
            entries: list[dict[str, Any]] = []
            dirs: set[str] = set()
            for path, content in sorted(files.items()):
                if not path.startswith(prefix):
                    continue
                parts = path[len(prefix) :].split("/")
                for i in range(1, len(parts) if recursive else min(2, len(parts))):
                    dirs.add(prefix + "/".join(parts[:i]))
                if recursive or len(parts) == 1:
                    entries.append({"type": "file", "path": path, "size": len(content), "oid": git_blob_oid(content)})
        oid = "0" * 40
        self._json(200, [{"type": "directory", "path": d, "oid": oid} for d in sorted(dirs)] + entries)

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        with self.hub.lock:
            files = self._repo(repo_id, rev)
            head = self.hub._heads[repo_id]
            content = files.get(path)
        if content is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", extra={"path": quote(path)})
        etag = f'"{git_blob_oid(content)}"'
        self._send(200, content, {"X-Repo-Commit": head, "ETag": etag, "Content-Type": "application/octet-stream"})
