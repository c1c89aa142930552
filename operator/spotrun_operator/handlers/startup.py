"""Operator start-up: kopf's settings, the API client, metrics, and the shared state.

kopf's persistence keys (finalizer, progress and diff-base annotations) are namespaced
under spotrun.dev here, from the first release: changing them later would make kopf
treat every existing TrainJob as new. Watch timeouts are set because a watch can stall
silently (nolar/kopf#1276); the server closes each watch after `server_timeout` and
kopf re-lists, and the client gives up on a silent connection after `client_timeout`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from typing import Any

import kopf
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration

from spotrun_operator import metrics, names
from spotrun_operator.apply import Api
from spotrun_operator.config import Config, Shared

log = logging.getLogger(__name__)

# The API server parses timeoutSeconds as an integer.
WATCH_SERVER_TIMEOUT = 300
WATCH_CLIENT_TIMEOUT = 330.0
WATCH_CONNECT_TIMEOUT = 30.0
HEARTBEAT_SECONDS = 10.0
API_THREADS = 32


def configure(settings: kopf.OperatorSettings, config: Config, *, peering: str | None) -> None:
    """Sets kopf's settings for spotrun (see the module docstring)."""
    settings.persistence.finalizer = names.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=names.PERSISTENCE_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=names.PERSISTENCE_PREFIX, key="last-handled-configuration"
    )
    settings.watching.server_timeout = WATCH_SERVER_TIMEOUT
    settings.watching.client_timeout = WATCH_CLIENT_TIMEOUT
    settings.watching.connect_timeout = WATCH_CONNECT_TIMEOUT
    settings.posting.reporting_component = "spotrun-operator"
    settings.posting.loggers = False  # only the events the loop posts on transitions
    # A finished daemon's object must not be re-handled; a daemon that crashed is
    # restarted by kopf after this backoff (the loop itself catches errors per pass).
    settings.background.cancellation_polling = 5
    if peering:
        settings.peering.name = peering
        settings.peering.clusterwide = True
        settings.peering.mandatory = True
    else:
        settings.peering.standalone = True


def api_client() -> ApiClient:
    """An API client from KUBECONFIG (or ~/.kube/config), else the pod's ServiceAccount."""
    configuration = Configuration()
    try:
        kube_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except (kube_config.ConfigException, FileNotFoundError, TypeError):
        kube_config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    # The loops of many jobs call the API at once from worker threads.
    configuration.connection_pool_maxsize = 32
    return ApiClient(configuration)


async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: Config = memo.get("config") or Config()
    configure(settings, config, peering=memo.get("peering"))
    # API calls run in worker threads (apply.Api); they mostly wait on the network, so
    # many jobs restarting at once need more threads than the default (CPUs + 4).
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(API_THREADS, thread_name_prefix="spotrun-api")
    )
    memo["shared"] = Shared(config=config, api=Api(api_client()))
    if config.metrics_address:
        metrics.serve(config.metrics_address)
        log.info("serving metrics on http://%s/metrics", config.metrics_address)
    memo["heartbeat"] = asyncio.create_task(_heartbeat(), name="spotrun heartbeat")


async def stop(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("heartbeat")
    if isinstance(task, asyncio.Task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _heartbeat() -> None:
    """Moves the heartbeat gauge while the event loop is responsive."""
    while True:
        metrics.HEARTBEAT.set(time.time())
        await asyncio.sleep(HEARTBEAT_SECONDS)


def probe(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    """kopf's liveness endpoint: answers while the event loop runs; reports the loops' pulse."""
    shared: Shared | None = memo.get("shared")
    if shared is None:
        return {"started": False}
    return {
        "started": True,
        "trainjobs": sum(shared.states.values()),
        "lastReconcileSecondsAgo": round(time.time() - shared.last_pass, 1)
        if shared.last_pass
        else None,
    }
