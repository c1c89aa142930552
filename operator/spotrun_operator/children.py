"""Builds a TrainJob's children as plain dicts: Service, StatefulSet and the runtime's RBAC.

Pure functions of the TrainJob body (and, for the StatefulSet, of the attempt and resume
point the policy chose), so they are tested with tables and `apply` only sends them.
Every child is owned by its TrainJob (kopf.adopt): the garbage collector removes them with
it, so there is no delete handler.

The pod follows the contract of spotrun.contract; what the user's `spec.template` may
override and what it may not is decided in `pod_spec` (see docs/operator.md).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from spotrun import contract
from spotrun.contract import CheckpointSettings, PodContract
from spotrun.lifecycle.group import rendezvous_port
from spotrun_operator import names

STATUS_SINK_KUBERNETES = "kubernetes"

# Environment names the pod contract owns; user env may not set them (the CRD refuses them).
RESERVED_ENV = frozenset(
    {
        contract.JOB,
        contract.NAMESPACE,
        contract.ATTEMPT,
        contract.REPLICAS,
        contract.NPROC_PER_NODE,
        contract.NODE_RANK,
        contract.STORAGE,
        contract.RESUME_FROM,
        contract.CONFIG,
        contract.CHECKPOINT,
        contract.FUNCTION,
        contract.STATUS_SINK,
        contract.MASTER_ADDR,
        contract.MASTER_PORT,
        contract.HOLD_AFTER_SUCCESS,
        contract.RECOVERY,
        contract.GROUP_FILE,
        contract.GRACE_SECONDS,
        contract.PROGRESS_SECONDS,
        contract.ELASTIC_BATCH,
        contract.TARGET_REPLICAS,
        contract.MEMBER_ADDR,
        contract.SPARES,
        contract.SPARE,
        contract.OBSERVED_MTBF,
    }
)

# Pod fields the operator sets and `spec.template.spec` may not change: the StatefulSet
# needs restartPolicy Always, and the runtime needs its token to write the status.
FIXED_POD_FIELDS = frozenset(
    {"restartPolicy", "automountServiceAccountToken", "hostname", "subdomain", "containers"}
)

# The Pod Security Standard "restricted" defaults; spec.template.spec.securityContext
# (and the trainer container's securityContext) may override them key by key.
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
}


# Where the operator's own settings (the chart's values) reach each job's children.
DEFAULT_STORAGE_ENV = "SPOTRUN_DEFAULT_STORAGE"
RUNTIME_GCP_SERVICE_ACCOUNT_ENV = "SPOTRUN_RUNTIME_GCP_SERVICE_ACCOUNT"
WORKLOAD_IDENTITY_ANNOTATION = "iam.gke.io/gcp-service-account"


@dataclass(frozen=True)
class Defaults:
    """Operator-wide settings that fill in what a TrainJob leaves out.

    `storage`: the checkpoint storage of jobs that name none (spec.checkpoint.storage).
    `gcp_service_account`: the Google service account the per-job runtime ServiceAccount
    impersonates through GKE Workload Identity, so the pods can write to GCS.
    """

    storage: str = ""
    gcp_service_account: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Defaults:
        return cls(
            storage=env.get(DEFAULT_STORAGE_ENV, "").strip(),
            gcp_service_account=env.get(RUNTIME_GCP_SERVICE_ACCOUNT_ENV, "").strip(),
        )


NO_DEFAULTS = Defaults()


def storage(job: Mapping[str, Any], defaults: Defaults = NO_DEFAULTS) -> str:
    """The job's checkpoint storage URL: its own, else the operator's default, else empty."""
    own = ((job.get("spec") or {}).get("checkpoint") or {}).get("storage")
    return str(own or defaults.storage)


def labels(job: str) -> dict[str, str]:
    return {names.JOB_LABEL: job}


def _meta(job: Mapping[str, Any]) -> tuple[str, str]:
    meta = job["metadata"]
    return str(meta["name"]), str(meta["namespace"])


def _owned(obj: dict[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    kopf.adopt(obj, owner=job)  # type: ignore[arg-type]
    return obj


def service(job: Mapping[str, Any]) -> dict[str, Any]:
    """The headless Service that gives each pod a stable DNS name (`<job>-0.<job>.<ns>.svc`).

    `publishNotReadyAddresses`: rank 0 must be resolvable while the group rendezvouses,
    before any pod is Ready.
    """
    name, namespace = _meta(job)
    return _owned(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": names.service(name),
                "namespace": namespace,
                "labels": labels(name),
            },
            "spec": {
                "clusterIP": "None",
                "publishNotReadyAddresses": True,
                "selector": labels(name),
                "ports": [
                    {
                        "name": names.RENDEZVOUS_PORT_NAME,
                        "port": master_port(job),
                        "targetPort": master_port(job),
                    }
                ],
            },
        },
        job,
    )


def service_account(job: Mapping[str, Any], defaults: Defaults = NO_DEFAULTS) -> dict[str, Any]:
    """The pods' identity; with Workload Identity, it also stands for a Google account."""
    name, namespace = _meta(job)
    metadata: dict[str, Any] = {
        "name": names.runtime_account(name),
        "namespace": namespace,
        "labels": labels(name),
    }
    if defaults.gcp_service_account:
        metadata["annotations"] = {WORKLOAD_IDENTITY_ANNOTATION: defaults.gcp_service_account}
    return _owned({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata}, job)


