"""The real node: containerd, runc, the CNI bridge, CoreDNS, fake-gcs-server and a kubelet.

`up --real-node` runs them on this machine as root, on a bridge of their own, so that the
node tier runs real training pods. Their configuration is generated here; `node_down`
undoes everything `node_up` did, mounts, network namespaces and NAT rules included.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .console import Failure, fmt_secs, say
from .imagebuild import REGISTRY, ensure, node_ref, tag, write_oci_archive
from .images import PAUSE_IMAGE, build_image
from .probes import check_health, http, node_ready
from .processes import (
    cmdline,
    descendants,
    our_processes,
    sh,
    signal_process,
    start,
    stop,
    wait_for,
)
from .rundir import RunDir
from .topology import (
    BRIDGE,
    BRIDGE_CIDR,
    BRIDGE_MAC,
    CLUSTER_DOMAIN,
    COMPONENTS,
    GATEWAY,
    NODE_COMPONENTS,
    NODE_NAME,
    SERVICE_IP,
    SHIM,
)

# The bucket fake-gcs-server serves the pods' checkpoints from (gs://spotrun/...).
NODE_BUCKET = "spotrun"

# Pods talk to the API server through the `kubernetes` Service (10.96.0.1:443, from the env
# kubelet injects); with no kube-proxy, one DNAT rule in this chain sends it to GATEWAY.
NAT_CHAIN = "SPOTRUN-SERVICES"

# Debian packages the node needs: command -> package.
NODE_PACKAGES = {
    "containerd": "containerd",
    "ctr": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "umoci": "umoci",
    "iptables": "iptables",
    "/bin/busybox": "busybox-static",
    "conntrack": "conntrack",
    "ip": "iproute2",
}
CNI_BIN_DIR = "/usr/lib/cni"


def missing_node_packages() -> list[str]:
    missing = set()
    for cmd, pkg in NODE_PACKAGES.items():
        if not (Path(cmd).exists() if cmd.startswith("/") else shutil.which(cmd)):
            missing.add(pkg)
    return sorted(missing)


def node_deps() -> None:
    """Installs the node's Debian packages (idempotent: only what is missing)."""
    missing = missing_node_packages()
    if not missing:
        say("node packages present: " + " ".join(sorted(set(NODE_PACKAGES.values()))))
        return
    if os.geteuid() != 0:
        raise Failure(f"the real node needs root; install {' '.join(missing)} as root")
    say(f"installing {' '.join(missing)} (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise Failure(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")


