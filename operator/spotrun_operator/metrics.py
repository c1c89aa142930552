"""The operator's Prometheus metrics, and the HTTP endpoint that serves them.

What an on-call engineer needs to see: how long reconcile passes take, how often groups
restart and why, how old each job's latest checkpoint is (the work a preemption would
cost now), and a heartbeat that stops moving when the operator's event loop or its
watches stall (nolar/kopf#1276), which the liveness probe alone may not catch.
"""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RECONCILE_SECONDS = Histogram(
    "spotrun_reconcile_duration_seconds",
    "Duration of one reconcile pass of a TrainJob.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "spotrun_reconcile_errors_total",
    "Reconcile passes that raised; the pass is retried with backoff.",
    ["reason"],
    registry=REGISTRY,
)
RESTARTS = Counter(
    "spotrun_group_restarts_total",
    "Group restarts (attempt bumps after an interruption), by the interruption's kind and reason.",
    ["kind", "reason"],
    registry=REGISTRY,
)
STATUS_WRITES = Counter(
    "spotrun_status_writes_total",
    "TrainJob status writes, by outcome (written, conflict).",
    ["outcome"],
    registry=REGISTRY,
)
API_CALLS = Counter(
    "spotrun_api_calls_total",
    "Kubernetes API calls the operator made (reads of kopf's watches excluded), by call.",
    ["call"],
    registry=REGISTRY,
)
CHECKPOINT_AGE = Gauge(
    "spotrun_checkpoint_age_seconds",
    "Seconds since the latest committed checkpoint of a running TrainJob.",
    ["namespace", "job"],
    registry=REGISTRY,
)
JOBS = Gauge(
    "spotrun_trainjobs",
    "TrainJobs reconciled by this operator, by state.",
    ["state"],
    registry=REGISTRY,
)
HEARTBEAT = Gauge(
    "spotrun_operator_heartbeat_timestamp_seconds",
    "Last time (seconds since the epoch) the operator's event loop ticked.",
    registry=REGISTRY,
)
WATCH_EVENT = Gauge(
    "spotrun_operator_last_watch_event_timestamp_seconds",
    "Last time (seconds since the epoch) a watched pod, StatefulSet or TrainJob event arrived.",
    registry=REGISTRY,
)


def serve(address: str) -> None:
    """Serves /metrics on `address` (host:port) in a background thread."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0", registry=REGISTRY)


def forget_job(namespace: str, job: str) -> None:
    with contextlib.suppress(KeyError):
        CHECKPOINT_AGE.remove(namespace, job)
