"""TrainJob files: good ones load with the CRD's defaults, bad ones fail like the cluster."""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from spotrun.lifecycle import JobSpec
from spotrun.local.trainjob import (
    TrainJobError,
    apply_defaults,
    load_trainjob,
    mirrored_rules,
    openapi_schema,
    parse_trainjob,
    rule_message,
    trainjob_from_dict,
)

HEADER = "apiVersion: spotrun.dev/v1alpha1\nkind: TrainJob\n"

MINIMAL = HEADER + textwrap.dedent(
    """\
    metadata:
      name: linear
    spec:
      trainer:
        image: ghcr.io/example/train:1
        function: examples.train_linear:train_func
    """
)

FULL = HEADER + textwrap.dedent(
    """\
    metadata:
      name: llm-7b
      namespace: research
      labels: {team: nlp}
    spec:
      replicas: 4
      nprocPerNode: 8
      trainer:
        image: ghcr.io/example/train:2
        imagePullPolicy: IfNotPresent
        command: [python, train.py]
        args: ["--epochs", "3"]
        env:
          - {name: NCCL_DEBUG, value: WARN}
          - name: HF_TOKEN
            valueFrom: {secretKeyRef: {name: hf, key: token}}
        resources:
          requests: {cpu: "8", memory: 64Gi}
          limits: {nvidia.com/gpu: 8}
      template:
        spec:
          nodeSelector: {cloud.google.com/gke-spot: "true"}
          tolerations: [{key: cloud.google.com/gke-spot, operator: Exists}]
          terminationGracePeriodSeconds: 25
      config: {lr: 0.0003, layers: [1, 2]}
      checkpoint:
        storage: gs://bucket/runs
        numToKeep: 3
        scoreAttribute: loss
        scoreOrder: min
        keepAllRanks: true
        async: false
      resumeFrom: gs://bucket/runs/research/llm-7b-v1/ckpt-000040
      failurePolicy:
        maxFailures: 5
        maxPreemptions: 100
        backoff: {initialSeconds: 1, maxSeconds: 60, jitter: 0.5}
        circuitBreaker: {failures: 3, windowSeconds: 600}
        progressDeadlineSeconds: 1800
      suspend: true
      ttlSecondsAfterFinished: 3600
    """
)


