"""HubDouble: a test double of the Hugging Face Hub's HTTP API, on loopback, for the push tests.

The Hub cannot run here and has no emulator, so this serves the calls huggingface_hub's own client
makes for `create_repo` and `upload_folder`, with the Hub's semantics where our code can tell:
Bearer tokens (unknown: 401; read-only: 403 on writes), a repository per owner/name (409 when it
exists), preupload deciding regular vs LFS per file, the LFS batch API with a basic upload whose
sha256 is checked, and NDJSON commits that reference only uploaded LFS objects. The Xet transfer
is the client's own business and not spoken here: the tests set HF_HUB_DISABLE_XET=1, which makes
the client use the LFS protocol the Hub still serves.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class Repo:
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {"message", "paths"}


class HubDouble:
    def __init__(self, tokens: dict[str, tuple[str, str]]) -> None:
        """tokens: token -> (user name, role "write" | "read")."""
        self.tokens = tokens
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.unhandled: list[str] = []
        self.outage: dict[str, int] = {}  # summary substring -> how many such commits get a 500 (a hub outage)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HubDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict | None = None, **headers: str) -> None:
                data = json.dumps(body or {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _user(self, write: bool) -> str | None:
                """The token's user, or None after answering 401/403 as the Hub does."""
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
                if token not in hub.tokens:
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return None
                user, role = hub.tokens[token]
                if write and role != "write":
                    self._reply(403, {"error": "You don't have the rights to write with this token"})
                    return None
                return user

            def _repo(self, repo_id: str, user: str) -> Repo | None:
                repo = hub.repos.get(repo_id)
                if repo is None or repo_id.split("/")[0] != user:
                    self._reply(404, {"error": "Repository not found"}, X_Error_Code="RepoNotFound")
                    return None
                return repo

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                if path.startswith("/api/models/"):  # repo_info: any valid token may read its own repositories
                    user = self._user(write=False)
                    repo_id = "/".join(path.removeprefix("/api/models/").split("/")[:2])
                    if user is not None and self._repo(repo_id, user) is not None:
                        repo = hub.repos[repo_id]
                        self._reply(200, {"id": repo_id, "private": repo.private, "sha": f"{len(repo.commits):040x}",
                                          "siblings": [{"rfilename": name} for name in sorted(repo.files)]})
                    return
                if path != "/api/agent-harnesses":  # the client's user-agent registry, fetched best-effort: not the Hub's API
                    hub.unhandled.append(f"GET {self.path}")
                self._reply(404, {"error": "not served by HubDouble"})

            def do_PUT(self) -> None:  # noqa: N802
                if not self.path.startswith("/lfs-upload/"):
                    hub.unhandled.append(f"PUT {self.path}")
                    return self._reply(404, {"error": "not served by HubDouble"})
                oid, data = self.path.rsplit("/", 1)[1], self._body()
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._reply(400, {"error": "sha256 mismatch"})
                hub.lfs[oid] = data
                self._reply(200)

            def do_POST(self) -> None:  # noqa: N802
                path = self.path.split("?", 1)[0]
                if path == "/api/validate-yaml":
                    return self._validate_yaml(json.loads(self._body())["content"])
                if path == "/api/repos/create":
                    return self._create(json.loads(self._body()))
                if path.endswith(".git/info/lfs/objects/batch"):
                    return self._lfs_batch(path.removeprefix("/").removesuffix(".git/info/lfs/objects/batch"))
                if path.startswith("/api/models/") and "/preupload/" in path:
                    return self._preupload(path.removeprefix("/api/models/").split("/preupload/")[0])
                if path.startswith("/api/models/") and "/commit/" in path:
                    return self._commit(path.removeprefix("/api/models/").split("/commit/")[0])
                hub.unhandled.append(f"POST {self.path}")
                self._reply(404, {"error": "not served by HubDouble"})

            def _create(self, payload: dict) -> None:
                user = self._user(write=True)
                if user is None:
                    return
                owner = payload.get("organization") or user
                if owner != user:
                    return self._reply(403, {"error": f"You don't have the rights to create a model under {owner}"})
                repo_id = f"{owner}/{payload['name']}"
                if repo_id in hub.repos:
                    return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                hub.repos[repo_id] = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
                self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

            def _validate_yaml(self, content: str) -> None:
                """The card's metadata, as the Hub checks it before a commit: a mapping; base_model one
                owner/name id or a list of them (the Hub also wants each to exist: a path never does)."""
                errors = []
                match = re.match(r"^---\n(.*?)\n---", content, re.S)
                meta = yaml.safe_load(match.group(1)) if match else {}
                if not isinstance(meta, dict):
                    errors.append("metadata must be a mapping")
                else:
                    bases = meta.get("base_model", [])
                    for base in bases if isinstance(bases, list) else [bases]:
                        if not (isinstance(base, str) and HUB_ID.match(base)):
                            errors.append(f'"base_model" must be a valid model id, got {base!r}')
                    if not all(isinstance(t, str) for t in meta.get("tags", [])):
                        errors.append('"tags" must be a list of strings')
                self._reply(400 if errors else 200, {"errors": [{"message": m} for m in errors], "warnings": []})

            def _preupload(self, repo_id: str) -> None:
                user = self._user(write=True)
                if user is None or self._repo(repo_id, user) is None:
                    return
                files = json.loads(self._body())["files"]
                # The Hub's default .gitattributes sends *.safetensors (and anything over 10 MB) to LFS
                self._reply(200, {"files": [{
                    "path": f["path"], "shouldIgnore": False,
                    "uploadMode": "lfs" if f["path"].endswith(".safetensors") or f["size"] > 10_000_000 else "regular",
                } for f in files]})

            def _lfs_batch(self, repo_id: str) -> None:
                user = self._user(write=True)
                if user is None or self._repo(repo_id, user) is None:
                    return
                payload = json.loads(self._body())
                if "basic" not in payload.get("transfers", ["basic"]):
                    return self._reply(422, {"message": "HubDouble speaks the basic transfer only"})
                objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                            "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                           for o in payload["objects"]]
                self._reply(200, {"transfer": "basic", "objects": objects})

            def _commit(self, repo_id: str) -> None:
                user = self._user(write=True)
                repo = None if user is None else self._repo(repo_id, user)
                if repo is None:
                    return
                lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                failing = next((k for k, n in hub.outage.items() if n > 0 and k in header["summary"]), None)
                if failing is not None:
                    hub.outage[failing] -= 1
                    return self._reply(500, {"error": "Internal Error"})
                changed: dict[str, bytes] = {}
                for line in lines:
                    value = line["value"]
                    if line["key"] == "file":
                        changed[value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs:
                            return self._reply(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                        changed[value["path"]] = hub.lfs[value["oid"]]
                repo.files.update(changed)
                repo.commits.append({"message": header["summary"], "paths": sorted(changed)})
                oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode()).hexdigest()
                self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                                  "pullRequestUrl": None})

        return Handler
