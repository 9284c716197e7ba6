"""`grpo operator`: run the kopf operator with settings from the environment (settings.py)."""

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

    import kopf

    import grpo_operator.handlers  # noqa: F401  (registers the handlers)
    from grpo_operator.metrics import Metrics

    metrics = Metrics()
    if settings.metrics_port:
        metrics.serve(settings.metrics_port)
        log.info("metrics at http://0.0.0.0:%d/metrics", settings.metrics_port)
    scope = "all namespaces" if settings.clusterwide else ", ".join(settings.namespaces)
    log.info("watching GRPOJobs in %s; runtime image %s", scope, settings.runtime_image)
    kopf.run(
        clusterwide=settings.clusterwide,
        namespaces=settings.namespaces,
        standalone=True,  # one replica (the chart's Deployment); no KopfPeering objects needed
        liveness_endpoint=settings.liveness_endpoint,
        memo=kopf.Memo(settings=settings, metrics=metrics),
    )
    return 0