def role(job: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime's rights: `patch` its own job's status, and read (get, list, watch) its own job.

    The launcher watches its job for the membership of a warm recovery (status.group); the
    names restrict the list and watch to a `metadata.name` field selector. The status is
    never read-then-written: the fence rides in the patch (a `test` of status.attempt) and
    in the CRD (the latest checkpoint never goes back).
    """
    name, namespace = _meta(job)
    return _owned(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {
                "name": names.runtime_account(name),
                "namespace": namespace,
                "labels": labels(name),
            },
            "rules": [
                {
                    "apiGroups": [names.GROUP],
                    "resources": [f"{names.PLURAL}/status"],
                    "resourceNames": [name],
                    "verbs": ["patch"],
                },
                {
                    "apiGroups": [names.GROUP],
                    "resources": [names.PLURAL],
                    "resourceNames": [name],
                    "verbs": ["get", "list", "watch"],
                },
            ],
        },
        job,
    )


def role_binding(job: Mapping[str, Any]) -> dict[str, Any]:
    """Binds the Role to the per-job ServiceAccount, and to the template's own one if set."""
    name, namespace = _meta(job)
    accounts = [names.runtime_account(name)]
    custom = _template_spec(job).get("serviceAccountName")
    if custom and custom not in accounts:
        accounts.append(str(custom))
    return _owned(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": names.runtime_account(name),
                "namespace": namespace,
                "labels": labels(name),
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": names.runtime_account(name),
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": account, "namespace": namespace}
                for account in accounts
            ],
        },
        job,
    )


def statefulset(
    job: Mapping[str, Any],
    *,
    attempt: int,
    resume_from: str | None,
    replicas: int,
    defaults: Defaults = NO_DEFAULTS,
    mtbf_seconds: float | None = None,
) -> dict[str, Any]:
    """The StatefulSet that runs incarnation `attempt` of the group with `replicas` pods.

    `mtbf_seconds` is the attempt's status.group.mtbfSeconds (its pods' checkpoint cadences).

    `OnDelete`: a template change (a new attempt) reaches pods only when the operator
    deletes the old ones, all at once, so no pod of a new attempt runs beside an old one
    by the controller's doing. `Parallel`: every pod starts at once (DDP needs them all).
    """
    name, namespace = _meta(job)
    spec: dict[str, Any] = {
        "replicas": replicas,
        "serviceName": names.service(name),
        "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "OnDelete"},
        "revisionHistoryLimit": 2,
        "selector": {"matchLabels": labels(name)},
        "template": pod_template(
            job,
            attempt=attempt,
            resume_from=resume_from,
            defaults=defaults,
            mtbf_seconds=mtbf_seconds,
            pods=replicas,
        ),
    }
    return _owned(
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {
                "name": names.statefulset(name),
                "namespace": namespace,
                "labels": labels(name),
                "annotations": {names.SPEC_HASH_ANNOTATION: spec_hash(spec)},
            },
            "spec": spec,
        },
        job,
    )


def spec_hash(spec: Mapping[str, Any]) -> str:
    """A short hash of a StatefulSet spec as built, to tell whether the live one is current."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def master_port(job: Mapping[str, Any]) -> int:
    """Rank 0's rendezvous port: fixed, since every pod has an address of its own."""
    return contract.DEFAULT_MASTER_PORT


def command(trainer: Mapping[str, Any]) -> list[str]:
    """The container command: the launcher, then the user's function or script."""
    function = trainer.get("function")
    if function:
        return ["spotrun", "launch", "--function", str(function)]
    return [
        "spotrun",
        "launch",
        "--",
        *[str(c) for c in trainer.get("command") or []],
        *[str(a) for a in trainer.get("args") or []],
    ]