def node_preflight() -> None:
    if os.geteuid() != 0:
        raise Failure("`up --real-node` needs root (containerd, runc, network namespaces)")
    if missing_node_packages():
        node_deps()
    if (
        not Path("/sys/fs/cgroup/cpu").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        raise Failure("no cgroup hierarchy under /sys/fs/cgroup")


def other_real_node(run: RunDir) -> str | None:
    """The run dir of a real node that another `up --real-node` runs on this machine."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        args = cmdline(int(entry.name))
        if args and Path(args[0]).name == "kubelet" and f"--hostname-override={NODE_NAME}" in args:
            for a in args:
                if a.startswith("--root-dir="):
                    root = Path(a.split("=", 1)[1]).parents[2]
                    if root != run.root:
                        return str(root)
    return None


def bridge_up() -> None:
    if sh("ip", "link", "show", BRIDGE, check=False).returncode != 0:
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
    addrs = sh("ip", "-4", "-o", "addr", "show", "dev", BRIDGE).stdout
    if f" {GATEWAY}/" not in addrs:
        sh("ip", "addr", "add", f"{GATEWAY}/{BRIDGE_CIDR.split('/')[1]}", "dev", BRIDGE)
    sh("ip", "link", "set", BRIDGE, "address", BRIDGE_MAC)  # see BRIDGE_MAC
    sh("ip", "link", "set", BRIDGE, "up")
    # Pods reach each other over the bridge and the host through GATEWAY; routing between
    # pods and the host's own addresses needs forwarding only for the DNATed Service.
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


def bridge_down() -> None:
    if sh("ip", "link", "show", BRIDGE, check=False).returncode == 0:
        sh("ip", "link", "delete", BRIDGE, check=False)


def nat_up(api_port: int) -> None:
    nat_down()
    sh("iptables", "-w", "-t", "nat", "-N", NAT_CHAIN)
    sh(
        *("iptables", "-w", "-t", "nat", "-A", NAT_CHAIN, "-d", f"{SERVICE_IP}/32", "-p", "tcp"),
        *("--dport", "443", "-j", "DNAT", "--to-destination", f"{GATEWAY}:{api_port}"),
    )
    sh("iptables", "-w", "-t", "nat", "-A", "PREROUTING", "-i", BRIDGE, "-j", NAT_CHAIN)


def nat_down() -> None:
    while (
        sh(
            "iptables",
            "-w",
            "-t",
            "nat",
            "-D",
            "PREROUTING",
            "-i",
            BRIDGE,
            "-j",
            NAT_CHAIN,
            check=False,
        ).returncode
        == 0
    ):
        pass
    sh("iptables", "-w", "-t", "nat", "-F", NAT_CHAIN, check=False)
    sh("iptables", "-w", "-t", "nat", "-X", NAT_CHAIN, check=False)


class NodeDir:
    def __init__(self, run: RunDir) -> None:
        self.root = run.root / "node"
        self.containerd = self.root / "containerd"
        self.socket = self.containerd / "containerd.sock"
        self.cni_conf = self.root / "cni" / "net.d"
        self.cni_ipam = self.root / "cni" / "ipam"
        self.kubelet = self.root / "kubelet"
        self.coredns = self.root / "coredns"


def containerd_config(node: NodeDir, metrics_port: int) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""# Generated by hack/cluster: the real node's containerd (CRI), its own dirs and socket.
version = 2
root = "{node.containerd / "root"}"
state = "{node.containerd / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "{node.socket}"

[ttrpc]
  address = "{node.containerd / "containerd.sock.ttrpc"}"

[metrics]
  address = "127.0.0.1:{metrics_port}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{node.containerd / "opt"}"

[{cri}]
  # No registry is reachable: the pause image is built and imported locally.
  sandbox_image = "{PAUSE_IMAGE}"
  enable_selinux = false
  disable_apparmor = true
  # Containers may not get an oom_score_adj below containerd's own: lowering it needs
  # CAP_SYS_RESOURCE, which a sandboxed dev machine may not grant to root (runc then fails
  # with "failed to update /proc/self/oom_score_adj: Permission denied").
  restrict_oom_score_adj = true

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  # cgroup v1 without systemd: the cgroupfs driver, as the kubelet's.
  SystemdCgroup = false

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{node.cni_conf}"
"""


def cni_config(node: NodeDir) -> str:
    return json.dumps(
        {
            "cniVersion": "0.4.0",
            "name": "spotrun",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": BRIDGE_CIDR, "gateway": GATEWAY}]],
                        # The default route through GATEWAY, where the DNATed Service is.
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(node.cni_ipam),
                    },
                }
            ],
        },
        indent=2,
    )


def corefile(run: RunDir, ports: dict[str, int]) -> str:
    return f""". {{
    bind {GATEWAY}
    errors
    health 127.0.0.1:{ports["coredns"]}
    ready 127.0.0.1:{ports["coredns-ready"]}
    cache 5
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {run.component_kubeconfig("coredns")} spotrun
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
}}
"""


def kubelet_config(run: RunDir, node: NodeDir, ports: dict[str, int]) -> str:
    return f"""# Generated by hack/cluster: the real node's kubelet.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {GATEWAY}
port: {ports["kubelet-server"]}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {ports["kubelet"]}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {run.pki / "ca.crt"}}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: unix://{node.socket}
# cgroup v1, no systemd: cgroupfs, and kubelet 1.35+ refuses cgroup v1 unless told.
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
clusterDNS: [{GATEWAY}]
clusterDomain: {CLUSTER_DOMAIN}
resolvConf: {node.kubelet / "resolv.conf"}
# Images come from `ctr images import` and cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# A shared dev machine: evict only when really short.
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
serializeImagePulls: false
maxPods: 30
nodeStatusUpdateFrequency: 4s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 5s
rotateCertificates: false
serverTLSBootstrap: false
enableServer: true
"""


