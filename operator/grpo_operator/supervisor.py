"""The operator process: kopf runs while the GRPOJob CRD is there, and waits while it is not.

kopf resolves the resources it serves when it starts; a CRD that appears later is not
served, and a watch on a CRD that is deleted ends in a 404 that stops kopf. So the
supervisor, not kopf, owns the CRD: it watches the one CRD grpojobs.grpo.dev (list + watch
with a metadata.name field selector, so RBAC may name it), asks readiness.crd_readiness()
whether jobs can be served, starts kopf when they can and stops it (gracefully, through
kopf's stop flag) as soon as they cannot, before the API server stops serving the resource.
A CRD deleted and installed again is simply served again; the jobs resume from their status.

Kueue, likewise, may be installed after the operator, upgraded (v0.16+ serves v1beta2 and
deprecates v1beta1) or removed. Before each kopf run the supervisor asks API discovery which
versions of kueue.x-k8s.io are served, and kueue.workload_version() picks the one to speak
(v1beta2 where served, else v1beta1, else none: no Workload watch). It asks again every
KUEUE_DISCOVERY_SECONDS (discovery needs no RBAC); when the answer changes, kopf is stopped and
started again with the new version, as for a CRD change.

Health, on GRPO_HEALTH_PORT: /healthz answers 200 while this process runs (the liveness
probe: a restart would not bring a CRD); /readyz answers 200 only while jobs are served, 503
with the reason otherwise (the readiness probe; `kubectl get pods` shows the operator not
ready until its CRD is installed).

Signals: SIGTERM and SIGINT stop kopf gracefully (its cleanup closes the API client after the
last reconcile) and then this loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes.aio import client

from grpo_operator import kube
from grpo_operator.readiness import CRD_NAME, Readiness, crd_readiness
from grpo_operator.settings import Settings

log = logging.getLogger("grpo_operator")

RETRY_SECONDS = 2.0  # after a failed list/watch of the CRD, or before restarting a failed kopf
MAX_RETRY_SECONDS = 60.0  # the longest wait between restarts of a kopf that keeps failing
WATCH_SECONDS = 240  # the server ends each CRD watch after this long; it is then listed again
KUEUE_DISCOVERY_SECONDS = 30.0  # how late Kueue installed, upgraded or removed may be noticed, at most


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        memo: Any,
        *,
        stop: asyncio.Event | None = None,
        handle_signals: bool = False,
        connect: Callable[[], Awaitable[client.ApiClient]] = kube.connect,
    ):
        self.settings, self.memo = settings, memo
        self.stopping = stop or asyncio.Event()
        self.handle_signals = handle_signals
        self.connect = connect
        self.readiness: Readiness = crd_readiness(None)
        self.serving = False  # kopf is up and watching GRPOJobs
        self.starts = 0  # kopf runs started (a CRD reinstall starts another)
        self.failures = 0  # kopf runs that ended on an error in a row (the restart backs off)
        self._changed = asyncio.Event()
        self._list_version: str | None = None
        self.kueue_version: str | None = None  # kueue.workload_version() of the last discovery

    @property
    def ready(self) -> bool:
        return self.serving and self.readiness.ready

    def stop(self) -> None:
        self.stopping.set()
        self._changed.set()

    # ---- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        if self.handle_signals:
            self._install_signal_handlers()
        api = await self.connect()
        # Both long-lived tasks exist before kopf first starts: kopf's shutdown cancels every task
        # created while it ran, and these must outlive each kopf run.
        watcher = asyncio.create_task(self._watch_crd(api), name="GRPOJob CRD watcher")
        kueue_watcher = asyncio.create_task(self._watch_kueue(api), name="Kueue discovery")
        health = await self._serve_health()
        stop_waiter = asyncio.create_task(self._relay_stop(), name="stop relay")
        try:
            while not self.stopping.is_set():
                if self.readiness.ready:
                    await self._serve_jobs(api)
                else:
                    await self._wait_for_change()
        finally:
            for task in (watcher, kueue_watcher, stop_waiter):
                task.cancel()
            await asyncio.gather(watcher, kueue_watcher, stop_waiter, return_exceptions=True)
            if health is not None:
                await health.cleanup()
            await api.close()
            log.info("stopped")

    async def _relay_stop(self) -> None:
        await self.stopping.wait()
        self._changed.set()

    async def _wait_for_change(self, task: asyncio.Task[Any] | None = None) -> None:
        self._changed.clear()
        waiter = asyncio.ensure_future(self._changed.wait())
        try:
            await asyncio.wait({waiter, task} if task else {waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    async def _serve_jobs(self, api: client.ApiClient) -> None:
        """One kopf run: from the CRD being ready until it is not, a stop, or kopf's own end."""
        import kopf

        from grpo_operator import handlers

        stop_kopf, started = asyncio.Event(), asyncio.Event()
        settings = self.settings
        self.starts += 1
        with contextlib.suppress(kube.APIError):  # else the last answer stands
            self.kueue_version = await self._discover_kueue(api)
        kueue_version = self.memo["kueue_version"] = self.kueue_version
        kopf_run = asyncio.create_task(kopf.operator(
            registry=handlers.registry(kueue_version=kueue_version),
            clusterwide=settings.clusterwide,
            namespaces=list(settings.namespaces),
            standalone=True,  # one replica (the chart's Deployment); no KopfPeering objects needed
            settings=kopf.OperatorSettings(),
            memo=self.memo,
            stop_flag=stop_kopf,
            ready_flag=started,
        ), name="kopf")
        started_waiter = asyncio.ensure_future(started.wait())
        await asyncio.wait({kopf_run, started_waiter}, return_when=asyncio.FIRST_COMPLETED)
        started_waiter.cancel()
        if self.handle_signals:
            self._install_signal_handlers()  # kopf installed its own; the supervisor stops kopf itself
        self.serving = started.is_set() and not kopf_run.done()
        if self.serving:
            scope = "all namespaces" if settings.clusterwide else ", ".join(settings.namespaces)
            kueue_note = f"Kueue {kueue_version}" if kueue_version else "no Kueue"
            log.info("serving GRPOJobs in %s (%s; %s)", scope, self.readiness.message, kueue_note)
        while (self.readiness.ready and not self.stopping.is_set() and not kopf_run.done()
               and self.kueue_version == kueue_version):
            await self._wait_for_change(kopf_run)
        self.serving = False

        asked = not kopf_run.done()
        stop_kopf.set()
        try:
            await kopf_run
        except Exception as exc:  # kopf ended on an error (a 404 if the CRD vanished under it)
            self._observe(await self._read_crd(api))
            if self.readiness.ready and not self.stopping.is_set():
                self.failures += 1
                delay = min(MAX_RETRY_SECONDS, RETRY_SECONDS * 2 ** (self.failures - 1))
                log.error("the operator's watch stopped on an error (%s); restarting it in %.0f s", exc, delay)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
            return
        self.failures = 0
        if not asked and not self.stopping.is_set():
            self.stop()  # kopf stopped by itself: a signal reached kopf's handler before ours
        elif not self.stopping.is_set() and not self.readiness.ready:
            log.warning("stopped serving GRPOJobs: %s", self.readiness.message)

    async def _discover_kueue(self, api: client.ApiClient) -> str | None:
        """The Kueue version to speak now (kueue.workload_version() of API discovery)."""
        from grpo_operator import kueue

        return kueue.workload_version(await kube.kueue_discovery(api))

    async def _watch_kueue(self, api: client.ApiClient) -> None:
        """Every KUEUE_DISCOVERY_SECONDS, discover Kueue again; a change restarts kopf (see _serve_jobs)."""
        while True:
            await asyncio.sleep(KUEUE_DISCOVERY_SECONDS)
            try:
                version = await self._discover_kueue(api)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server restarting: ask again next time
                log.debug("Kueue discovery failed: %s", exc)
                continue
            if version != self.kueue_version:
                log.info("Kueue's Workloads are now served in %s (before: %s): restarting the watches",
                         version or "no version", self.kueue_version or "none")
                self.kueue_version = version
                self._changed.set()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    # ---- the CRD ---------------------------------------------------------------------------------

    def _observe(self, crd: dict[str, Any] | None) -> None:
        readiness = crd_readiness(crd)
        if readiness != self.readiness:
            level = logging.INFO if readiness.ready else logging.WARNING
            log.log(level, "%s: %s", readiness.reason, readiness.message)
            self.readiness = readiness
            self._changed.set()

    async def _read_crd(self, api: client.ApiClient) -> dict[str, Any] | None:
        extensions = client.ApiextensionsV1Api(api)
        response = await extensions.list_custom_resource_definition_without_preload_content(
            field_selector=f"metadata.name={CRD_NAME}"
        )
        body = json.loads(await response.read() or b"{}")
        if response.status != 200:
            raise kube.APIError(f"list CustomResourceDefinition {CRD_NAME}: HTTP {response.status} "
                                f"{body.get('message', '')}")
        items = body.get("items") or []
        self._list_version = (body.get("metadata") or {}).get("resourceVersion")
        return items[0] if items else None

    async def _watch_crd(self, api: client.ApiClient) -> None:
        """Keep self.readiness current: list the CRD, then watch it from there; again on any end."""
        extensions = client.ApiextensionsV1Api(api)
        while True:
            try:
                self._observe(await self._read_crd(api))
                response = await extensions.list_custom_resource_definition_without_preload_content(
                    field_selector=f"metadata.name={CRD_NAME}", watch=True,
                    resource_version=self._list_version, timeout_seconds=WATCH_SECONDS,
                    _request_timeout=WATCH_SECONDS + 30,
                )
                try:
                    if response.status != 200:
                        raise kube.APIError(f"watch CustomResourceDefinition {CRD_NAME}: HTTP {response.status}")
                    async for line in response.content:  # an aiohttp response: a stream of lines
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event.get("type") == "ERROR":
                            break  # e.g. 410 Gone: list again
                        self._observe(None if event.get("type") == "DELETED" else event.get("object"))
                finally:
                    response.release()
            except asyncio.CancelledError:
                raise
            except aiohttp.ClientPayloadError as exc:  # the server cut the stream short: list again
                log.debug("the watch of CustomResourceDefinition %s ended: %s", CRD_NAME, exc)
            except Exception as exc:  # the API server restarting, RBAC missing, ...: keep trying
                log.warning("cannot watch CustomResourceDefinition %s: %s", CRD_NAME, exc)
            await asyncio.sleep(RETRY_SECONDS)

    # ---- health ----------------------------------------------------------------------------------

    async def _serve_health(self) -> Any:
        if not self.settings.health_port:
            return None
        from aiohttp import web

        async def healthz(_: web.Request) -> web.Response:
            return web.json_response({"alive": True, "ready": self.ready})

        async def readyz(_: web.Request) -> web.Response:
            readiness = self.readiness
            if self.ready:
                return web.json_response({"ready": True, "reason": readiness.reason, "message": readiness.message})
            reason, message = (readiness.reason, readiness.message) if not readiness.ready else (
                "Starting", "the CRD is established; the operator is starting to watch GRPOJobs")
            return web.json_response({"ready": False, "reason": reason, "message": message}, status=503)

        app = web.Application()
        app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz)])
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "0.0.0.0", self.settings.health_port).start()
        log.info("health at http://0.0.0.0:%d/healthz, readiness at /readyz", self.settings.health_port)
        return runner