def contract_env(
    job: Mapping[str, Any],
    *,
    attempt: int,
    resume_from: str | None,
    defaults: Defaults = NO_DEFAULTS,
    mtbf_seconds: float | None = None,
    pods: int | None = None,
) -> list[dict[str, Any]]:
    """The pod contract as container env; the node rank comes from the pod-index label."""
    name, namespace = _meta(job)
    spec = job.get("spec", {})
    checkpoint = spec.get("checkpoint") or {}
    trainer = spec.get("trainer") or {}
    pod = PodContract(
        job=name,
        namespace=namespace,
        attempt=attempt,
        replicas=int(spec.get("replicas", 1)),
        nproc_per_node=int(spec.get("nprocPerNode", 1)),
        storage=storage(job, defaults),
        resume_from=resume_from,
        config=spec.get("config") or {},
        checkpoint=CheckpointSettings.from_spec(checkpoint),
        master_addr=names.master_addr(name, namespace),
        # A port per attempt: the group of a warm recovery meets on a fresh TCPStore, which
        # no member of an older group can reach (the kept pods read it from status.group).
        master_port=rendezvous_port(master_port(job), attempt),
        function=trainer.get("function") or None,
        status_sink=STATUS_SINK_KUBERNETES,
    )
    env: list[dict[str, Any]] = [
        {"name": key, "value": value}
        for key, value in pod.to_env().items()
        if key != contract.NODE_RANK
    ]
    env.append(
        {
            "name": contract.NODE_RANK,
            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{names.POD_INDEX_LABEL}']"}},
        }
    )
    recovery = str(spec.get("recovery", "Warm")).lower()
    env.append({"name": contract.RECOVERY, "value": "cold" if recovery == "cold" else "warm"})
    elastic = spec.get("elastic")
    if elastic is not None:
        # The data loader keeps the global batch or each replica's as the group resizes,
        # and needs the target to tell a smaller group from a smaller job.
        batch = "perReplica" if elastic.get("batch") == "perReplica" else "global"
        env.append({"name": contract.ELASTIC_BATCH, "value": batch})
        env.append({"name": contract.TARGET_REPLICAS, "value": str(int(spec.get("replicas", 1)))})
    env.extend(pool_env(job, pods))
    # The launcher then keeps the container alive after training returned, so that
    # `restartPolicy: Always` does not rerun it; the operator marks the job Succeeded and
    # scales the StatefulSet to 0.
    env.append({"name": contract.HOLD_AFTER_SUCCESS, "value": "1"})
    # The launcher's deadline follows the pod's grace period, and the progress reports the
    # hang deadline (spotrun.contract.timing_env, the same rule as `spotrun run`).
    env.extend({"name": k, "value": v} for k, v in contract.timing_env(spec).items())
    # The job's mean time between interruptions so far: its checkpoint cadences' MTBF.
    env.extend({"name": k, "value": v} for k, v in contract.observed_mtbf_env(mtbf_seconds).items())
    return env


def pool_env(job: Mapping[str, Any], pods: int | None = None) -> list[dict[str, Any]]:
    """What a pod learns of the pool (spec.spares) from its env, for a StatefulSet of `pods`.

    SPOTRUN_SPARES is how many pods run beyond spec.replicas (`pods` - replicas; spec.spares
    when `pods` is None): they wait outside the group until a warm recovery puts one in a
    lost member's place. It can exceed spec.spares for a while after spec.spares is lowered,
    while a member still sits at an ordinal beyond the new pool. A warm job's pods also get
    every replica's address: rank 0 moves when a group re-forms without replica 0 (an
    elastic group without it, or a spare in its place), and spec.spares may be raised later.
    """
    name, namespace = _meta(job)
    spec = job.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    spares = int(spec.get("spares") or 0) if pods is None else max(0, pods - replicas)
    env: list[dict[str, Any]] = []
    if spares:
        env.append({"name": contract.SPARES, "value": str(spares)})
    if str(spec.get("recovery", "Warm")).lower() != "cold":
        member = f"{names.statefulset(name)}-{{index}}.{names.service(name)}.{namespace}.svc"
        env.append({"name": contract.MEMBER_ADDR, "value": member})
    return env


def pool_patch(job: Mapping[str, Any], pods: int) -> dict[str, Any]:
    """A strategic merge patch that resizes a running attempt's StatefulSet to `pods`.

    spec.spares changed: the StatefulSet controller adds or removes the pods beyond the
    group, and those it adds get the pool's new size (pool_env) from the template; nothing
    else of the attempt's template changes (OnDelete: no running pod is touched).
    """
    env = pool_env(job, pods)
    if not any(e["name"] == contract.SPARES for e in env):
        env.append({"name": contract.SPARES, "value": "0"})
    container = {"name": names.TRAINER_CONTAINER, "env": env}
    return {"spec": {"replicas": pods, "template": {"spec": {"containers": [container]}}}}


