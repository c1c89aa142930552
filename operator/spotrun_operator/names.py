"""Names and labels the operator gives a TrainJob's children, in one place.

Children are named after their job so that a restarted operator finds them without a
lookup table, and `kubectl get` shows at a glance what belongs to which job.
"""

from __future__ import annotations

GROUP = "spotrun.dev"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"

# Labels on everything the operator creates; pods also carry the attempt they belong to.
JOB_LABEL = f"{GROUP}/job"
ATTEMPT_LABEL = f"{GROUP}/attempt"
# Set by the StatefulSet controller on each pod (Kubernetes >= 1.28): the replica's index.
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"
# A hash of the StatefulSet spec the operator last wrote, to tell whether it must patch.
SPEC_HASH_ANNOTATION = f"{GROUP}/spec-hash"

# kopf's own bookkeeping, namespaced under our API group from the first release (changing
# these later would make kopf handle every existing object again).
FINALIZER = f"{GROUP}/operator"
PERSISTENCE_PREFIX = GROUP
DIFFBASE_KEY = f"{GROUP}/last-handled-configuration"

TRAINER_CONTAINER = "trainer"
SHM_VOLUME = "dshm"
RENDEZVOUS_PORT_NAME = "rendezvous"


def statefulset(job: str) -> str:
    """The StatefulSet (and its pods `<job>-<i>`) of a job."""
    return job


def service(job: str) -> str:
    """The headless Service; it must equal the StatefulSet's serviceName for pod DNS."""
    return job


def runtime_account(job: str) -> str:
    """The ServiceAccount, Role and RoleBinding that let a job's pods write its status."""
    return f"{job}-runtime"


def master_addr(job: str, namespace: str) -> str:
    """Rank 0's stable DNS name: pod 0 of the StatefulSet behind the headless Service."""
    return f"{statefulset(job)}-0.{service(job)}.{namespace}.svc"
