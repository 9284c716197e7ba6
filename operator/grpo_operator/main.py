"""`grpo operator`: run the operator (supervisor.py: kopf while the CRD is there) with settings from
the environment (settings.py)."""

from __future__ import annotations

import logging
import sys

from grpo_operator.settings import Settings, SettingsError

log = logging.getLogger("grpo_operator")


def run_operator() -> int:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"grpo operator: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.logging_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import asyncio

    import kopf

    from grpo_operator.metrics import Metrics
    from grpo_operator.supervisor import Supervisor

    metrics = Metrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
        log.info("metrics at http://0.0.0.0:%d/metrics", settings.metrics_port)
    scope = "all namespaces" if settings.clusterwide else ", ".join(settings.namespaces)
    log.info("watching GRPOJobs in %s; runtime image %s", scope, settings.runtime_image)
    supervisor = Supervisor(settings, kopf.Memo(settings=settings, metrics=metrics), handle_signals=True)
    asyncio.run(supervisor.run())
    return 0
