"""The cluster's certificates (openssl CLI) and the kubeconfigs made from them.

Every component authenticates with a client certificate of one local CA, as kubeadm sets
them up, so that RBAC, the Node authorizer and NodeRestriction behave as on a real cluster.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

from .console import Failure
from .topology import GATEWAY, NODE_NAME, SERVICE_IP


def openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Failure(f"`openssl {' '.join(args)}` failed:\n{proc.stderr.strip()}")


EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_ca(pki: Path, name: str, subject: str) -> None:
    openssl(
        *("req", "-x509", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.crt"),
        *("-days", "3650", "-subj", subject),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"),
        cwd=pki,
    )


def make_cert(pki: Path, ca: str, name: str, subject: str, eku: str, sans: str = "") -> None:
    ext = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={eku}",
    ]
    if sans:
        ext.append(f"subjectAltName={sans}")
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    openssl(
        "req", *EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki
    )
    openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key"),
        *("-CAcreateserial", "-days", "3650", "-extfile", f"{name}.ext", "-out", f"{name}.crt"),
        cwd=pki,
    )


def make_pki(pki: Path) -> None:
    """The CAs, serving and client certificates, and the service-account signing key pair."""
    if shutil.which("openssl") is None:
        raise Failure("`openssl` is not on PATH; install it (apt-get install openssl) and retry")
    pki.mkdir(parents=True)
    make_ca(pki, "ca", "/CN=spotrun-local-ca")
    sans = [
        # GATEWAY: where the API server listens when the cluster has a real node.
        *("IP:127.0.0.1", f"IP:{SERVICE_IP}", f"IP:{GATEWAY}", "DNS:localhost", "DNS:kubernetes"),
        *("DNS:kubernetes.default", "DNS:kubernetes.default.svc"),
        "DNS:kubernetes.default.svc.cluster.local",
    ]
    make_cert(pki, "ca", "apiserver", "/CN=kube-apiserver", "serverAuth", ",".join(sans))
    for name, subject in {
        "admin": "/O=system:masters/CN=spotrun-admin",
        "kube-controller-manager": "/CN=system:kube-controller-manager",
        "kube-scheduler": "/CN=system:kube-scheduler",
        # KWOK plays every fake node's kubelet and the pods' runtime; like kwokctl, it acts
        # as cluster admin rather than as one system:node identity.
        "kwok": "/O=system:masters/CN=kwok",
        # The API server's identity towards kubelets (logs, exec) for the real-node tier.
        "apiserver-kubelet-client": "/O=system:masters/CN=kube-apiserver-kubelet-client",
        # The real node's kubelet (Node authorizer, NodeRestriction) and its CoreDNS, which
        # lists Services, EndpointSlices, Pods and Namespaces cluster-wide.
        "kubelet": f"/O=system:nodes/CN=system:node:{NODE_NAME}",
        "coredns": "/O=system:masters/CN=coredns",
    }.items():
        make_cert(pki, "ca", name, subject, "clientAuth")
    # The aggregation layer's front proxy (request-header authentication), as kubeadm sets
    # it up; without it every component logs a missing requestheader CA.
    make_ca(pki, "front-proxy-ca", "/CN=spotrun-front-proxy-ca")
    make_cert(pki, "front-proxy-ca", "front-proxy-client", "/CN=front-proxy-client", "clientAuth")
    openssl(
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
        "-out",
        "sa.key",
        cwd=pki,
    )
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)
    for key in pki.glob("*.key"):
        key.chmod(0o600)


def write_kubeconfig(path: Path, server: str, pki: Path, user: str) -> None:
    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: spotrun
  cluster:
    server: {server}
    certificate-authority-data: {b64("ca.crt")}
users:
- name: {user}
  user:
    client-certificate-data: {b64(f"{user}.crt")}
    client-key-data: {b64(f"{user}.key")}
contexts:
- name: spotrun
  context:
    cluster: spotrun
    user: {user}
current-context: spotrun
"""
    )
    path.chmod(0o600)
