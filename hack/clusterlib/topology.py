"""The names and addresses that the control plane and the real node agree on.

Certificates, health checks, process discovery, the API server's flags and the node's network
all name the same daemons and addresses, and they live in different modules: this one holds
them, so that each is spelled once.
"""

from __future__ import annotations

# Start order; `down` stops in the reverse order.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# Components of the real node, in start order (after the control plane).
NODE_COMPONENTS = ("containerd", "coredns", "fake-gcs-server", "kubelet")
SHIM = "containerd-shim-runc-v2"
NODE_NAME = "spotrun-node"

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
POD_CIDR = "10.64.0.0/12"

# The pods' bridge. It exists before the API server starts, which listens on its gateway
# address (not on 127.0.0.1) so that pods reach it; CoreDNS and fake-gcs-server listen there
# too. The CNI bridge plugin reuses it.
BRIDGE = "spotrun0"
# The bridge's own MAC address, set once (locally administered). Left to the kernel, a
# bridge takes the lowest MAC of its ports, so it changes as pods come and go; the pods'
# ARP entries for GATEWAY (CoreDNS, the API server, the GCS emulator) then point at an
# address nobody answers for, and their packets there are lost until ARP notices (5-20 s
# of DNS timeouts in a replacement pod that starts while another pod's veth goes).
BRIDGE_MAC = "02:73:70:6f:74:00"
BRIDGE_CIDR = "10.88.0.0/16"
GATEWAY = "10.88.0.1"
CLUSTER_DOMAIN = "cluster.local"