def write(tmp_path: Path, text: str, name: str = "trainjob.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- good files ------------------------------------------------------------------------


def test_minimal_file_gets_the_crd_defaults(tmp_path: Path) -> None:
    job = load_trainjob(write(tmp_path, MINIMAL))
    assert (job.name, job.namespace, job.replicas, job.nproc_per_node) == (
        "linear",
        "default",
        1,
        1,
    )
    assert job.trainer.function == "examples.train_linear:train_func"
    assert job.trainer.command is None
    assert job.checkpoint.storage is None
    assert job.checkpoint.settings.score_order == "max"
    assert job.checkpoint.settings.async_save is True
    assert job.checkpoint.settings.keep_all_ranks is False
    assert (job.failure_policy.max_failures, job.failure_policy.max_preemptions) == (3, -1)
    assert job.failure_policy.backoff.initial_seconds == 10.0
    assert job.suspend is False
    assert job.spec["failurePolicy"] == {
        "maxFailures": 3,
        "maxPreemptions": -1,
        "backoff": {"initialSeconds": 10, "maxSeconds": 300, "jitter": 0.2},
    }
    assert job.source == str(tmp_path / "trainjob.yaml")


def test_every_field_is_read(tmp_path: Path) -> None:
    job = load_trainjob(write(tmp_path, FULL))
    assert (job.name, job.namespace, job.world_size) == ("llm-7b", "research", 32)
    assert job.labels == {"team": "nlp"}
    assert job.trainer.command == ("python", "train.py")
    assert job.trainer.args == ("--epochs", "3")
    assert [e.name for e in job.trainer.env] == ["NCCL_DEBUG", "HF_TOKEN"]
    assert job.trainer.env[1].value_from == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert job.trainer.resources["limits"] == {"nvidia.com/gpu": 8}
    assert job.trainer.image_pull_policy == "IfNotPresent"
    assert job.config == {"lr": 0.0003, "layers": [1, 2]}
    assert job.checkpoint.storage == "gs://bucket/runs"
    settings = job.checkpoint.settings
    assert (settings.num_to_keep, settings.score_attribute, settings.score_order) == (
        3,
        "loss",
        "min",
    )
    assert (settings.keep_all_ranks, settings.async_save) == (True, False)
    assert job.resume_from == "gs://bucket/runs/research/llm-7b-v1/ckpt-000040"
    assert job.failure_policy.circuit_breaker is not None
    assert job.failure_policy.progress_deadline_seconds == 1800.0
    assert (job.suspend, job.ttl_seconds_after_finished) == (True, 3600)
    assert job.template["spec"]["terminationGracePeriodSeconds"] == 25


def test_the_lifecycle_spec_comes_from_the_same_file(tmp_path: Path) -> None:
    job = load_trainjob(write(tmp_path, FULL))
    spec = job.job_spec()
    assert spec == JobSpec.from_spec(job.spec)
    assert (spec.replicas, spec.grace_seconds, spec.ttl_seconds_after_finished) == (4, 25.0, 3600.0)
    assert spec.failure_policy.max_failures == 5


def test_a_multi_document_file_with_one_trainjob(tmp_path: Path) -> None:
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n" + MINIMAL
    assert load_trainjob(write(tmp_path, text)).name == "linear"


def test_quantities_may_be_integers_or_strings() -> None:
    text = MINIMAL + "    resources: {limits: {nvidia.com/gpu: 1, memory: 16Gi, cpu: 500m}}\n"
    assert parse_trainjob(text).trainer.resources["limits"]["memory"] == "16Gi"


def test_defaults_do_not_override_what_is_set() -> None:
    obj = {
        "spec": {
            "checkpoint": {"scoreOrder": "min"},
            "failurePolicy": {"backoff": {"jitter": 0}},
        }
    }
    out = apply_defaults(obj)
    assert out["spec"]["checkpoint"]["scoreOrder"] == "min"
    assert out["spec"]["failurePolicy"]["backoff"] == {
        "initialSeconds": 10,
        "maxSeconds": 300,
        "jitter": 0,
    }
    assert out["spec"]["suspend"] is False
    assert obj["spec"]["checkpoint"] == {"scoreOrder": "min"}, "the input is not modified"


def test_from_dict_validates_too() -> None:
    with pytest.raises(TrainJobError, match=r"<object>: spec.replicas: Invalid value: 0"):
        trainjob_from_dict(
            {
                "apiVersion": "spotrun.dev/v1alpha1",
                "kind": "TrainJob",
                "metadata": {"name": "x"},
                "spec": {"replicas": 0, "trainer": {"image": "i", "command": ["python"]}},
            }
        )


# -- bad files -------------------------------------------------------------------------
# (name, file text, the exact message line expected, its line number)

SPEC = HEADER + "metadata: {name: job}\nspec:\n"
TRAINER = "  trainer: {image: x, command: [python]}\n"

BAD: list[tuple[str, str, str]] = [
    (
        "malformed yaml",
        HEADER + "metadata: {name: job}\nspec:\n  trainer:\n    image: x\n   command: [python]\n",
        "trainjob.yaml:7: malformed YAML, column 4: expected <block end>, but found '<block "
        "mapping start>' "
        "(while parsing a block mapping)",
    ),
    (
        "tab indentation",
        HEADER + "metadata:\n\tname: job\n",
        "trainjob.yaml:4: malformed YAML, column 1: found character '\\t' that cannot start any "
        "token "
        "(while scanning for the next token)",
    ),
    ("empty file", "", "trainjob.yaml: the file is empty; expected a TrainJob"),
    (
        "not a mapping",
        "- a\n- b\n",
        "trainjob.yaml:1: expected a YAML mapping (apiVersion, kind, metadata, spec), got list",
    ),
    (
        "wrong apiVersion",
        "apiVersion: batch/v1\nkind: TrainJob\nmetadata: {name: job}\nspec: {}\n",
        "trainjob.yaml:1: apiVersion: is \"batch/v1\", expected 'spotrun.dev/v1alpha1': "
        "set `apiVersion: spotrun.dev/v1alpha1`",
    ),
    (
        "wrong kind",
        "apiVersion: spotrun.dev/v1alpha1\nkind: Job\nmetadata: {name: job}\nspec: {}\n",
        "trainjob.yaml:2: kind: is \"Job\", expected 'TrainJob': set `kind: TrainJob`",
    ),
    (
        "a kubeflow trainjob",
        "apiVersion: trainer.kubeflow.org/v1alpha1\nkind: TrainJob\nmetadata: {name: job}\n",
        'trainjob.yaml:1: apiVersion: is "trainer.kubeflow.org/v1alpha1", expected '
        "'spotrun.dev/v1alpha1': set `apiVersion: spotrun.dev/v1alpha1`",
    ),
    (
        "no name",
        HEADER + "metadata: {}\nspec:\n" + TRAINER,
        "trainjob.yaml:3: metadata.name: Required value: name the job (lowercase letters, digits "
        "and '-'); it names the run's checkpoint folder and, on a cluster, its pods",
    ),
    (
        "name too long",
        HEADER + "metadata: {name: " + "a" * 43 + "}\nspec:\n" + TRAINER,
        "trainjob.yaml:3: metadata.name: " + rule_message((), "self.metadata.name.size() <= 42"),
    ),
    (
        "name with a dot",
        HEADER + "metadata: {name: my.job}\nspec:\n" + TRAINER,
        "trainjob.yaml:3: metadata.name: metadata.name must be a DNS-1035 label: lowercase "
        "letters, "
        "digits and '-', starting with a letter and ending with a letter or digit (no dots), "
        "because it also names the job's headless Service",
    ),
    ("no spec", HEADER + "metadata: {name: job}\n", "trainjob.yaml:1: spec: Required value"),
    ("no trainer", SPEC + "  replicas: 2\n", "trainjob.yaml:4: spec.trainer: Required value"),
    (
        "no image",
        SPEC + "  trainer: {command: [python]}\n",
        "trainjob.yaml:5: spec.trainer.image: Required value",
    ),
    (
        "both command and function",
        SPEC + "  trainer: {image: x, command: [python], function: 'a:b'}\n",
        "trainjob.yaml:5: spec.trainer: set exactly one of trainer.command (a script to run, e.g. "
        "[python, train.py]) or trainer.function (module:fn, called with spec.config)",
    ),
    (
        "neither command nor function",
        SPEC + "  trainer: {image: x}\n",
        "trainjob.yaml:5: spec.trainer: set exactly one of trainer.command (a script to run, e.g. "
        "[python, train.py]) or trainer.function (module:fn, called with spec.config)",
    ),
    (
        "args with a function",
        SPEC + "  trainer: {image: x, function: 'a:b', args: [x]}\n",
        "trainjob.yaml:5: spec.trainer: trainer.args needs trainer.command: a trainer.function "
        "receives spec.config instead of arguments",
    ),
    (
        "function without a colon",
        SPEC + "  trainer: {image: x, function: train.main}\n",
        "trainjob.yaml:5: spec.trainer.function: trainer.function must be module:fn with a dotted "
        "Python module path and a function name, e.g. my_pkg.train:train_func",
    ),
    (
        "zero replicas",
        SPEC + "  replicas: 0\n" + TRAINER,
        "trainjob.yaml:5: spec.replicas: Invalid value: 0: should be greater than or equal to 1",
    ),
    (
        "replicas as a string",
        SPEC + "  replicas: '2'\n" + TRAINER,
        'trainjob.yaml:5: spec.replicas: Invalid value: "2": must be of type integer',
    ),
    (
        "misspelt field",
        SPEC + "  nprocPerNodes: 8\n" + TRAINER,
        'trainjob.yaml:5: spec.nprocPerNodes: unknown field "nprocPerNodes"; did you mean '
        "'nprocPerNode'?",
    ),
    (
        "duplicate field",
        SPEC + "  replicas: 2\n  replicas: 3\n" + TRAINER,
        "trainjob.yaml:6: spec.replicas: duplicate field: only its last value would count "
        "(kubectl keeps it silently); remove the others",
    ),
    (
        "storage without a scheme",
        SPEC + TRAINER + "  checkpoint: {storage: /mnt/ckpt}\n",
        "trainjob.yaml:6: spec.checkpoint.storage: checkpoint.storage must be a URL with a scheme, "
        "such as gs://bucket/prefix, s3://bucket/prefix or file:///shared/path (write a local path "
        "as file:///absolute/path)",
    ),
    (
        "resumeFrom without a scheme",
        SPEC + TRAINER + "  resumeFrom: ckpt-000012\n",
        "trainjob.yaml:6: spec.resumeFrom: resumeFrom must be the URL of a committed checkpoint, "
        "such as gs://bucket/prefix/default/old-job/ckpt-000012 (a status.latestCheckpoint.uri)",
    ),
    (
        "unknown score order",
        SPEC + TRAINER + "  checkpoint: {scoreOrder: highest}\n",
        'trainjob.yaml:6: spec.checkpoint.scoreOrder: Unsupported value: "highest": supported '
        'values: "max", "min"',
    ),
    (
        "zero checkpoints kept",
        SPEC + TRAINER + "  checkpoint: {numToKeep: 0}\n",
        "trainjob.yaml:6: spec.checkpoint.numToKeep: Invalid value: 0: should be greater than or "
        "equal to 1",
    ),
    (
        "preemption budget below -1",
        SPEC + TRAINER + "  failurePolicy: {maxPreemptions: -2}\n",
        "trainjob.yaml:6: spec.failurePolicy.maxPreemptions: Invalid value: -2: should be greater "
        "than or equal to -1",
    ),
    (
        "jitter above one",
        SPEC + TRAINER + "  failurePolicy:\n    backoff: {jitter: 1.5}\n",
        "trainjob.yaml:7: spec.failurePolicy.backoff.jitter: Invalid value: 1.5: should be less "
        "than or equal to 1",
    ),
    (
        "initial backoff above the maximum",
        SPEC + TRAINER + "  failurePolicy:\n    backoff: {initialSeconds: 600}\n",
        "trainjob.yaml:7: spec.failurePolicy.backoff: failurePolicy.backoff.initialSeconds must "
        "not "
        "exceed failurePolicy.backoff.maxSeconds",
    ),
    (
        "circuit breaker without a window",
        SPEC + TRAINER + "  failurePolicy:\n    circuitBreaker: {failures: 3}\n",
        "trainjob.yaml:7: spec.failurePolicy.circuitBreaker.windowSeconds: Required value",
    ),
    (
        "circuit breaker longer than the ledger",
        SPEC
        + TRAINER
        + "  failurePolicy:\n    circuitBreaker: {failures: 11, windowSeconds: 60}\n",
        "trainjob.yaml:7: spec.failurePolicy.circuitBreaker.failures: Invalid value: 11: should be "
        "less than or equal to 10",
    ),
    (
        "zero window",
        SPEC + TRAINER + "  failurePolicy:\n    circuitBreaker: {failures: 3, windowSeconds: 0}\n",
        "trainjob.yaml:7: spec.failurePolicy.circuitBreaker.windowSeconds: Invalid value: 0: "
        "should be "
        "greater than 0",
    ),
    (
        "a fractional cpu",
        SPEC + "  trainer: {image: x, command: [python], resources: {requests: {cpu: 0.5}}}\n",
        "trainjob.yaml:5: spec.trainer.resources.requests.cpu: Invalid value: 0.5: must be an "
        'integer or a quantity string such as "500m", "2" or "16Gi"',
    ),
    (
        "a bad quantity",
        SPEC + "  trainer: {image: x, command: [python], resources: {limits: {memory: lots}}}\n",
        'trainjob.yaml:5: spec.trainer.resources.limits.memory: Invalid value: "lots": should '
        "match",
    ),
    (
        "an env entry without a name",
        SPEC + "  trainer:\n    image: x\n    command: [python]\n    env:\n      - value: '1'\n",
        "trainjob.yaml:9: spec.trainer.env[0].name: Required value",
    ),
    (
        "env overriding the pod contract",
        SPEC + "  trainer:\n    image: x\n    command: [python]\n    env:\n"
        "      - {name: A, value: '1'}\n      - {name: SPOTRUN_ATTEMPT, value: '7'}\n",
        "trainjob.yaml:10: spec.trainer.env: trainer.env may not set the pod contract's variables",
    ),
    (
        "negative ttl",
        SPEC + TRAINER + "  ttlSecondsAfterFinished: -1\n",
        "trainjob.yaml:6: spec.ttlSecondsAfterFinished: Invalid value: -1: should be greater "
        "than or equal to 0",
    ),
    (
        "suspend as a string",
        SPEC + TRAINER + "  suspend: 'yes'\n",
        'trainjob.yaml:6: spec.suspend: Invalid value: "yes": must be of type boolean',
    ),
    (
        "two trainjobs in one file",
        MINIMAL + "---\n" + MINIMAL,
        "trainjob.yaml: the file holds 2 YAML documents and 2 of kind TrainJob; expected exactly "
        "one TrainJob",
    ),
]


@pytest.mark.parametrize(("text", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_file_is_rejected_with_a_message_that_says_where_and_what(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(TrainJobError) as caught:
        load_trainjob(path)
    lines = str(caught.value).splitlines()
    found = [line.strip().removeprefix(str(tmp_path) + "/") for line in lines]
    assert any(line.startswith(message) for line in found), "\n".join(found)


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    text = SPEC + "  replicas: 0\n  nprocPerNode: 0\n" + TRAINER
    with pytest.raises(TrainJobError) as caught:
        load_trainjob(write(tmp_path, text))
    error = caught.value
    assert [p.field for p in error.problems] == ["spec.nprocPerNode", "spec.replicas"]
    assert str(error).startswith(f"{tmp_path / 'trainjob.yaml'} is not a valid TrainJob:\n")
    assert str(error).endswith("`kubectl explain trainjob.spec` describes it).")


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(TrainJobError, match=r"nope.yaml: cannot read the file: No such file"):
        load_trainjob(tmp_path / "nope.yaml")


def test_mirrored_rules_read_their_messages_from_the_crd() -> None:
    for rule in mirrored_rules():
        message = rule_message(rule.schema_path, rule.rule)
        assert message and message[0].isalpha()


def test_an_unknown_rule_is_an_error_that_says_what_to_update() -> None:
    with pytest.raises(LookupError, match=r"update spotrun\.local\.trainjob\.MIRRORED_RULES"):
        rule_message(("spec",), "self.replicas < 3")


def _integer_fields(
    schema: Mapping[str, Any], path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str]]:
    """Every integer field of the spec schema that carries an OpenAPI format, and the format."""
    if schema.get("type") == "integer" and schema.get("format") in ("int32", "int64"):
        yield path, str(schema["format"])
    for name, sub in (schema.get("properties") or {}).items():
        yield from _integer_fields(sub, (*path, name))


SPEC_INTEGERS = list(_integer_fields(openapi_schema()["properties"]["spec"], ("spec",)))
LIMITS = {"int32": 2**31 - 1, "int64": 2**63 - 1}


def test_the_spec_has_integer_fields_with_formats() -> None:
    fields = {".".join(path) for path, _ in SPEC_INTEGERS}
    assert {"spec.replicas", "spec.failurePolicy.maxFailures"} <= fields
    assert "spec.template.spec.terminationGracePeriodSeconds" in fields


@pytest.mark.parametrize(
    ("path", "fmt"), SPEC_INTEGERS, ids=[".".join(p) for p, _ in SPEC_INTEGERS]
)
def test_integers_past_their_format_are_refused_as_the_api_server_refuses_them(
    path: tuple[str, ...], fmt: str
) -> None:
    obj = parse_trainjob(MINIMAL).manifest
    body = copy.deepcopy(dict(obj))
    node = body
    for part in path[:-1]:
        node = node.setdefault(part, {})
    node[path[-1]] = LIMITS[fmt] + 1
    with pytest.raises(TrainJobError) as caught:
        trainjob_from_dict(body, "job.yaml")
    field = ".".join(path)
    assert any(
        p.field == field and f"must be of type integer with format {fmt}" in p.message
        for p in caught.value.problems
    ), str(caught.value)


def test_the_largest_int32_is_accepted() -> None:
    job = parse_trainjob(MINIMAL + "  failurePolicy: {maxFailures: 2147483647}\n")
    assert job.failure_policy.max_failures == 2**31 - 1
