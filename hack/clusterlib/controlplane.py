"""Starts, checks and stops the local control plane of one run dir.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK run on free
127.0.0.1 ports; KWOK plays the kubelet of fake spot GPU nodes. With `--real-node` the API
server moves to the node bridge's gateway and `up`/`down` bring the real node along.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from spotrun.local.ports import free_port

from .build import KUBERNETES_VERSION, KWOK_VERSION, build
from .console import Failure, fmt_secs, say
from .node import (
    bridge_up,
    node_down,
    node_preflight,
    node_up,
    other_real_node,
    print_node_env,
)
from .pki import make_pki, write_kubeconfig
from .probes import api, api_host, check_health, health_url, node_ready
from .processes import alive, our_processes, start, stop, wait_for
from .rundir import RunDir
from .topology import (
    BRIDGE,
    COMPONENTS,
    GATEWAY,
    NODE_COMPONENTS,
    NODE_NAME,
    POD_CIDR,
    SERVICE_CIDR,
    SHIM,
)

KWOK_NODE_SELECTOR = "kwok.x-k8s.io/node=fake"
STAGES_FILE = Path(__file__).resolve().parent / "kwok-stages.yaml"


def component_args(run: RunDir, ports: dict[str, int]) -> dict[str, list[str]]:
    pki = run.pki
    etcd = f"http://127.0.0.1:{ports['etcd']}"
    peer = f"http://127.0.0.1:{ports['etcd-peer']}"
    kc = run.component_kubeconfig
    return {
        "etcd": [
            "--name=spotrun",
            f"--data-dir={run.etcd_data}",
            f"--listen-client-urls={etcd}",
            f"--advertise-client-urls={etcd}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=spotrun={peer}",
            "--initial-cluster-state=new",
            # A throwaway test store: durability across power loss does not matter, speed does.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        "kube-apiserver": [
            f"--etcd-servers={etcd}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={ports['kube-apiserver']}",
            f"--cert-dir={pki}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            "--authorization-mode=Node,RBAC",
            f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
            f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
            "--enable-admission-plugins=NodeRestriction",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            # The `kubernetes` Endpoints may not hold a loopback address (validation rejects
            # it), so the API server does not publish its own endpoint here.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
        ],
        "kube-controller-manager": [
            f"--kubeconfig={kc('kube-controller-manager')}",
            f"--authentication-kubeconfig={kc('kube-controller-manager')}",
            f"--authorization-kubeconfig={kc('kube-controller-manager')}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kube-controller-manager']}",
            f"--cert-dir={pki / 'kube-controller-manager'}",
            # The token controller mints service-account tokens with this key, and the root
            # CA publisher fills every namespace's kube-root-ca.crt.
            f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={pki / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={pki / 'ca.crt'}",
            f"--cluster-signing-key-file={pki / 'ca.key'}",
            "--controllers=*,bootstrapsigner,tokencleaner",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=spotrun",
            "--leader-elect=false",
            "--profiling=false",
        ],
        "kube-scheduler": [
            f"--kubeconfig={kc('kube-scheduler')}",
            f"--authentication-kubeconfig={kc('kube-scheduler')}",
            f"--authorization-kubeconfig={kc('kube-scheduler')}",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['kube-scheduler']}",
            f"--cert-dir={pki / 'kube-scheduler'}",
            "--leader-elect=false",
            "--profiling=false",
        ],
        "kwok": [
            f"--kubeconfig={kc('kwok')}",
            f"--config={run.root / 'kwok-stages.yaml'}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_SELECTOR}",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            f"--cidr={POD_CIDR}",
            "--node-lease-duration-seconds=40",
        ],
    }


def node_manifest(name: str, index: int, gpus: int, labels: dict[str, str]) -> dict[str, Any]:
    """A fake GKE spot GPU node (a3-highgpu-8g shape) that KWOK manages."""
    resources = {
        "cpu": "208",
        "memory": "1872Gi",
        "ephemeral-storage": "6Ti",
        "pods": "110",
        "nvidia.com/gpu": str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "node.kubernetes.io/instance-type": "a3-highgpu-8g",
                "cloud.google.com/gke-spot": "true",
                "cloud.google.com/gke-provisioning": "spot",
                "cloud.google.com/gke-nodepool": "spot-gpu",
                "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                "cloud.google.com/machine-family": "a3",
                "topology.kubernetes.io/region": "us-central1",
                "topology.kubernetes.io/zone": "us-central1-a",
                **labels,
            },
        },
        "spec": {},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [
                {"type": "InternalIP", "address": f"10.255.{index // 250}.{index % 250 + 1}"},
                {"type": "Hostname", "address": name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": f"{KUBERNETES_VERSION}-kwok",
                "containerRuntimeVersion": f"kwok-{KWOK_VERSION}",
                "kernelVersion": "",
                "osImage": "KWOK fake node",
                "bootID": "",
                "machineID": "",
                "systemUUID": "",
                "kubeProxyVersion": "",
            },
        },
    }


def create_node(
    run: RunDir, name: str, gpus: int, labels: dict[str, str], wait: bool = True
) -> None:
    code, nodes = api(run, "/api/v1/nodes")
    index = len(nodes.get("items", [])) if code == 200 else 0
    code, body = api(run, "/api/v1/nodes", "POST", node_manifest(name, index, gpus, labels))
    if code == 409:
        raise Failure(f"node {name} already exists; choose another name or delete it first")
    if code != 201:
        message = body.get("message", body) if isinstance(body, dict) else body
        raise Failure(f"creating node {name} failed: HTTP {code}: {message}")
    if wait:
        wait_for(f"node {name} to be Ready", lambda: node_ready(run, name), 60, run, ["kwok"])


def is_up(run: RunDir) -> bool:
    state = run.read_state()
    procs = state["processes"]
    want = (*COMPONENTS, *NODE_COMPONENTS) if state.get("real_node") else COMPONENTS
    if set(procs) != set(want):
        return False
    return all(alive(int(p["pid"])) for p in procs.values()) and all(
        check_health(run, n, state["ports"])[0] for n in want
    )


def up(run: RunDir, nodes: int | None, real_node: bool = False) -> None:
    started = time.monotonic()
    if nodes is None:
        nodes = 0 if real_node else 4
    if is_up(run) and bool(run.read_state().get("real_node")) == real_node:
        say(f"already up ({run.root}); `hack/cluster down --run-dir {run.root}` to stop it")
        print(f"export KUBECONFIG={run.kubeconfig}")
        print_node_env(run)
        return
    run.root.mkdir(parents=True, exist_ok=True)
    down(run, quiet=True)  # leftovers of an earlier, failed `up`
    build(
        ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl"]
        + (["kubelet", "coredns", "fake-gcs-server"] if real_node else [])
    )
    if real_node:
        node_preflight()
        other = other_real_node(run)
        if other:
            raise Failure(
                f"a real node already runs from {other} (one per machine: the bridge "
                f"{BRIDGE}, its subnet and port 53 are fixed); `hack/cluster down --run-dir {other}`"
            )
    t0 = time.monotonic()
    for path in (run.pki, run.logs, run.etcd_data):
        shutil.rmtree(path, ignore_errors=True)
    run.logs.mkdir(parents=True)
    ports = {
        n: free_port()
        for n in (
            "etcd",
            "etcd-peer",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
            *(
                (
                    "containerd",
                    "coredns",
                    "coredns-ready",
                    "fake-gcs-server",
                    "kubelet",
                    "kubelet-server",
                )
                if real_node
                else ()
            ),
        )
    }
    host = GATEWAY if real_node else "127.0.0.1"
    run.write_state(
        {"processes": {}, "ports": ports, "nodes": nodes, "real_node": real_node, "api_host": host}
    )
    make_pki(run.pki)
    server = f"https://{host}:{ports['kube-apiserver']}"
    write_kubeconfig(run.kubeconfig, server, run.pki, "admin")
    names = ("kube-controller-manager", "kube-scheduler", "kwok")
    for name in (*names, *(("kubelet", "coredns") if real_node else ())):
        write_kubeconfig(run.component_kubeconfig(name), server, run.pki, name)
    shutil.copyfile(STAGES_FILE, run.root / "kwok-stages.yaml")
    args = component_args(run, ports)
    if real_node:
        # Pods reach the API server on the bridge's gateway (the only address it listens
        # on), and it publishes that address in the `kubernetes` Endpoints.
        args["kube-apiserver"] = [
            a
            for a in args["kube-apiserver"]
            if not a.startswith(("--bind-address", "--advertise-address", "--endpoint-reconciler"))
        ] + [
            f"--bind-address={GATEWAY}",
            f"--advertise-address={GATEWAY}",
            "--endpoint-reconciler-type=lease",
            # The node's name does not resolve on this machine; its InternalIP is GATEWAY.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
        ]
    try:
        if real_node:
            bridge_up()
        start(run, "etcd", args["etcd"])
        wait_for("etcd /health", lambda: check_health(run, "etcd", ports)[0], 60, run, ["etcd"])
        start(run, "kube-apiserver", args["kube-apiserver"])
        wait_for(
            "kube-apiserver /readyz",
            lambda: check_health(run, "kube-apiserver", ports)[0],
            120,
            run,
            ["etcd", "kube-apiserver"],
        )
        say(f"kube-apiserver ready at {server} after {fmt_secs(time.monotonic() - t0)}")
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            start(run, name, args[name])
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            wait_for(
                f"{name} health",
                lambda n=name: check_health(run, n, ports)[0],
                120,
                run,
                COMPONENTS,
            )
        # Pods need the default ServiceAccount (admission rejects them without it) and the
        # kube-root-ca.crt ConfigMap their projected token volume names.
        wait_for(
            "the default ServiceAccount and kube-root-ca.crt in namespace default",
            lambda: (
                api(run, "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
                and api(run, "/api/v1/namespaces/default/configmaps/kube-root-ca.crt")[0] == 200
            ),
            120,
            run,
            COMPONENTS,
        )
        for i in range(nodes):
            create_node(run, f"kwok-gpu-{i}", 8, {}, wait=False)
        for i in range(nodes):
            wait_for(
                f"node kwok-gpu-{i} to be Ready",
                lambda i=i: node_ready(run, f"kwok-gpu-{i}"),
                120,
                run,
                COMPONENTS,
            )
        if real_node:
            node_up(run, ports)
    except BaseException:
        say(f"`up` failed; stopping what it started (logs stay in {run.logs})")
        down(run, quiet=True)
        raise
    say(
        f"up in {fmt_secs(time.monotonic() - t0)} ({fmt_secs(time.monotonic() - started)} with "
        f"builds and checks): {nodes} KWOK GPU nodes"
        + (f", real node {NODE_NAME}" if real_node else "")
        + f", API server {server}"
    )
    print(f"export KUBECONFIG={run.kubeconfig}")
    print_node_env(run)


def status(run: RunDir) -> bool:
    state = run.read_state()
    ports = state["ports"]
    all_ok = bool(state["processes"])
    print(f"run dir:    {run.root}")
    print(f"kubeconfig: {run.kubeconfig}")
    for name in (*COMPONENTS, *(NODE_COMPONENTS if state.get("real_node") else ())):
        proc = state["processes"].get(name)
        pid = int(proc["pid"]) if proc else None
        running = pid is not None and alive(pid)
        ok, detail = check_health(run, name, ports) if running else (False, "")
        all_ok = all_ok and running and ok
        host = {"kube-apiserver": api_host(run), "fake-gcs-server": GATEWAY}.get(name, "127.0.0.1")
        where = f"{host}:{ports[name]}" if name in ports else "-"
        print(
            f"{name:24} {'running' if running else 'stopped':8} pid={pid or '-':<8} {where:16}"
            f" {health_url(name, ports, api_host(run)) or ''} {'ok' if ok else detail}".rstrip()
        )
    if all_ok:
        code, nodes = api(run, "/api/v1/nodes")
        if code == 200:
            names = [n["metadata"]["name"] for n in nodes.get("items", [])]
            print(f"nodes ({len(names)}): {' '.join(names)}")
    stray = [p for p, n in our_processes(run).items() if n not in state["processes"]]
    if stray:
        print(f"unrecorded processes of this run dir (down stops them): {stray}")
    return all_ok


def down(run: RunDir, quiet: bool = False) -> None:
    state = run.read_state()
    node_state = state.get("real_node") or any(
        n in (*NODE_COMPONENTS, SHIM) for n in our_processes(run).values()
    )
    if node_state:
        # The node first, while the API server still answers: kubelet, pods, containerd.
        node_down(run, quiet)
    procs = our_processes(run)
    # Clients first, then the API server while etcd still answers (it would wait for etcd
    # during its shutdown otherwise), then etcd.
    tiers = (("kube-apiserver",), ("etcd",))
    clients = {p: n for p, n in procs.items() if not any(n in t for t in tiers)}
    stop(clients, 10, quiet)
    for tier in tiers:
        stop({p: n for p, n in procs.items() if n in tier}, 10, quiet)
    left = [f"{procs[p]} (pid {p})" for p in procs if alive(p)]
    if left:
        raise Failure(f"could not stop {', '.join(left)}; stop them by pid and retry `down`")
    if run.state_file.exists():
        state = run.read_state()
        state["processes"] = {}
        run.write_state(state)
    for name in (*COMPONENTS, *NODE_COMPONENTS):
        (run.root / f"{name}.pid").unlink(missing_ok=True)
    if not quiet:
        say("stopped everything" if procs else f"nothing was running for {run.root}")