def node_component_args(run: RunDir, ports: dict[str, int]) -> dict[str, list[str]]:
    node = NodeDir(run)
    return {
        "containerd": [f"--config={node.root / 'containerd.toml'}", "--log-level=info"],
        "coredns": ["-conf", str(node.coredns / "Corefile"), "-pidfile", str(node.coredns / "pid")],
        # Checkpoint storage the pods reach (STORAGE_EMULATOR_HOST=http://GATEWAY:PORT).
        "fake-gcs-server": [
            *("-scheme", "http", "-host", GATEWAY, "-port", str(ports["fake-gcs-server"])),
            *("-public-host", f"{GATEWAY}:{ports['fake-gcs-server']}"),
            *("-backend", "filesystem", "-filesystem-root", str(node.root / "gcs")),
            *("-log-level", "warn"),
        ],
        "kubelet": [
            f"--config={node.kubelet / 'config.yaml'}",
            f"--kubeconfig={run.component_kubeconfig('kubelet')}",
            f"--root-dir={node.kubelet / 'root'}",
            f"--cert-dir={node.kubelet / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={GATEWAY}",
            "--node-labels=spotrun.dev/real-node=true",
            "--v=1",
        ],
    }


def ctr(node: NodeDir, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ctr", f"--address={node.socket}", "--namespace=k8s.io", *args, check=check)


# The Dockerfile's images the node runs (hack/images builds them, cached by content): the
# chart's operator, the runtime, and the examples' training image built FROM it.
NODE_IMAGES = ("operator", "runtime", "examples")


def import_images(node: NodeDir) -> None:
    archive = build_image("pause")
    base = PAUSE_IMAGE.rsplit(":", 1)[0]
    ctr(node, "images", "import", f"--base-name={base}", "--no-unpack=false", str(archive))
    keys = ensure(NODE_IMAGES)
    refs = {tag(n, keys[n]): node_ref(n) for n in NODE_IMAGES}
    started = time.monotonic()
    # One stream of the three: the blobs they share (the runtime's layers) go in once.
    cmd = [
        *("ctr", f"--address={node.socket}", "--namespace=k8s.io", "images", "import"),
        *(f"--base-name={REGISTRY}", "-"),
    ]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError), proc.stdin:
            write_oci_archive(refs, proc.stdin)
        rc = proc.wait()
        out.seek(0)
        printed = out.read().decode(errors="replace")
    if rc != 0:
        raise Failure(f"`{' '.join(cmd)}` failed (exit {rc}):\n{printed}")
    have = ctr(node, "images", "ls", "-q").stdout.split()
    for ref in (PAUSE_IMAGE, *refs.values()):
        if ref not in have:
            raise Failure(f"`ctr images import` did not create {ref}; it printed:\n{printed}")
    say(f"imported {', '.join(refs.values())} in {fmt_secs(time.monotonic() - started)}")


def print_node_env(run: RunDir) -> None:
    """With a real node: where its fake-gcs-server listens (for gcsfs on this machine too)."""
    state = run.read_state()
    if state.get("real_node") and "fake-gcs-server" in state["ports"]:
        print(f"export STORAGE_EMULATOR_HOST=http://{GATEWAY}:{state['ports']['fake-gcs-server']}")


