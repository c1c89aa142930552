"""kube_sink's HTTP behaviour: retries, error mapping, and one CheckpointCorrupt condition.

The server here is a stand-in that applies JSON patches to one object the way the API
server does for this CRD (test ops, a conditions list keyed by type, 422 on failure), so
that retry and probing logic can be pinned with exact request counts. The real API server,
RBAC and CEL rule are exercised in tests/cluster/test_operator_sink.py.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import jsonpatch
import pytest

from spotrun.ledger.kube_sink import KubernetesSink, KubeSinkError, from_pod
from spotrun.ledger.status import FencingError, in_memory


class Server(http.server.ThreadingHTTPServer):
    obj: dict[str, Any]
    requests: list[tuple[str, str, Any]]
    fail_next: list[int]


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server

    def log_message(self, *args: Any) -> None:
        pass

    def do_PATCH(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, self.headers["Authorization"], body))
        if self.server.fail_next:
            return self._answer(
                self.server.fail_next.pop(0), {"message": "etcdserver: leader changed"}
            )
        if not self.path.endswith("/trainjobs/demo/status"):
            return self._answer(403, {"message": "forbidden"})
        try:
            patched = jsonpatch.apply_patch(self.server.obj, body)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as err:
            return self._answer(422, {"message": str(err)})
        types = [c["type"] for c in patched.get("status", {}).get("conditions", [])]
        if len(types) != len(set(types)):
            return self._answer(422, {"message": "Duplicate value: map[type:CheckpointCorrupt]"})
        self.server.obj = patched
        self._answer(200, patched)

    def _answer(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server(("127.0.0.1", 0), Handler)
    srv.obj = {"status": {"attempt": 2, "conditions": [{"type": "Running", "status": "True"}]}}
    srv.requests, srv.fail_next = [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def sink(server: Server, attempt: int = 2, job: str = "demo", **kwargs: Any) -> KubernetesSink:
    host, port = server.server_address[:2]
    return KubernetesSink(
        server=f"http://{host}:{port}",
        token="t0k3n",
        job=job,
        namespace="ns",
        attempt=attempt,
        sleep=lambda _: None,
        **kwargs,
    )


def test_progress_is_a_fenced_json_patch(server: Server) -> None:
    sink(server).progress({"loss": 0.25}, 40, 1_700_000_000.0)
    path, auth, ops = server.requests[-1]
    assert path == "/apis/spotrun.dev/v1alpha1/namespaces/ns/trainjobs/demo/status"
    assert auth == "Bearer t0k3n"
    assert ops[0] == {"op": "test", "path": "/status/attempt", "value": 2}
    assert server.obj["status"]["lastMetrics"] == {
        "loss": 0.25,
        "step": 40,
        "time": "2023-11-14T22:13:20Z",
    }
    assert "inMemory" not in server.obj["status"]
    assert "noticeHonoured" not in server.obj["status"]


def test_progress_records_the_newest_step_held_in_memory(server: Server) -> None:
    held = in_memory(39, bucket=False, attempt=2, time=1_700_000_000.0)
    sink(server).progress({"loss": 0.25}, 40, 1_700_000_000.0, held)
    assert server.obj["status"]["inMemory"] == held
    assert server.obj["status"]["lastMetrics"]["step"] == 40


def test_the_last_report_of_a_notice_records_that_the_group_honoured_it(server: Server) -> None:
    sink(server).progress({"loss": 0.25}, 40, 1_700_000_000.0, honoured=True)
    assert server.obj["status"]["noticeHonoured"] == {
        "attempt": 2,
        "step": 40,
        "time": "2023-11-14T22:13:20Z",
    }
    assert server.obj["status"]["lastMetrics"]["step"] == 40


def test_an_older_attempt_is_refused_with_a_fencing_error(server: Server) -> None:
    with pytest.raises(FencingError, match="attempt 1"):
        sink(server, attempt=1).completed(10, 1_700_000_000.0)
    assert "completion" not in server.obj["status"]


def test_transient_errors_are_retried(server: Server) -> None:
    server.fail_next = [503, 500, 429]
    sink(server).completed(10, 1_700_000_000.0)
    assert len(server.requests) == 4
    assert server.obj["status"]["completion"]["step"] == 10


def test_retries_end_with_an_error_that_says_what_failed(server: Server) -> None:
    server.fail_next = [503] * 10
    with pytest.raises(KubeSinkError, match="failed 3 times; last: HTTP 503: etcdserver"):
        sink(server, retries=2).completed(10, 1_700_000_000.0)


def test_another_jobs_status_is_forbidden(server: Server) -> None:
    with pytest.raises(KubeSinkError, match="403") as err:
        sink(server, job="other").progress({}, 1, 1_700_000_000.0)
    assert err.value.status == 403
    assert len(server.requests) == 1  # not retried


def test_checkpoint_corrupt_keeps_a_single_condition(server: Server) -> None:
    s = sink(server)
    s.checkpoint_corrupt("ckpt-000004 failed its sha256 check", 1_700_000_000.0)
    s.checkpoint_corrupt("ckpt-000005 failed its sha256 check", 1_700_000_100.0)
    conditions = server.obj["status"]["conditions"]
    corrupt = [c for c in conditions if c["type"] == "CheckpointCorrupt"]
    assert len(corrupt) == 1
    assert corrupt[0]["message"] == "ckpt-000005 failed its sha256 check"
    # Still True: the transition time is the first one.
    assert corrupt[0]["lastTransitionTime"] == "2023-11-14T22:13:20Z"
    assert conditions[0] == {"type": "Running", "status": "True"}


def test_checkpoint_corrupt_of_an_older_attempt_is_fenced(server: Server) -> None:
    with pytest.raises(FencingError):
        sink(server, attempt=1).checkpoint_corrupt("bad", 1_700_000_000.0)


def test_token_file_is_read_for_every_request(server: Server, tmp_path: Any) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    host, port = server.server_address[:2]
    s = KubernetesSink(
        server=f"http://{host}:{port}", token_file=str(token), job="demo", namespace="ns", attempt=2
    )
    s.progress({}, 1, 1_700_000_000.0)
    token.write_text("rotated\n")
    s.progress({}, 2, 1_700_000_001.0)
    assert [r[1] for r in server.requests] == ["Bearer first", "Bearer rotated"]


def test_from_pod_reads_the_in_cluster_environment(tmp_path: Any) -> None:
    (tmp_path / "token").write_text("abc")
    (tmp_path / "ca.crt").write_text("")
    with pytest.raises(KubeSinkError, match="KUBERNETES_SERVICE_HOST"):
        from_pod("demo", "ns", 1, "gs://b/ns/demo", environ={}, service_account_dir=str(tmp_path))
    with pytest.raises(KubeSinkError, match="no ServiceAccount token"):
        from_pod(
            "demo",
            "ns",
            1,
            "gs://b",
            environ={"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
            service_account_dir=str(tmp_path / "missing"),
        )
