"""HTTP to the components: their health checks, and the few API calls made without kubectl.

Stdlib only (urllib and ssl), so that hack/cluster runs before any virtualenv exists.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Any

from .rundir import RunDir
from .topology import GATEWAY


def admin_ssl(run: RunDir) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(run.pki / "ca.crt"))
    ctx.load_cert_chain(str(run.pki / "admin.crt"), str(run.pki / "admin.key"))
    return ctx


def insecure_ssl() -> ssl.SSLContext:
    # Controller-manager and scheduler serve health checks on self-signed certificates.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def http(
    url: str, ctx: ssl.SSLContext | None = None, method: str = "GET", body: Any = None
) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


def health_url(name: str, ports: dict[str, int], api_host: str = "127.0.0.1") -> str | None:
    port = ports.get(name)
    if port is None:
        return None
    return {
        "etcd": f"http://127.0.0.1:{port}/health",
        "kube-apiserver": f"https://{api_host}:{port}/readyz",
        "containerd": f"http://127.0.0.1:{port}/v1/metrics",
        "fake-gcs-server": f"http://{GATEWAY}:{port}/storage/v1/b?project=spotrun",
        "coredns": f"http://127.0.0.1:{port}/health",
        "kubelet": f"http://127.0.0.1:{port}/healthz",
        "kube-controller-manager": f"https://127.0.0.1:{port}/healthz",
        "kube-scheduler": f"https://127.0.0.1:{port}/healthz",
        "kwok": f"http://127.0.0.1:{port}/healthz",
    }[name]


def check_health(run: RunDir, name: str, ports: dict[str, int]) -> tuple[bool, str]:
    url = health_url(name, ports, api_host(run))
    if url is None:
        return False, "no port recorded"
    ctx = admin_ssl(run) if name == "kube-apiserver" else insecure_ssl()
    code, body = http(url, ctx if url.startswith("https") else None)
    ok = code == 200 and (name != "etcd" or json.loads(body).get("health") == "true")
    # /readyz lists its checks one per line; the failing ones start with [-].
    failing = [line for line in body.splitlines() if line.startswith("[-]")]
    detail = " ".join(failing) if failing else " ".join(body.split())
    return ok, f"{code} {detail[:160]}" if code else detail[:160]


def api_host(run: RunDir) -> str:
    """Where the API server listens: 127.0.0.1, or the node bridge's gateway with a real node."""
    return str(run.read_state().get("api_host") or "127.0.0.1")


def api(run: RunDir, path: str, method: str = "GET", body: Any = None) -> tuple[int, Any]:
    state = run.read_state()
    url = f"https://{api_host(run)}:{state['ports']['kube-apiserver']}{path}"
    code, text = http(url, admin_ssl(run), method, body)
    try:
        return code, json.loads(text)
    except json.JSONDecodeError:
        return code, text


def node_ready(run: RunDir, name: str) -> bool:
    code, node = api(run, f"/api/v1/nodes/{name}")
    if code != 200:
        return False
    conds = node.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