def pod_template(
    job: Mapping[str, Any],
    *,
    attempt: int,
    resume_from: str | None,
    defaults: Defaults = NO_DEFAULTS,
    mtbf_seconds: float | None = None,
    pods: int | None = None,
) -> dict[str, Any]:
    """The pod template of one attempt: the user's overrides merged under the contract."""
    name, _ = _meta(job)
    template = (job.get("spec") or {}).get("template") or {}
    user_meta = template.get("metadata") or {}
    pod_labels = {
        **{str(k): str(v) for k, v in (user_meta.get("labels") or {}).items()},
        **labels(name),
        names.ATTEMPT_LABEL: str(attempt),
    }
    metadata: dict[str, Any] = {"labels": pod_labels}
    if user_meta.get("annotations"):
        metadata["annotations"] = {str(k): str(v) for k, v in user_meta["annotations"].items()}
    spec = pod_spec(
        job,
        attempt=attempt,
        resume_from=resume_from,
        defaults=defaults,
        mtbf_seconds=mtbf_seconds,
        pods=pods,
    )
    return {"metadata": metadata, "spec": spec}


def pod_spec(
    job: Mapping[str, Any],
    *,
    attempt: int,
    resume_from: str | None,
    defaults: Defaults = NO_DEFAULTS,
    mtbf_seconds: float | None = None,
    pods: int | None = None,
) -> dict[str, Any]:
    """The pod spec: the contract's trainer container, restricted defaults, user overrides.

    The user's `spec.template.spec` wins for every field except FIXED_POD_FIELDS; its
    volumes and extra containers are added to ours, its `trainer` container entry is merged
    into the trainer (env, volumeMounts and ports appended; command, image and the contract
    env stay ours), and securityContexts are merged key by key. `serviceAccountName` may be
    overridden (e.g. for GKE Workload Identity): the RoleBinding then names it too.
    """
    name, _ = _meta(job)
    spec = job.get("spec") or {}
    trainer = spec.get("trainer") or {}
    user = copy.deepcopy(dict(_template_spec(job)))

    container: dict[str, Any] = {
        "name": names.TRAINER_CONTAINER,
        "image": str(trainer.get("image", "")),
        "command": command(trainer),
        "env": [
            *[dict(e) for e in trainer.get("env") or [] if e.get("name") not in RESERVED_ENV],
            *contract_env(
                job,
                attempt=attempt,
                resume_from=resume_from,
                defaults=defaults,
                mtbf_seconds=mtbf_seconds,
                pods=pods,
            ),
        ],
        "ports": [{"name": names.RENDEZVOUS_PORT_NAME, "containerPort": master_port(job)}],
        "volumeMounts": [{"name": names.SHM_VOLUME, "mountPath": "/dev/shm"}],
        "securityContext": copy.deepcopy(CONTAINER_SECURITY_CONTEXT),
    }
    if trainer.get("resources"):
        container["resources"] = copy.deepcopy(dict(trainer["resources"]))
    if trainer.get("imagePullPolicy"):
        container["imagePullPolicy"] = trainer["imagePullPolicy"]

    sidecars: list[dict[str, Any]] = []
    for extra in user.get("containers") or []:
        if extra.get("name") == names.TRAINER_CONTAINER:
            _merge_trainer(container, extra)
        else:
            sidecars.append(dict(extra))

    pod: dict[str, Any] = {
        "serviceAccountName": names.runtime_account(name),
        "enableServiceLinks": False,
        "securityContext": copy.deepcopy(POD_SECURITY_CONTEXT),
        "volumes": [{"name": names.SHM_VOLUME, "emptyDir": {"medium": "Memory"}}],
    }
    for key, value in user.items():
        if key in FIXED_POD_FIELDS:
            continue
        if key == "volumes":
            pod["volumes"] = [*pod["volumes"], *value]
        elif key == "securityContext":
            pod["securityContext"] = {**pod["securityContext"], **value}
        else:
            pod[key] = value
    pod.update(
        restartPolicy="Always",
        automountServiceAccountToken=True,
        containers=[container, *sidecars],
    )
    return pod


def _merge_trainer(container: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Folds the template's `trainer` entry into the trainer container (see pod_spec)."""
    for key, value in extra.items():
        if key in ("name", "image", "command", "args"):
            continue
        if key == "env":
            user_env = [dict(e) for e in value if e.get("name") not in RESERVED_ENV]
            container["env"] = [*user_env, *container["env"]]
        elif key in ("volumeMounts", "ports", "envFrom"):
            container[key] = [*container.get(key, []), *value]
        elif key == "securityContext":
            container[key] = {**container[key], **value}
        else:
            container[key] = copy.deepcopy(value)


def _template_spec(job: Mapping[str, Any]) -> Mapping[str, Any]:
    template = (job.get("spec") or {}).get("template") or {}
    spec: Mapping[str, Any] = template.get("spec") or {}
    return spec


def runtime_children(
    job: Mapping[str, Any], defaults: Defaults = NO_DEFAULTS
) -> Sequence[dict[str, Any]]:
    """The children that do not change with the attempt, in creation order."""
    return [service_account(job, defaults), role(job), role_binding(job), service(job)]
