"""How a pod's launcher follows the status: the job's status.json, or the TrainJob itself.

The launcher must learn of the next group within a second of the decision, so a survivor's
workers stop waiting and re-form. In local mode (and for buckets) the status is a file,
polled: a stat and, when it changed, a read. On Kubernetes the pod's ServiceAccount may
get, list and watch its own TrainJob (resourceNames, so a `metadata.name` field selector),
and the launcher holds one watch open: one connection per pod, an event per status write.
Standard library only, like the Kubernetes sink: the runtime image needs no client package.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from spotrun.ledger import kube_sink
from spotrun.ledger.sink import read_status_file, status_file
from spotrun.store import storage

log = logging.getLogger("spotrun.membership")

StatusCallback = Callable[[Mapping[str, Any]], None]


class StatusFeed(Protocol):
    """A source of the job's status, as it changes."""

    def follow(self, callback: StatusCallback, stop: threading.Event) -> None:
        """Calls `callback(status)` on every change until `stop` is set (runs in a thread)."""


class FileFeed:
    """status.json, polled (a local file costs a stat; a bucket object a request)."""

    def __init__(self, job_root: str, interval: float = 0.1) -> None:
        self.url = status_file(job_root)
        self.local = storage.local_path(self.url)
        self.interval = interval if self.local else max(interval, 1.0)

    def follow(self, callback: StatusCallback, stop: threading.Event) -> None:
        last: Any = None
        while not stop.is_set():
            try:
                mark = os.stat(self.local).st_mtime_ns if self.local else None
                if mark is None or mark != last:
                    status = read_status_file(self.url)
                    last = mark
                    callback(status)
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as err:
                log.warning("cannot read %s: %s", self.url, err)
            stop.wait(self.interval)


class KubeFeed:
    """The TrainJob's status through a watch of the job itself (list, then watch from there)."""

    def __init__(
        self,
        *,
        server: str,
        job: str,
        namespace: str,
        token_file: str,
        ca_file: str | None,
        timeout_seconds: int = 300,
    ) -> None:
        self.token_file = token_file
        self.context = ssl.create_default_context(cafile=ca_file)
        ns = urllib.parse.quote(namespace, safe="")
        self.base = (
            f"{server.rstrip('/')}/apis/{kube_sink.GROUP}/{kube_sink.VERSION}/namespaces/{ns}/"
            f"{kube_sink.PLURAL}"
        )
        self.selector = urllib.parse.quote(f"metadata.name={job}", safe="")
        self.timeout_seconds = timeout_seconds

    def follow(self, callback: StatusCallback, stop: threading.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                version = self._list(callback)
                for event in self._watch(version):
                    if stop.is_set():
                        return
                    obj = event.get("object") or {}
                    if event.get("type") in ("ADDED", "MODIFIED"):
                        callback(obj.get("status") or {})
                    elif event.get("type") == "ERROR":
                        break  # 410 Gone and the like: list again
                backoff = 0.5
            except (OSError, ValueError, urllib.error.URLError) as err:
                log.warning("watching the TrainJob failed (%s); again in %.1fs", err, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    def _request(self, query: str, timeout: float) -> Any:
        request = urllib.request.Request(f"{self.base}?fieldSelector={self.selector}&{query}")
        with open(self.token_file) as handle:
            request.add_header("Authorization", f"Bearer {handle.read().strip()}")
        request.add_header("Accept", "application/json")
        return urllib.request.urlopen(request, context=self.context, timeout=timeout)

    def _list(self, callback: StatusCallback) -> str:
        with self._request("limit=1", 30) as response:
            body = json.loads(response.read())
        for item in body.get("items") or []:
            callback(item.get("status") or {})
        return str((body.get("metadata") or {}).get("resourceVersion", ""))

    def _watch(self, version: str) -> Iterator[dict[str, Any]]:
        query = f"watch=1&resourceVersion={version}&timeoutSeconds={self.timeout_seconds}"
        with self._request(query, self.timeout_seconds + 30) as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)


def feed_for(
    sink: str | None,
    *,
    job_root: str,
    job: str,
    namespace: str,
    environ: Mapping[str, str] | None = None,
) -> StatusFeed | None:
    """The feed matching the pod's status sink (SPOTRUN_STATUS_SINK), or None for `none`."""
    env = os.environ if environ is None else environ
    kind = sink or "file"
    if kind == "file":
        return FileFeed(job_root)
    if kind == "kubernetes":
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            return None
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        account = kube_sink.SERVICE_ACCOUNT_DIR
        return KubeFeed(
            server=f"https://{host}:{port}",
            job=job,
            namespace=namespace,
            token_file=os.path.join(account, "token"),
            ca_file=os.path.join(account, "ca.crt"),
        )
    return None


def wait_until(
    feed: StatusFeed, predicate: Callable[[Mapping[str, Any]], bool], timeout: float
) -> Mapping[str, Any] | None:
    """The first status for which `predicate` holds, within `timeout` seconds, else None."""
    found: list[Mapping[str, Any]] = []
    stop = threading.Event()

    def check(status: Mapping[str, Any]) -> None:
        if predicate(status):
            found.append(status)
            stop.set()

    thread = threading.Thread(target=feed.follow, args=(check, stop), daemon=True)
    thread.start()
    stop.wait(timeout)
    stop.set()
    return found[0] if found else None
