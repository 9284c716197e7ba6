"""Operator settings, from the environment (the Helm chart sets these on the Deployment).

GRPO_WATCH_NAMESPACES  comma-separated namespace names (no globs: those need namespace scanning,
                       which is off); empty: all namespaces (cluster-wide)
GRPO_LOG_LEVEL         DEBUG, INFO (default), WARNING, ERROR
GRPO_HEALTH_PORT       http://0.0.0.0:PORT/healthz (liveness) and /readyz (jobs are served: the CRD
                       is there) (default 8080; 0: off)
GRPO_METRICS_PORT      Prometheus text at http://0.0.0.0:PORT/metrics (default 0: off)
GRPO_RUNTIME_IMAGE     the training image when a job sets no spec.image
GRPO_S3_ENDPOINT       spec.output.endpoint for jobs that set none (MinIO and friends)
GRPO_MODEL_CACHE       spec.model.cache for jobs that set none: a PersistentVolumeClaim name that
                       exists in the jobs' namespaces (empty: no cache, downloads per pod)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone

DEFAULT_RUNTIME_IMAGE = "ghcr.io/grpo-dev/grpo-runtime:0.1.0"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(ValueError):
    """An environment variable the operator cannot use; the message names it."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True)
class Settings:
    namespaces: tuple[str, ...] = ()
    log_level: str = "INFO"
    health_port: int = 8080
    metrics_port: int = 0
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    s3_endpoint: str | None = None
    model_cache: str | None = None
    # Not from the environment: tests give a clock that follows the (fake) event-loop time.
    clock: Callable[[], datetime] = field(default=utcnow, compare=False)

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str | None:
        return f"http://0.0.0.0:{self.health_port}/healthz" if self.health_port else None

    @property
    def readiness_endpoint(self) -> str | None:
        return f"http://0.0.0.0:{self.health_port}/readyz" if self.health_port else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        namespaces = tuple(ns.strip() for ns in env.get("GRPO_WATCH_NAMESPACES", "").split(",") if ns.strip())
        level = env.get("GRPO_LOG_LEVEL", "INFO").strip().upper() or "INFO"
        if level not in LOG_LEVELS:
            raise SettingsError(f"GRPO_LOG_LEVEL: must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
        return cls(
            namespaces=namespaces,
            log_level=level,
            health_port=_port(env, "GRPO_HEALTH_PORT", 8080),
            metrics_port=_port(env, "GRPO_METRICS_PORT", 0),
            runtime_image=env.get("GRPO_RUNTIME_IMAGE", "").strip() or DEFAULT_RUNTIME_IMAGE,
            s3_endpoint=env.get("GRPO_S3_ENDPOINT", "").strip() or None,
            model_cache=env.get("GRPO_MODEL_CACHE", "").strip() or None,
        )

    @property
    def logging_level(self) -> int:
        return getattr(logging, self.log_level)


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        port = int(text)
    except ValueError:
        raise SettingsError(f"{name}: must be a port number (0 turns it off), got {text!r}") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}: must be between 0 and 65535, got {port}")
    return port
