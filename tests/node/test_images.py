"""The Dockerfile's images, as built here: what they hold, and their entrypoints on the node.

`hack/images` builds them with buildah (the node's cluster fixture runs it through
`hack/cluster up --real-node`, which imports them as spotrun.local/<image>:dev). Their layers
are read from the cache's OCI layout (hack/clusterlib/imagecheck.py: user 10001, no
compiler, no pip in the operator image, pip and `spotrun` in the runtime's virtualenv);
then pods under Pod Security "restricted" run each image the way Kubernetes does: the
image's ENTRYPOINT with the pod's `args`, its CMD when the pod gives neither, as its USER.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.cluster.test_chart_install import PSS_RESTRICTED
from tests.fixtures.cluster import wait_until
from tests.node.conftest import REPO, NodeCluster

sys.path.insert(0, str(REPO / "hack"))
from clusterlib import imagebuild, imagecheck

pytestmark = pytest.mark.timeout(600)

RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def run_pod(
    cluster: NodeCluster, ns: str, name: str, image: str, **container: Any
) -> tuple[str, str]:
    """Runs one container of IMAGE to its end in a pod; returns its phase and its log."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "c",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "securityContext": RESTRICTED_CONTAINER,
                    **container,
                }
            ],
        },
    }
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(pod))
    phase = wait_until(
        f"pod {name} to end",
        lambda: (
            (p := cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout)
            and json.loads(p)["status"].get("phase") in ("Succeeded", "Failed")
            and json.loads(p)["status"]["phase"]
        ),
        timeout=180,
    )
    log = cluster.kubectl("logs", name, "-n", ns).stdout
    return str(phase), log


@pytest.mark.parametrize("name", ["operator", "runtime", "examples"])
def test_the_image_holds_what_it_should_and_nothing_it_should_not(
    cluster: NodeCluster, name: str
) -> None:
    assert imagecheck.check([name]) == []
    info = imagebuild.image_info(name, imagebuild.key(name))
    print(f"{name}: {info['layers']} layers, {info['unpacked'] / 1e6:.0f} MB unpacked")


def test_each_images_entrypoint_runs_as_10001_on_the_node(
    cluster: NodeCluster, namespace: str
) -> None:
    cluster.kubectl(
        "label", "namespace", namespace, *[f"{k}={v}" for k, v in PSS_RESTRICTED.items()]
    )
    operator = imagebuild.node_ref("operator")
    runtime = imagebuild.node_ref("runtime")
    examples = imagebuild.node_ref("examples")

    # The operator image's ENTRYPOINT (python -m spotrun_operator) with the pod's args.
    phase, log = run_pod(cluster, namespace, "operator-help", operator, args=["--help"])
    assert phase == "Succeeded", log
    assert "Runs the spotrun operator" in log

    # The runtime image's CMD (spotrun --help), and the same in the image built FROM it.
    for pod, image in (("runtime-cmd", runtime), ("examples-cmd", examples)):
        phase, log = run_pod(cluster, namespace, pod, image)
        assert phase == "Succeeded", log
        assert "launch" in log, log

    # Both run as the image's USER, 10001:10001 (the pods set no runAsUser).
    who = ["python", "-c", "import os; print(os.getuid(), os.getgid())"]
    for pod, image in (("operator-id", operator), ("runtime-id", runtime)):
        phase, log = run_pod(cluster, namespace, pod, image, command=who)
        assert (phase, log.strip()) == ("Succeeded", "10001 10001")

    # No pip in the operator image; the runtime's virtualenv keeps it for derived images.
    phase, log = run_pod(
        cluster, namespace, "operator-pip", operator, command=["python", "-m", "pip", "--version"]
    )
    assert phase == "Failed" and "No module named pip" in log, log
    phase, log = run_pod(cluster, namespace, "runtime-pip", runtime, command=["pip", "--version"])
    assert phase == "Succeeded" and "/opt/spotrun/" in log, log

    # The examples' training code is where the launcher imports it from.
    phase, log = run_pod(
        cluster,
        namespace,
        "examples-import",
        examples,
        command=["python", "-c", "import examples.train_linear as m; print(m.__file__)"],
    )
    assert (phase, log.strip()) == ("Succeeded", "/workspace/examples/train_linear.py")
