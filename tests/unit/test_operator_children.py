"""children: the Service, StatefulSet, pod and RBAC a TrainJob gets, as specified."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import pytest

from spotrun.contract import PodContract
from spotrun.local.trainjob import crd_rules
from spotrun_operator import children

UID = "6f1c1b0e-1d4e-4c57-9d0a-1a2b3c4d5e6f"


def make_job(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "replicas": 4,
        "nprocPerNode": 8,
        "trainer": {
            "image": "ghcr.io/acme/train:1",
            "function": "train:main",
            "env": [{"name": "WANDB_MODE", "value": "offline"}],
            "resources": {"limits": {"nvidia.com/gpu": "8"}},
        },
        "config": {"lr": 0.001},
        "checkpoint": {"storage": "gs://bucket/runs", "numToKeep": 3},
    }
    base.update(spec)
    return {
        "apiVersion": "spotrun.dev/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "llama", "namespace": "team-a", "uid": UID, "labels": {"team": "a"}},
        "spec": base,
    }


def pod(job: dict[str, Any], attempt: int = 3, resume: str | None = "gs://bucket/runs/x") -> Any:
    spec = job["spec"]
    pool = int(spec.get("replicas", 1)) + int(spec.get("spares") or 0)
    sts = children.statefulset(job, attempt=attempt, resume_from=resume, replicas=pool)
    return sts["spec"]["template"]


def env_of(template: dict[str, Any]) -> dict[str, Any]:
    trainer = template["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in trainer["env"]}


def owned_by_the_job(obj: dict[str, Any]) -> bool:
    refs = obj["metadata"]["ownerReferences"]
    return refs == [
        {
            "apiVersion": "spotrun.dev/v1alpha1",
            "kind": "TrainJob",
            "name": "llama",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def test_headless_service_publishes_not_ready_addresses() -> None:
    svc = children.service(make_job())
    assert svc["metadata"]["name"] == "llama"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"spotrun.dev/job": "llama"}
    assert owned_by_the_job(svc)


def test_statefulset_is_parallel_on_delete_and_selects_the_job() -> None:
    sts = children.statefulset(make_job(), attempt=3, resume_from=None, replicas=4)
    spec = sts["spec"]
    assert (spec["podManagementPolicy"], spec["updateStrategy"], spec["replicas"]) == (
        "Parallel",
        {"type": "OnDelete"},
        4,
    )
    assert spec["serviceName"] == "llama"
    assert spec["selector"] == {"matchLabels": {"spotrun.dev/job": "llama"}}
    assert spec["template"]["metadata"]["labels"]["spotrun.dev/attempt"] == "3"
    assert spec["template"]["spec"]["restartPolicy"] == "Always"
    assert owned_by_the_job(sts)


def test_the_spec_hash_changes_with_the_attempt_and_resume_point_only() -> None:
    job = make_job()

    def digest(attempt: int, resume: str | None) -> str:
        sts = children.statefulset(job, attempt=attempt, resume_from=resume, replicas=4)
        return str(sts["metadata"]["annotations"]["spotrun.dev/spec-hash"])

    assert digest(1, None) == digest(1, None)
    assert len({digest(1, None), digest(2, None), digest(2, "gs://b/c")}) == 3


def test_pod_env_follows_the_pod_contract() -> None:
    env = env_of(pod(make_job()))
    expected = PodContract(
        job="llama",
        namespace="team-a",
        attempt=3,
        replicas=4,
        nproc_per_node=8,
        storage="gs://bucket/runs",
        resume_from="gs://bucket/runs/x",
        config={"lr": 0.001},
        master_addr="llama-0.llama.team-a.svc",
        master_port=29503,  # 29500 + the attempt: each attempt meets on a fresh port
        function="train:main",
        status_sink="kubernetes",
    ).to_env()
    expected.pop("SPOTRUN_NODE_RANK")
    expected["SPOTRUN_CHECKPOINT"] = env["SPOTRUN_CHECKPOINT"]
    for name, value in expected.items():
        assert env[name] == value, name
    assert json.loads(env["SPOTRUN_CHECKPOINT"])["numToKeep"] == 3
    assert env["SPOTRUN_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}
    }
    assert env["SPOTRUN_HOLD_AFTER_SUCCESS"] == "1"
    assert env["SPOTRUN_RECOVERY"] == "warm"
    assert env["WANDB_MODE"] == "offline"


def test_a_job_without_elastic_gets_no_elastic_env() -> None:
    env = env_of(pod(make_job()))
    assert "SPOTRUN_ELASTIC_BATCH" not in env
    assert "SPOTRUN_TARGET_REPLICAS" not in env


@pytest.mark.parametrize(
    ("elastic", "batch"),
    [
        pytest.param(
            {"minReplicas": 2, "waitSeconds": 60, "batch": "global"}, "global", id="global"
        ),
        pytest.param({"minReplicas": 2, "batch": "perReplica"}, "perReplica", id="perReplica"),
        pytest.param({}, "global", id="the default, before the API server filled it in"),
    ],
)
def test_an_elastic_job_gets_its_batch_rule_and_target_size(
    elastic: dict[str, Any], batch: str
) -> None:
    env = env_of(pod(make_job(elastic=elastic)))
    assert env["SPOTRUN_ELASTIC_BATCH"] == batch
    assert env["SPOTRUN_TARGET_REPLICAS"] == "4"
    # Rank 0's address follows the first member when replica 0 is not in the group.
    member = env["SPOTRUN_MEMBER_ADDR"]
    assert member.replace("{index}", "0") == env["MASTER_ADDR"]


def test_a_job_with_spares_tells_its_pods_the_pool_and_every_members_address() -> None:
    env = env_of(pod(make_job(spares=2)))
    assert env["SPOTRUN_SPARES"] == "2"
    assert env["SPOTRUN_REPLICAS"] == "4"  # the group's size; the pool is 6 pods
    # A spare may take node rank 0's place: rank 0's address follows the first member.
    assert env["SPOTRUN_MEMBER_ADDR"].replace("{index}", "0") == env["MASTER_ADDR"]
    assert "SPOTRUN_ELASTIC_BATCH" not in env
    for absent in (make_job(), make_job(spares=0)):
        assert "SPOTRUN_SPARES" not in env_of(pod(absent))
        # spec.spares may be raised later, and then a spare may take node rank 0.
        assert env_of(pod(absent))["SPOTRUN_MEMBER_ADDR"] == env["SPOTRUN_MEMBER_ADDR"]
    assert "SPOTRUN_MEMBER_ADDR" not in env_of(pod(make_job(recovery="Cold")))


def test_a_pool_larger_than_spec_spares_tells_new_pods_its_real_size() -> None:
    # spec.spares lowered to 1 while a member sits at ordinal 6: the set keeps 7 pods.
    job = make_job(spares=1)
    sts = children.statefulset(job, attempt=3, resume_from=None, replicas=7)
    assert env_of(sts["spec"]["template"])["SPOTRUN_SPARES"] == "3"


def test_the_pool_patch_resizes_the_set_and_touches_only_the_pools_env() -> None:
    patch = children.pool_patch(make_job(spares=2), 6)
    assert patch["spec"]["replicas"] == 6
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "trainer"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SPOTRUN_SPARES"] == "2" and "{index}" in env["SPOTRUN_MEMBER_ADDR"]
    assert set(env) == {"SPOTRUN_SPARES", "SPOTRUN_MEMBER_ADDR"}
    # Lowered to none: the value is written as 0, which a launcher reads as none.
    lowered = children.pool_patch(make_job(spares=0), 4)
    (container,) = lowered["spec"]["template"]["spec"]["containers"]
    assert {"name": "SPOTRUN_SPARES", "value": "0"} in container["env"]


def test_user_env_cannot_set_the_elastic_contract() -> None:
    job = make_job(elastic={"batch": "global"})
    job["spec"]["trainer"]["env"] += [
        {"name": "SPOTRUN_ELASTIC_BATCH", "value": "perReplica"},
        {"name": "SPOTRUN_TARGET_REPLICAS", "value": "64"},
    ]
    names = [e["name"] for e in pod(job)["spec"]["containers"][0]["env"]]
    assert names.count("SPOTRUN_ELASTIC_BATCH") == names.count("SPOTRUN_TARGET_REPLICAS") == 1
    env = env_of(pod(job))
    assert (env["SPOTRUN_ELASTIC_BATCH"], env["SPOTRUN_TARGET_REPLICAS"]) == ("global", "4")


def test_the_operator_filters_exactly_the_names_the_crd_refuses() -> None:
    (rule,) = [r for p, r in crd_rules() if p == ("spec", "trainer", "env")]
    assert frozenset(re.findall(r"'([^']+)'", rule)) == children.RESERVED_ENV


def test_the_contract_env_wins_over_user_env_of_the_same_name() -> None:
    job = make_job()
    job["spec"]["trainer"]["env"].append({"name": "SPOTRUN_ATTEMPT", "value": "99"})
    names = [e["name"] for e in pod(job)["spec"]["containers"][0]["env"]]
    assert names.count("SPOTRUN_ATTEMPT") == 1
    assert env_of(pod(job))["SPOTRUN_ATTEMPT"] == "3"


@pytest.mark.parametrize(
    ("template", "launcher_grace"),
    [
        pytest.param(None, "25", id="Kubernetes' default 30 s"),
        pytest.param({"spec": {}}, "25", id="a template without a grace"),
        pytest.param({"spec": {"terminationGracePeriodSeconds": 60}}, "55", id="60 s"),
        pytest.param({"spec": {"terminationGracePeriodSeconds": 10}}, "8", id="10 s"),
        pytest.param({"spec": {"terminationGracePeriodSeconds": 3}}, "2", id="3 s"),
        pytest.param({"spec": {"terminationGracePeriodSeconds": 0}}, "0", id="none at all"),
    ],
)
def test_the_launcher_deadline_follows_the_pods_grace_period(
    template: dict[str, Any] | None, launcher_grace: str
) -> None:
    job = make_job(**({"template": template} if template is not None else {}))
    assert env_of(pod(job))["SPOTRUN_GRACE_SECONDS"] == launcher_grace


@pytest.mark.parametrize(
    ("deadline", "interval"),
    [
        pytest.param(None, "10", id="no deadline: every 10 s"),
        pytest.param(600, "10", id="a long deadline: every 10 s"),
        pytest.param(9, "3", id="three reports per deadline"),
        pytest.param(10, "3.33333", id="10 s"),
        pytest.param(2, "1", id="at most one a second"),
    ],
)
def test_progress_reports_follow_the_hang_deadline(deadline: int | None, interval: str) -> None:
    policy = {"progressDeadlineSeconds": deadline} if deadline is not None else {}
    job = make_job(failurePolicy=policy)
    assert env_of(pod(job))["SPOTRUN_PROGRESS_SECONDS"] == interval


def test_user_env_cannot_set_the_timing_the_operator_derives() -> None:
    job = make_job(template={"spec": {"terminationGracePeriodSeconds": 60}})
    job["spec"]["trainer"]["env"].append({"name": "SPOTRUN_GRACE_SECONDS", "value": "300"})
    names = [e["name"] for e in pod(job)["spec"]["containers"][0]["env"]]
    assert names.count("SPOTRUN_GRACE_SECONDS") == 1
    assert env_of(pod(job))["SPOTRUN_GRACE_SECONDS"] == "55"


@pytest.mark.parametrize(
    ("trainer", "command"),
    [
        ({"function": "pkg.mod:fn"}, ["spotrun", "launch", "--function", "pkg.mod:fn"]),
        (
            {"command": ["python", "train.py"], "args": ["--lr", "3"]},
            ["spotrun", "launch", "--", "python", "train.py", "--lr", "3"],
        ),
        (
            {"command": ["python", "-m", "train"]},
            ["spotrun", "launch", "--", "python", "-m", "train"],
        ),
    ],
)
def test_container_command_wraps_the_users_code_in_the_launcher(
    trainer: dict[str, Any], command: list[str]
) -> None:
    job = make_job(trainer={"image": "img", **trainer})
    assert pod(job)["spec"]["containers"][0]["command"] == command


def test_pod_defaults_shm_token_and_restricted_security() -> None:
    spec = pod(make_job())["spec"]
    trainer = spec["containers"][0]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in spec["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    assert spec["serviceAccountName"] == "llama-runtime"
    assert spec["automountServiceAccountToken"] is True
    assert spec["enableServiceLinks"] is False
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert trainer["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    assert trainer["resources"] == {"limits": {"nvidia.com/gpu": "8"}}


def test_template_overrides_are_merged_but_cannot_break_the_contract() -> None:
    template = {
        "metadata": {"labels": {"spotrun.dev/attempt": "0", "team": "a"}},
        "spec": {
            "nodeSelector": {"cloud.google.com/gke-spot": "true"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
            "terminationGracePeriodSeconds": 120,
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "serviceAccountName": "workload-identity",
            "securityContext": {"runAsNonRoot": False, "fsGroup": 1000},
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            "containers": [
                {
                    "name": "trainer",
                    "image": "evil",
                    "command": ["sh"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    "env": [{"name": "HF_HOME", "value": "/data/hf"}],
                },
                {"name": "log-shipper", "image": "fluent-bit"},
            ],
        },
    }
    job = make_job(template=template)
    tpl = pod(job)
    spec = tpl["spec"]
    trainer = spec["containers"][0]
    assert tpl["metadata"]["labels"] == {
        "team": "a",
        "spotrun.dev/job": "llama",
        "spotrun.dev/attempt": "3",
    }
    assert spec["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert spec["terminationGracePeriodSeconds"] == 120
    assert spec["restartPolicy"] == "Always"
    assert spec["automountServiceAccountToken"] is True
    assert spec["serviceAccountName"] == "workload-identity"
    assert spec["securityContext"] == {
        "runAsNonRoot": False,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert [v["name"] for v in spec["volumes"]] == ["dshm", "data"]
    assert (trainer["image"], trainer["command"][:2]) == (
        "ghcr.io/acme/train:1",
        ["spotrun", "launch"],
    )
    assert [m["mountPath"] for m in trainer["volumeMounts"]] == ["/dev/shm", "/data"]
    assert env_of(tpl)["HF_HOME"] == "/data/hf"
    assert [c["name"] for c in spec["containers"]] == ["trainer", "log-shipper"]
    # The custom ServiceAccount is bound to the runtime's Role as well.
    subjects = children.role_binding(job)["subjects"]
    assert [s["name"] for s in subjects] == ["llama-runtime", "workload-identity"]


def test_the_runtime_may_only_patch_its_own_jobs_status_and_read_its_own_job() -> None:
    job = make_job()
    role = children.role(job)
    assert role["rules"] == [
        {
            "apiGroups": ["spotrun.dev"],
            "resources": ["trainjobs/status"],
            "resourceNames": ["llama"],
            "verbs": ["patch"],
        },
        {
            "apiGroups": ["spotrun.dev"],
            "resources": ["trainjobs"],
            "resourceNames": ["llama"],
            "verbs": ["get", "list", "watch"],
        },
    ]
    binding = children.role_binding(job)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "llama-runtime",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "llama-runtime", "namespace": "team-a"}
    ]
    assert children.service_account(job)["metadata"]["name"] == "llama-runtime"
    for child in children.runtime_children(job):
        assert owned_by_the_job(child), child["kind"]


def test_builders_do_not_mutate_the_job() -> None:
    job = make_job(template={"spec": {"volumes": [{"name": "v", "emptyDir": {}}]}})
    before = copy.deepcopy(job)
    children.statefulset(job, attempt=1, resume_from=None, replicas=4)
    children.runtime_children(job)
    assert job == before


def test_operator_defaults_fill_in_storage_and_workload_identity() -> None:
    defaults = children.Defaults.from_env(
        {
            "SPOTRUN_DEFAULT_STORAGE": "gs://ckpt-bucket/spotrun",
            "SPOTRUN_RUNTIME_GCP_SERVICE_ACCOUNT": "trainer@proj.iam.gserviceaccount.com",
        }
    )
    job = make_job(checkpoint={})
    sts = children.statefulset(job, attempt=1, resume_from=None, replicas=4, defaults=defaults)
    assert env_of(sts["spec"]["template"])["SPOTRUN_STORAGE"] == "gs://ckpt-bucket/spotrun"
    account = children.service_account(job, defaults)
    assert account["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "trainer@proj.iam.gserviceaccount.com"
    }
    # A job's own storage wins over the default.
    own = children.statefulset(
        make_job(), attempt=1, resume_from=None, replicas=4, defaults=defaults
    )
    assert env_of(own["spec"]["template"])["SPOTRUN_STORAGE"] == "gs://bucket/runs"
    assert "annotations" not in children.service_account(make_job())["metadata"]
