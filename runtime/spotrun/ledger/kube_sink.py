"""The CheckpointSink of pods run by the operator: rank 0 writes the TrainJob's status itself.

Why a hand-written HTTP client: the runtime image must not need the `kubernetes` package
(an extra of the operator), and the sink makes one kind of request, a JSON patch of the
status subresource, so the standard library (urllib + ssl) is enough.

Why a JSON patch: the pod's ServiceAccount may only `patch` its own job's status (no
`get`), so it cannot read, check and write. The fence therefore travels inside the
request: a `test` of `/status/attempt` (spotrun.ledger.status.json_patch) makes the API server
refuse the whole patch when the group was restarted meanwhile, and a CEL transition rule
on the CRD refuses a `latestCheckpoint.seq` lower than the recorded one (unless it names
the one it replaces in `fellBackFrom`: a resume that fell back past a corrupt checkpoint). Both come back
as HTTP 422 and become `spotrun.ledger.status.FencingError`. Transient failures (connection
errors, 429, 5xx) are retried with backoff; anything else is a KubeSinkError that says
what the API server answered.
"""

from __future__ import annotations

import json
import logging
import os
import random
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spotrun.ledger.retention import Retention
from spotrun.ledger.status import (
    FencingError,
    commit_fields,
    completion,
    json_patch,
    peer_report,
    progress_fields,
    resumed_fields,
)
from spotrun.lifecycle.times import format_time
from spotrun.store.manifest import Commit

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP = "spotrun.dev"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
CHECKPOINT_CORRUPT = "CheckpointCorrupt"
LEDGER_REPAIRED = "LedgerRepaired"
# A CheckpointCorrupt condition is looked for among the first few conditions only: the
# operator writes at most five types, so this bounds the search with room to spare.
MAX_CONDITIONS = 16
# Transient answers: the API server is restarting, overloaded or throttling us.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class KubeSinkError(RuntimeError):
    """The API server refused a status write for a reason other than the fence."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Answer:
    """One HTTP answer of the API server: its status code and decoded body."""

    status: int
    body: dict[str, Any]

    @property
    def message(self) -> str:
        return str(self.body.get("message") or self.body)


class KubernetesSink:
    """Records the runtime's status fields in TrainJob `name`, fenced by `attempt`.

    `token` is the bearer token, or `token_file` a file to read it from before every
    request (projected ServiceAccount tokens rotate). `ca_file` or `ca_data` (PEM) is
    the CA that signed the API server's certificate; neither means the system's CAs.
    """

    def __init__(
        self,
        *,
        server: str,
        job: str,
        namespace: str,
        attempt: int,
        token: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        ca_data: str | None = None,
        retries: int = 6,
        backoff_seconds: float = 0.5,
        timeout_seconds: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if token is None and token_file is None:
            raise ValueError("KubernetesSink needs a token or a token_file")
        self.server = server.rstrip("/")
        self.job = job
        self.namespace = namespace
        self.attempt = attempt
        self._token = token
        self._token_file = token_file
        self._context = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
        self._retries = retries
        self._backoff = backoff_seconds
        self._timeout = timeout_seconds
        self._sleep = sleep
        ns, name = (urllib.parse.quote(part, safe="") for part in (namespace, job))
        self.url = f"{self.server}/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{name}/status"

    # -- the CheckpointSink protocol ---------------------------------------------------

    def record(
        self, commit: Commit, retention: Retention, entries: Sequence[Mapping[str, Any]]
    ) -> None:
        fields = commit_fields({}, commit, retention, entries)
        self._patch(json_patch({}, self.attempt, fields))

    def progress(
        self,
        metrics: Mapping[str, Any],
        step: int,
        time: float,
        memory: Mapping[str, Any] | None = None,
        honoured: bool = False,
    ) -> None:
        fields = progress_fields(metrics, step, time, memory, self.attempt if honoured else None)
        self._patch(json_patch({}, self.attempt, fields))

    def restored(self, restored: Mapping[str, Any]) -> None:
        self._patch(json_patch({}, self.attempt, {"restoredFrom": dict(restored)}))

    def completed(self, step: int, time: float) -> None:
        fields = {"completion": completion(self.attempt, step, time)}
        self._patch(json_patch({}, self.attempt, fields))

    def peers_lost(self, by: int, nodes: Sequence[int], time: float) -> None:
        # A merge patch: it adds this member's entry to the map without replacing the
        # others' (a JSON patch must create the map first, and two members creating it at
        # once would lose one report). The entry carries its attempt instead of a fence.
        entry = peer_report(self.attempt, nodes, time)
        answer = self._send({"status": {"peerReports": {str(by): entry}}}, MERGE_PATCH)
        if answer.status >= 300:
            self._raise(answer)

    def checkpoint_corrupt(self, message: str, time: float) -> None:
        self._set_condition(CHECKPOINT_CORRUPT, "FellBack", message, time)

    def resumed(
        self,
        commit: Commit,
        retention: Retention,
        entries: Sequence[Mapping[str, Any]],
        *,
        replaced: str | None,
        reason: str,
        message: str,
        time: float,
    ) -> None:
        # One patch for the lists and the latest: the CRD lets latestCheckpoint go back
        # only when its fellBackFrom names the one it replaces.
        self._patch(
            json_patch({}, self.attempt, resumed_fields(commit, retention, entries, replaced))
        )
        type_ = CHECKPOINT_CORRUPT if reason == "FellBack" else LEDGER_REPAIRED
        self._set_condition(type_, reason, message, time)

    def _set_condition(self, type_: str, reason: str, message: str, time: float) -> None:
        """Sets condition `type_`=True, keeping the list free of duplicates.

        The sink cannot read the conditions, and a JSON patch addresses list items by
        index, so it appends first; the CRD declares conditions a map keyed by type, so
        an append of a second one of a type is refused, and the sink then finds the
        existing one by testing each index's type, and rewrites it in place.
        """
        condition = {
            "type": type_,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": format_time(time),
        }
        fence: dict[str, Any] = {"op": "test", "path": "/status/attempt", "value": self.attempt}
        first = self._send(
            [fence, {"op": "add", "path": "/status/conditions/-", "value": condition}]
        )
        if first.status < 300:
            return
        self._raise_unless_422(first)
        self._check_fence()
        for i in range(MAX_CONDITIONS):
            item = f"/status/conditions/{i}"
            is_ours: dict[str, Any] = {"op": "test", "path": f"{item}/type", "value": type_}
            # Already True: only the reason and message change; lastTransitionTime stays.
            already_true: dict[str, Any] = {"op": "test", "path": f"{item}/status", "value": "True"}
            reword: list[dict[str, Any]] = [
                {"op": "replace", "path": f"{item}/reason", "value": condition["reason"]},
                {"op": "replace", "path": f"{item}/message", "value": message},
            ]
            for ops in (
                [fence, is_ours, already_true, *reword],
                [fence, is_ours, {"op": "replace", "path": item, "value": condition}],
            ):
                answer = self._send(ops)
                if answer.status < 300:
                    return
                self._raise_unless_422(answer)
        # No conditions list at all (the operator has not written one yet): create it.
        answer = self._send(
            [fence, {"op": "add", "path": "/status/conditions", "value": [condition]}]
        )
        if answer.status >= 300:
            self._raise(answer)

    # -- HTTP ----------------------------------------------------------------------------

    def _patch(self, ops: list[dict[str, Any]]) -> None:
        answer = self._send(ops)
        if answer.status >= 300:
            self._raise(answer)

    def _check_fence(self) -> None:
        """Raises FencingError if status.attempt is not ours (a test-only patch writes nothing)."""
        answer = self._send([{"op": "test", "path": "/status/attempt", "value": self.attempt}])
        if answer.status >= 300:
            self._raise(answer)

    def _raise_unless_422(self, answer: Answer) -> None:
        if answer.status != 422:
            self._raise(answer)

    def _raise(self, answer: Answer) -> None:
        if answer.status == 422:
            raise FencingError(
                f"the API server refused the status write of TrainJob "
                f"{self.namespace}/{self.job} for attempt {self.attempt}: {answer.message} "
                "(the group was restarted as a newer attempt, or the recorded checkpoint would go back)"
            )
        hint = {
            401: "the ServiceAccount token is not valid (expired or revoked)",
            403: "the pod's ServiceAccount may only patch the status of its own TrainJob",
            404: "the TrainJob does not exist (deleted?)",
        }.get(answer.status, "unexpected answer")
        raise KubeSinkError(
            f"PATCH {self.url} answered HTTP {answer.status} ({hint}): {answer.message}",
            answer.status,
        )

    def _send(self, ops: list[dict[str, Any]] | dict[str, Any], kind: str = JSON_PATCH) -> Answer:
        """PATCHes `ops` (a JSON patch, or a merge patch with `kind`); retries transient failures."""
        data = json.dumps(ops).encode()
        failure = ""
        for attempt in range(self._retries + 1):
            if attempt:
                # Full jitter: the ranks of many jobs hit one API server after an outage.
                self._sleep(random.uniform(0, self._backoff * 2 ** (attempt - 1)))
            request = urllib.request.Request(self.url, data=data, method="PATCH")
            request.add_header("Content-Type", kind)
            request.add_header("Accept", "application/json")
            request.add_header("Authorization", f"Bearer {self._bearer()}")
            try:
                with urllib.request.urlopen(
                    request, context=self._context, timeout=self._timeout
                ) as response:
                    return Answer(response.status, _decode(response.read()))
            except urllib.error.HTTPError as err:
                answer = Answer(err.code, _decode(err.read()))
                if err.code not in RETRY_STATUSES:
                    return answer
                failure = f"HTTP {err.code}: {answer.message}"
            except (urllib.error.URLError, OSError) as err:
                failure = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            log.warning("status write to %s failed (%s); retrying", self.url, failure)
        raise KubeSinkError(f"PATCH {self.url} failed {self._retries + 1} times; last: {failure}")

    def _bearer(self) -> str:
        if self._token_file is not None:
            with open(self._token_file) as f:
                return f.read().strip()
        assert self._token is not None
        return self._token


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except json.JSONDecodeError:
        return {"message": raw.decode(errors="replace")[:500]}
    return body if isinstance(body, dict) else {"message": str(body)}


def from_pod(
    job: str,
    namespace: str,
    attempt: int,
    job_root: str,
    *,
    environ: Mapping[str, str] | None = None,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> KubernetesSink:
    """The sink of a pod: in-cluster API address, ServiceAccount token and CA.

    `job_root` is part of the factory signature of spotrun.ledger.sink.make_sink and unused here:
    the status lives in the TrainJob, not in the bucket.
    """
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise KubeSinkError(
            "SPOTRUN_STATUS_SINK=kubernetes needs the in-cluster API address, but "
            "KUBERNETES_SERVICE_HOST is not set: run inside a pod, or choose another sink"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    token_file = os.path.join(service_account_dir, "token")
    if not os.path.exists(token_file):
        raise KubeSinkError(
            f"no ServiceAccount token at {token_file}: the pod needs "
            "automountServiceAccountToken (the operator sets it)"
        )
    return KubernetesSink(
        server=f"https://{host}:{port}",
        job=job,
        namespace=namespace,
        attempt=attempt,
        token_file=token_file,
        ca_file=os.path.join(service_account_dir, "ca.crt"),
    )