def node_up(run: RunDir, ports: dict[str, int]) -> None:
    """Starts containerd, CoreDNS and the kubelet; returns when the node is Ready."""
    node = NodeDir(run)
    shutil.rmtree(node.root, ignore_errors=True)  # down has unmounted what was under it
    for d in (node.containerd, node.cni_conf, node.cni_ipam, node.kubelet, node.coredns):
        d.mkdir(parents=True, exist_ok=True)
    (node.root / "containerd.toml").write_text(containerd_config(node, ports["containerd"]))
    (node.cni_conf / "10-spotrun.conflist").write_text(cni_config(node))
    (node.coredns / "Corefile").write_text(corefile(run, ports))
    (node.kubelet / "config.yaml").write_text(kubelet_config(run, node, ports))
    (node.kubelet / "resolv.conf").write_text(f"nameserver {GATEWAY}\n")
    nat_up(ports["kube-apiserver"])
    args = node_component_args(run, ports)
    watch = (*COMPONENTS, *NODE_COMPONENTS)
    start(run, "containerd", args["containerd"])
    wait_for(
        "containerd",
        lambda: node.socket.exists() and ctr(node, "version", check=False).returncode == 0,
        60,
        run,
        ["containerd"],
    )
    import_images(node)
    start(run, "coredns", args["coredns"])
    wait_for(
        "coredns /health", lambda: check_health(run, "coredns", ports)[0], 60, run, ["coredns"]
    )
    (node.root / "gcs").mkdir(exist_ok=True)
    start(run, "fake-gcs-server", args["fake-gcs-server"])
    wait_for(
        "fake-gcs-server",
        lambda: check_health(run, "fake-gcs-server", ports)[0],
        60,
        run,
        ["fake-gcs-server"],
    )
    code, body = http(
        f"http://{GATEWAY}:{ports['fake-gcs-server']}/storage/v1/b?project=spotrun",
        method="POST",
        body={"name": NODE_BUCKET},
    )
    if code not in (200, 409):
        raise Failure(f"creating bucket {NODE_BUCKET} in fake-gcs-server: HTTP {code} {body}")
    start(run, "kubelet", args["kubelet"])
    wait_for(f"node {NODE_NAME} to be Ready", lambda: node_ready(run, NODE_NAME), 180, run, watch)


def _our_netns() -> list[str]:
    """CRI's pod network namespaces whose eth0 has an address on the node's bridge subnet."""
    found = []
    prefix = GATEWAY.rsplit(".", 2)[0] + "."
    for ns in sorted(Path("/var/run/netns").glob("cni-*")):
        out = sh("ip", "-n", ns.name, "-4", "-o", "addr", "show", check=False).stdout
        if f"inet {prefix}" in out:
            found.append(ns.name)
    return found


def node_down(run: RunDir, quiet: bool) -> None:
    """Stops the kubelet, every pod, containerd and its shims; frees mounts, netns, bridge."""
    node = NodeDir(run)
    procs = our_processes(run)
    stop({p: n for p, n in procs.items() if n == "kubelet"}, 10, quiet)
    if node.socket.exists() and any(n == "containerd" for n in procs.values()):
        tasks = ctr(node, "tasks", "ls", "-q", check=False).stdout.split()
        for task in tasks:
            ctr(node, "tasks", "kill", "--all", "--signal=SIGKILL", task, check=False)
        deadline = time.monotonic() + 10
        for task in tasks:
            while ctr(node, "tasks", "delete", task, check=False).returncode != 0:
                if time.monotonic() > deadline:
                    ctr(node, "tasks", "delete", "--force", task, check=False)
                    break
                time.sleep(0.2)
        for container in ctr(node, "containers", "ls", "-q", check=False).stdout.split():
            ctr(node, "containers", "delete", container, check=False)
    # Whatever still runs under a shim of this node (containerd died, a task would not stop).
    procs = our_processes(run)
    for pid, name in procs.items():
        if name == SHIM:
            for kid in descendants(pid):
                signal_process(kid, signal.SIGKILL)
    stop({p: n for p, n in procs.items() if n in (*NODE_COMPONENTS, SHIM)}, 10, quiet)
    unmount_under(run.root)
    # containerd's content and snapshots: the imported images unpacked (several GB); what a
    # later `up` would import again. The run dir keeps its logs and the rest.
    if not any(m.startswith(f"{node.containerd}/") for m in _mount_points()):
        shutil.rmtree(node.containerd / "root", ignore_errors=True)
    for ns in _our_netns():
        sh("ip", "netns", "delete", ns, check=False)
    nat_down()
    bridge_down()
    remove_pod_cgroups()


def _mount_points() -> list[str]:
    return [
        line.split()[4].replace("\\040", " ")
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
    ]


def unmount_under(root: Path) -> None:
    prefix = str(root) + "/"
    mounts = [point for point in _mount_points() if point.startswith(prefix)]
    for point in sorted(set(mounts), key=len, reverse=True):
        sh("umount", "-l", point, check=False)


def remove_pod_cgroups() -> None:
    """The kubelet's `kubepods` cgroups (cgroupfs driver), once no process is left in them."""
    for controller in Path("/sys/fs/cgroup").iterdir():
        top = controller / "kubepods"
        if not top.is_dir():
            continue
        for d in sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        ):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()
