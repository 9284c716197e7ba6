"""A "local kubelet" test double: runs the pods of an API server as local processes.

It does over HTTP what a kubelet does for its node: watch pods, prepare volumes and
environment, start the container's command, and report the pod's status:
Pending -> Running -> Succeeded | Failed, with
containerStatuses[].state.terminated.exitCode. Deleting a pod kills its process.

Where a laptop is not a node, it translates:
- volumes become directories under `root/<namespace>/<pod>-<uid>/volumes/<volume>`: a configMap volume is
  materialised from the ConfigMap (its items, or all keys), an emptyDir is an empty
  directory, /dev/shm is left alone; a path argument under a mountPath, and the
  workingDir, are rewritten to the directory (the executable, argv[0], is not: it names a
  program of the image, run from this host, see below);
- env: `value`, `valueFrom.secretKeyRef` (read from the API server's Secret, decoded),
  `valueFrom.configMapKeyRef` and `fieldRef` (metadata.name/namespace); no image: the
  process inherits PATH/HOME/PYTHONPATH/LANG from this process plus `env` given here
  (e.g. a KUBECONFIG for the double, where a real pod has its service-account token);
- the command: `grpo` runs as `python -m grpo_runtime.cli` of this interpreter, and
  `commands` may map other executables (or override a pod's argv entirely via `argv`); what
  they map to is a host path and is never rewritten, wherever the checkout or the
  interpreter lives.
- the GPU: this host stands in for a GPU node, so a pod's GRPO_DEVICE=cuda (every training pod
  asks for nvidia.com/gpu and requires it) runs as GRPO_DEVICE=cpu.
- cluster DNS: every pod runs on this host, so an env value that names a pod through a headless
  Service, `<hostname>.<service>.<namespace>.svc[.cluster.local]` (a several-node GRPOJob's
  GRPO_MASTER_ADDR), becomes 127.0.0.1 where the cluster's DNS would answer: the Service exists, is
  headless and selects a pod of that hostname and subdomain that has not ended. Other values are
  left alone.
- the network: on a node each pod has its own; here all share this host's, so a pod waits to start
  until the processes of deleted pods that declared one of its containerPorts have exited (a
  gang's next attempt takes the port its previous one held). Ports are not otherwise translated:
  two gangs running at once would meet at the same rendezvous port.
- a container is a process group: deleting the pod sends SIGTERM to its main process (the
  container's PID 1), and when that ends the rest of the group is killed, as the kernel ends a PID
  namespace (no child, a torchrun rank say, outlives its pod); kill() kills the whole container at
  once (the OOM killer, a crashed node). A process killed by a signal exits 128 + its number, as a
  container runtime reports it (SIGKILL: 137).
A missing Secret or key leaves the pod Pending with CreateContainerConfigError, a
missing ConfigMap with ContainerCreating, as a kubelet would, until they appear.

`run=False` makes it a "scripted" kubelet: pods go Running and stay there until the
test calls `finish(namespace, name, exit_code)` or `evict(namespace, name)`.
`kill(namespace, name)` kills a running pod's processes (it then fails with exit code 137).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

INHERITED_ENV = ("PATH", "HOME", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
RETRY_SECONDS = 0.2
POD_DNS_NAME = re.compile(
    r"^(?P<hostname>[a-z0-9-]+)\.(?P<service>[a-z0-9-]+)\.(?P<namespace>[a-z0-9-]+)\.svc(\.cluster\.local)?\.?$")
THIS_HOST = "127.0.0.1"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kill_container(process: asyncio.subprocess.Process) -> None:
    """SIGKILL to every process of the container (the pod's process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


def _container_status(container: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """A complete v1 ContainerStatus (clients validate the required image/imageID/ready fields)."""
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": f"local://{container.get('image', '')}",
        "ready": "running" in state,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }


class PodNotReady(Exception):
    """A volume or env source is missing; the kubelet retries (reason, message)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class LocalKubelet:
    def __init__(
        self,
        server: str,
        *,
        root: Path,
        env: dict[str, str] | None = None,
        run: bool = True,
        commands: dict[str, list[str]] | None = None,
        argv: Callable[[dict[str, Any]], list[str] | None] | None = None,
    ):
        self.server = server.rstrip("/")
        self.root = Path(root)
        self.env = dict(env or {})
        self.run = run
        self.commands = {"grpo": [sys.executable, "-m", "grpo_runtime.cli"], **(commands or {})}
        self.argv = argv
        self.processes: dict[tuple[str, str], asyncio.subprocess.Process] = {}
        self.exit_codes: dict[tuple[str, str], int] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by pod uid: a namesake pod is a new pod
        self._by_uid: dict[str, asyncio.subprocess.Process] = {}
        self._ports: dict[str, set[int]] = {}  # by pod uid: the containerPorts its pod declares
        self._ending: dict[str, asyncio.subprocess.Process] = {}  # by pod uid: deleted pods' running processes
        self._containers: dict[tuple[str, str], dict[str, Any]] = {}
        self._dirs: dict[tuple[str, str], Path] = {}
        self._session: aiohttp.ClientSession | None = None
        self._watcher: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LocalKubelet:
        self._session = aiohttp.ClientSession(headers={"Authorization": "Bearer kubelet"})
        self._watcher = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        tasks = [t for t in [self._watcher, *self._tasks.values()] if t]
        for task in tasks:
            task.cancel()
        for process in self.processes.values():
            _kill_container(process)
        await asyncio.gather(*tasks, return_exceptions=True)
        for process in self.processes.values():
            with contextlib.suppress(Exception):
                await process.wait()
        assert self._session is not None
        await self._session.close()

    def pod_dir(self, namespace: str, pod: str) -> Path:
        """Where the (latest) pod of that name keeps its volumes and log."""
        return self._dirs.get((namespace, pod), self.root / namespace / pod)

    def log(self, namespace: str, pod: str) -> str:
        """What the pod's process wrote (stdout and stderr), like `kubectl logs`."""
        path = self.pod_dir(namespace, pod) / "log"
        return path.read_text() if path.exists() else ""

    # ---- API -----------------------------------------------------------------------------------

    async def _get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any] | None:
        assert self._session is not None
        async with self._session.get(self.server + path, params=params) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.json()

    async def _patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        assert self._session is not None
        url = f"{self.server}/api/v1/namespaces/{namespace}/pods/{name}/status"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with self._session.patch(url, data=json.dumps({"status": status}), headers=headers) as response:
            if response.status != 404:  # deleted meanwhile: nothing to report
                response.raise_for_status()

    async def _watch(self) -> None:
        assert self._session is not None
        while True:
            try:
                async with self._session.get(
                    f"{self.server}/api/v1/pods", params={"watch": "true"}, timeout=aiohttp.ClientTimeout(total=None)
                ) as response:
                    async for line in response.content:
                        if line.strip():
                            self._on_event(json.loads(line))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(RETRY_SECONDS)

    def _on_event(self, event: dict[str, Any]) -> None:
        pod = event.get("object") or {}
        meta = pod.get("metadata") or {}
        uid = meta.get("uid", "")
        if event.get("type") == "DELETED" or meta.get("deletionTimestamp"):
            process = self._by_uid.get(uid)
            if process and process.returncode is None:
                self._ending[uid] = process
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            return
        phase = (pod.get("status") or {}).get("phase", "Pending")
        if uid not in self._tasks and phase == "Pending":
            self._tasks[uid] = asyncio.create_task(self._start(pod))

    # ---- one pod -------------------------------------------------------------------------------

    async def _start(self, pod: dict[str, Any]) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        # A directory per pod, not per name: a namesake pod gets fresh emptyDirs, as on a node.
        self._dirs[(namespace, name)] = self.root / namespace / f"{name}-{pod['metadata'].get('uid', '')[:8]}"
        while True:
            try:
                mounts = await self._volumes(pod, container)
                env = await self._environment(pod, container)
                break
            except PodNotReady as exc:
                waiting = {"waiting": {"reason": exc.reason, "message": str(exc)}}
                await self._patch_status(namespace, name, {
                    "phase": "Pending", "containerStatuses": [_container_status(container, waiting)]})
                await asyncio.sleep(RETRY_SECONDS)
                if await self._get(f"/api/v1/namespaces/{namespace}/pods/{name}") is None:
                    return

        started = _now()
        self._containers[(namespace, name)] = container
        await self._patch_status(namespace, name, {
            "phase": "Running", "startTime": started,
            "containerStatuses": [_container_status(container, {"running": {"startedAt": started}})],
        })
        if not self.run:
            return  # scripted: finish() or evict() ends it

        argv = self.argv(pod) if self.argv else None
        argv = argv or self._argv(container, mounts)
        working_dir = container.get("workingDir", "")
        inside = self._inside(working_dir, mounts) if working_dir else working_dir
        workdir = Path(inside) if inside != working_dir else self.pod_dir(namespace, name) / "cwd"
        workdir.mkdir(parents=True, exist_ok=True)
        await self._wait_for_ports(pod["metadata"].get("uid", ""), container)
        log = (self.pod_dir(namespace, name) / "log").open("wb")
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=workdir, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True
        )
        self.processes[(namespace, name)] = self._by_uid[pod["metadata"].get("uid", "")] = process
        code = await process.wait()
        _kill_container(process)  # its PID 1 ended: so does everything else in the container
        code = 128 - code if code < 0 else code  # killed by signal -code
        log.close()
        await self.finish(namespace, name, code, started=started)

    async def _wait_for_ports(self, uid: str, container: dict[str, Any]) -> None:
        """Until no deleted pod's process that declared one of this container's ports still runs."""
        ports = self._ports[uid] = {port["containerPort"] for port in container.get("ports") or []}
        while any(process.returncode is None and ports & self._ports.get(ending, set())
                  for ending, process in self._ending.items()):
            await asyncio.sleep(RETRY_SECONDS)

    async def finish(self, namespace: str, name: str, exit_code: int, *, started: str | None = None) -> None:
        """The container ended with this exit code: the pod Succeeded (0) or Failed."""
        self.exit_codes[(namespace, name)] = exit_code
        terminated = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                      "startedAt": started or _now(), "finishedAt": _now()}
        container = self._containers.get((namespace, name), {"name": "main", "image": "unknown"})
        await self._patch_status(namespace, name, {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [_container_status(container, {"terminated": terminated})],
        })

    def kill(self, namespace: str, name: str) -> None:
        """The pod's container is killed, every process of it (the OOM killer, a crashed node's runtime)."""
        _kill_container(self.processes[(namespace, name)])

    async def evict(self, namespace: str, name: str) -> None:
        """Node-pressure eviction: Failed with reason Evicted, no container exit code."""
        process = self.processes.get((namespace, name))
        if process and process.returncode is None:
            _kill_container(process)
        await self._patch_status(namespace, name, {
            "phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory.", "containerStatuses": [],
        })

    async def _volumes(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Path]:
        """mountPath -> local directory, with configMaps materialised."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            if mount["mountPath"] == "/dev/shm":
                continue
            volume = volumes[mount["name"]]
            directory = self.pod_dir(namespace, name) / "volumes" / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                source = volume["configMap"]
                config_map = await self._get(f"/api/v1/namespaces/{namespace}/configmaps/{source['name']}")
                if config_map is None:
                    raise PodNotReady("ContainerCreating", f'configmap "{source["name"]}" not found')
                data = config_map.get("data") or {}
                items = source.get("items") or [{"key": key, "path": key} for key in data]
                for item in items:
                    (directory / item["path"]).write_text(data[item["key"]])
            mounts[mount["mountPath"]] = directory
        return mounts

    async def _environment(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
        env.update(self.env)
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = await self._resolve(str(var["value"]))
                continue
            source = var.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = await self._get(f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
                if secret is None or ref["key"] not in (secret.get("data") or {}):
                    raise PodNotReady("CreateContainerConfigError",
                                      f'secret "{ref["name"]}" or its key "{ref["key"]}" not found')
                env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                config_map = await self._get(f"/api/v1/namespaces/{namespace}/configmaps/{ref['name']}")
                if config_map is None or ref["key"] not in (config_map.get("data") or {}):
                    raise PodNotReady("CreateContainerConfigError", f'configmap "{ref["name"]}" not found')
                env[var["name"]] = config_map["data"][ref["key"]]
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[var["name"]] = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": namespace}.get(
                    path, ""
                )
        if env.get("GRPO_DEVICE") == "cuda":
            env["GRPO_DEVICE"] = "cpu"  # the stand-in GPU node's "GPU" is this CPU
        return env

    async def _resolve(self, value: str) -> str:
        """Cluster DNS for a pod named through a headless Service: this host (see the module's docstring)."""
        match = POD_DNS_NAME.match(value)
        if not match:
            return value
        namespace, service_name = match["namespace"], match["service"]
        service = await self._get(f"/api/v1/namespaces/{namespace}/services/{service_name}")
        spec = (service or {}).get("spec") or {}
        if spec.get("clusterIP") != "None" or not spec.get("selector"):
            return value  # a Service without a selector has no endpoints, so no DNS records for pods
        selector = ",".join(f"{key}={label}" for key, label in spec["selector"].items())
        pods = await self._get(f"/api/v1/namespaces/{namespace}/pods", {"labelSelector": selector}) or {}
        for pod in pods.get("items") or []:
            named = (pod["spec"].get("hostname"), pod["spec"].get("subdomain")) == (match["hostname"], service_name)
            if named and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                return THIS_HOST
        return value

    def _argv(self, container: dict[str, Any], mounts: dict[str, Path]) -> list[str]:
        """The pod's argv on this host. The executable is the image's, which the double does not
        have: it is looked up in `commands` (else used as it stands) and never rewritten, so the
        host's interpreter stays itself wherever it is installed. The arguments are the pod's: a
        path inside one of its mounts becomes the volume's directory; nothing else is touched."""
        argv = list(container.get("command") or []) + list(container.get("args") or [])
        if not argv:
            return []
        executable = self.commands.get(argv[0], [argv[0]])
        return executable + [self._inside(arg, mounts) for arg in argv[1:]]

    @staticmethod
    def _inside(arg: str, mounts: dict[str, Path]) -> str:
        """A pod path under a mountPath -> the volume's directory here (the longest mountPath wins)."""
        for mount_path in sorted(mounts, key=len, reverse=True):
            root = mount_path.rstrip("/")
            if arg == mount_path or arg.startswith(root + "/"):
                return str(mounts[mount_path]) + arg[len(root):]
        return arg
