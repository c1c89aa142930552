"""Reads a TrainJob file and rejects locally what the cluster would reject.

`spotrun run trainjob.yaml` must accept exactly the files `kubectl apply` accepts, so the
same file works in both places. The CRD shipped as package data is the only schema: its
openAPIV3Schema is translated to JSON Schema and checked with jsonschema, its defaults
are applied as the API server applies them, and the CEL rules that concern a file are
mirrored here, their messages read from the CRD by rule so that the two cannot drift.
Errors name the file, the line, the field and what was expected.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from spotrun.contract import CheckpointSettings
from spotrun.lifecycle.spec import FailurePolicy, JobSpec

GROUP = "spotrun.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "TrainJob"
CRD_RESOURCE = "trainjobs.spotrun.dev.yaml"
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a TrainJob: where (`field`, `line`) and what (`message`)."""

    field: str
    message: str
    line: int | None = None


class TrainJobError(ValueError):
    """A TrainJob file that cannot be run; the message says where, what and what to do."""

    def __init__(self, source: str, problems: Sequence[Problem], hint: str | None = None) -> None:
        self.source = source
        self.problems = tuple(problems)
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [_locate(self.source, p) for p in self.problems]
        text = (
            lines[0]
            if len(lines) == 1
            else (
                f"{self.source} is not a valid TrainJob:\n"
                + "\n".join(f"  {line}" for line in lines)
            )
        )
        return f"{text}\n{self.hint}" if self.hint else text


def _locate(source: str, problem: Problem) -> str:
    where = f"{source}:{problem.line}" if problem.line is not None else source
    return (
        f"{where}: {problem.field}: {problem.message}"
        if problem.field
        else f"{where}: {problem.message}"
    )


@dataclass(frozen=True)
class EnvVar:
    """One `trainer.env` entry; `value_from` is a core/v1 EnvVarSource, kept as given."""

    name: str
    value: str | None = None
    value_from: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Trainer:
    """`spec.trainer`: the image and what it runs (a command, or a function `module:fn`)."""

    image: str
    command: tuple[str, ...] | None = None
    args: tuple[str, ...] = ()
    function: str | None = None
    env: tuple[EnvVar, ...] = ()
    resources: Mapping[str, Any] = field(default_factory=dict)
    image_pull_policy: str | None = None


@dataclass(frozen=True)
class CheckpointSpec:
    """`spec.checkpoint`: the storage URL (None: the runner's default) and the settings."""

    storage: str | None
    settings: CheckpointSettings


@dataclass(frozen=True)
class TrainJob:
    """A validated TrainJob with the CRD's defaults applied.

    `manifest` is the whole object as the API server would store it (defaults included),
    for code that wants the raw spec, e.g. `JobSpec.from_spec(job.spec)`.
    """

    name: str
    namespace: str
    replicas: int
    nproc_per_node: int
    trainer: Trainer
    checkpoint: CheckpointSpec
    failure_policy: FailurePolicy
    config: Mapping[str, Any] = field(default_factory=dict)
    template: Mapping[str, Any] = field(default_factory=dict)
    resume_from: str | None = None
    suspend: bool = False
    ttl_seconds_after_finished: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    manifest: Mapping[str, Any] = field(default_factory=dict)
    source: str | None = None

    @property
    def spec(self) -> Mapping[str, Any]:
        return dict(self.manifest.get("spec") or {})

    @property
    def world_size(self) -> int:
        return self.replicas * self.nproc_per_node

    def job_spec(self) -> JobSpec:
        """The lifecycle policy's view of this job."""
        return JobSpec.from_spec(self.spec)


# -- loading -----------------------------------------------------------------------------


def load_trainjob(path: str | Path) -> TrainJob:
    """Reads, validates and defaults the TrainJob in the YAML file at `path`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise TrainJobError(
            source, [Problem("", f"cannot read the file: {err.strerror or err}")]
        ) from None
    except UnicodeDecodeError as err:
        raise TrainJobError(
            source, [Problem("", f"the file is not UTF-8 text ({err.reason})")]
        ) from None
    return parse_trainjob(text, source)


def parse_trainjob(text: str, source: str = "<string>") -> TrainJob:
    """Validates and defaults the TrainJob in YAML `text`; `source` names it in errors."""
    document, node = _single_document(text, source)
    return _from_dict(document, source, _Lines(node))


def trainjob_from_dict(obj: Mapping[str, Any], source: str = "<object>") -> TrainJob:
    """Validates and defaults a TrainJob already parsed (a dict as from YAML or JSON)."""
    return _from_dict(obj, source, _Lines(None))


def _from_dict(obj: Mapping[str, Any], source: str, lines: _Lines) -> TrainJob:
    _check_type(obj, source, lines)
    problems = list(_schema_problems(obj, lines))
    if problems:
        raise TrainJobError(source, problems, _SCHEMA_HINT)
    manifest = apply_defaults(obj)
    problems = list(_rule_problems(manifest, lines))
    if problems:
        raise TrainJobError(source, problems)
    return _view(manifest, source)


_SCHEMA_HINT = (
    "The cluster would reject it too: fix the fields above "
    "(the schema is crds/trainjobs.spotrun.dev.yaml; `kubectl explain trainjob.spec` describes it)."
)


def _single_document(text: str, source: str) -> tuple[Mapping[str, Any], yaml.Node | None]:
    try:
        nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
        documents = [yaml.constructor.SafeConstructor().construct_document(n) for n in nodes]
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else str(problem)
        line = mark.line + 1 if mark is not None else None
        col = f", column {mark.column + 1}" if mark is not None else ""
        raise TrainJobError(
            source,
            [Problem("", f"malformed YAML{col}: {detail}", line)],
            "Fix the YAML syntax (indentation, quotes, ':' after keys) and run again.",
        ) from None
    if not documents:
        raise TrainJobError(source, [Problem("", "the file is empty; expected a TrainJob")])
    kinds = [i for i, d in enumerate(documents) if isinstance(d, Mapping) and d.get("kind") == KIND]
    if len(documents) > 1:
        if len(kinds) != 1:
            raise TrainJobError(
                source,
                [
                    Problem(
                        "",
                        f"the file holds {len(documents)} YAML documents and {len(kinds)} of "
                        f"kind {KIND}; expected exactly one TrainJob",
                    )
                ],
            )
        index = kinds[0]
    else:
        index = 0
    document = documents[index]
    duplicates = list(_duplicate_keys(nodes[index], []))
    if duplicates:
        raise TrainJobError(
            source,
            [
                Problem(
                    _dotted(path),
                    "duplicate field: only its last value would count (kubectl keeps it silently); "
                    "remove the others",
                    line,
                )
                for path, line in duplicates
            ],
        )
    if not isinstance(document, Mapping):
        raise TrainJobError(
            source,
            [
                Problem(
                    "",
                    f"expected a YAML mapping (apiVersion, kind, metadata, spec), "
                    f"got {type(document).__name__}",
                    _mark_line(nodes[index]),
                )
            ],
        )
    return document, nodes[index]


def _duplicate_keys(node: yaml.Node, path: list[Any]) -> Iterator[tuple[list[Any], int | None]]:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            if name in seen:
                yield [*path, name], _mark_line(key)
            seen.add(name)
            yield from _duplicate_keys(value, [*path, name])
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, [*path, i])


def _check_type(obj: Mapping[str, Any], source: str, lines: _Lines) -> None:
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    problems = []
    if api_version != API_VERSION:
        problems.append(
            Problem(
                "apiVersion",
                f"is {json.dumps(api_version)}, expected {API_VERSION!r}: set "
                f"`apiVersion: {API_VERSION}`",
                lines.of(["apiVersion"]),
            )
        )
    if kind != KIND:
        problems.append(
            Problem(
                "kind",
                f"is {json.dumps(kind)}, expected {KIND!r}: set `kind: {KIND}`",
                lines.of(["kind"]),
            )
        )
    metadata = obj.get("metadata")
    name = metadata.get("name") if isinstance(metadata, Mapping) else None
    if not name:
        problems.append(
            Problem(
                "metadata.name",
                "Required value: name the job (lowercase letters, digits and '-'); it names the "
                "run's checkpoint folder and, on a cluster, its pods",
                lines.of(["metadata"]),
            )
        )
    if problems:
        raise TrainJobError(
            source, problems, "This file is not a spotrun TrainJob." if len(problems) > 1 else None
        )


# -- the CRD and its schema ------------------------------------------------------------


@functools.cache
def crd() -> Mapping[str, Any]:
    """The TrainJob CustomResourceDefinition shipped with the package."""
    text = resources.files("spotrun").joinpath("crd", CRD_RESOURCE).read_text(encoding="utf-8")
    loaded: Mapping[str, Any] = yaml.safe_load(text)
    return loaded


def openapi_schema() -> Mapping[str, Any]:
    """The openAPIV3Schema of the served version, as written in the CRD."""
    versions = crd()["spec"]["versions"]
    version = next(v for v in versions if v["name"] == VERSION)
    schema: Mapping[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


@functools.cache
def json_schema() -> Mapping[str, Any]:
    """The CRD schema in JSON Schema (draft 7), with the API server's strictness about
    unknown fields (kubectl validates strictly by default)."""
    return _to_json_schema(openapi_schema())


def _to_json_schema(node: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "default", "description"):
            continue
        if key == "format" and value not in INTEGER_FORMATS:
            continue  # the API server checks int32/int64 ranges; other formats are left out
        if key == "properties":
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, Mapping):
            out[key] = _to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_to_json_schema(sub) for sub in value]
        elif key == "not":
            out[key] = _to_json_schema(value)
        else:
            out[key] = value
    # OpenAPI 3.0 spells exclusive bounds as booleans beside minimum/maximum.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if out.get(exclusive) is True:
            out[exclusive] = out.pop(bound)
        elif out.get(exclusive) is False:
            del out[exclusive]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def apply_defaults(obj: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `obj` with the CRD's defaults filled in, as the API server does."""
    out = copy.deepcopy(dict(obj))
    _default(out, openapi_schema())
    return out


def _default(value: Any, schema: Mapping[str, Any]) -> None:
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default(value[name], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for name in set(value) - set(schema.get("properties") or {}):
                _default(value[name], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            _default(item, schema["items"])


# -- schema validation -------------------------------------------------------------------


# OpenAPI's integer formats, which the API server enforces (`Checked value must be of type
# integer with format int32`): the inclusive range of each.
INTEGER_FORMATS: Mapping[str, tuple[int, int]] = {
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
}


def _format_checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())
    for name, (low, high) in INTEGER_FORMATS.items():

        def in_range(value: object, low: int = low, high: int = high) -> bool:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return True  # the type check speaks for values that are not numbers
            return low <= value <= high

        checker.checks(name)(in_range)
    return checker


def _schema_problems(obj: Mapping[str, Any], lines: _Lines) -> Iterator[Problem]:
    validator = jsonschema.Draft7Validator(json_schema(), format_checker=_format_checker())
    errors = sorted(validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path])
    seen: set[tuple[str, str]] = set()
    for error in errors:
        for problem in _describe(error, lines):
            if (problem.field, problem.message) not in seen:
                seen.add((problem.field, problem.message))
                yield problem


def _describe(error: jsonschema.ValidationError, lines: _Lines) -> Iterator[Problem]:
    """The error in the API server's words (`Invalid value`, `Required value`, ...)."""
    path = list(error.absolute_path)
    here = _dotted(path)
    value = error.instance
    shown = json.dumps(value) if not isinstance(value, dict | list) else type(value).__name__
    kind, expected = error.validator, error.validator_value
    line = lines.of(path)
    if kind == "required":
        for name in expected:
            if isinstance(value, Mapping) and name not in value:
                yield Problem(_dotted([*path, name]), "Required value", line)
        return
    if kind == "additionalProperties":
        known = list((error.schema.get("properties") or {}).keys())
        for name in sorted(set(value) - set(known)):
            close = difflib.get_close_matches(name, known, n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(known)}"
            )
            yield Problem(
                _dotted([*path, name]), f'unknown field "{name}"{hint}', lines.of([*path, name])
            )
        return
    messages: dict[str, Callable[[], str]] = {
        "type": lambda: f"Invalid value: {shown}: must be of type {_types(expected)}",
        "minimum": lambda: f"Invalid value: {shown}: should be greater than or equal to {expected}",
        "maximum": lambda: f"Invalid value: {shown}: should be less than or equal to {expected}",
        "exclusiveMinimum": lambda: f"Invalid value: {shown}: should be greater than {expected}",
        "exclusiveMaximum": lambda: f"Invalid value: {shown}: should be less than {expected}",
        "enum": lambda: (
            f"Unsupported value: {shown}: supported values: "
            + ", ".join(json.dumps(v) for v in expected)
        ),
        "pattern": lambda: f"Invalid value: {shown}: should match '{expected}'",
        "format": lambda: (
            f"Invalid value: {shown}: must be of type integer with format {expected} "
            f"(from {INTEGER_FORMATS[expected][0]} to {INTEGER_FORMATS[expected][1]})"
            if expected in INTEGER_FORMATS
            else f"Invalid value: {shown}: must have format {expected}"
        ),
        "minLength": lambda: f"Invalid value: {shown}: should be at least {expected} chars long",
        "maxLength": lambda: f"Too long: may not be more than {expected} characters",
        "minItems": lambda: f"Invalid value: should have at least {expected} items",
        "maxItems": lambda: f"Too many: {len(value)}: must have at most {expected} items",
        "maxProperties": lambda: f"Too many: {len(value)}: must have at most {expected} items",
        "anyOf": lambda: (
            f"Invalid value: {shown}: must be an integer or a quantity string "
            'such as "500m", "2" or "16Gi"'
        ),
    }
    describe = messages.get(str(kind))
    yield Problem(here, describe() if describe else error.message, line)


def _types(expected: Any) -> str:
    names = expected if isinstance(expected, list) else [expected]
    return " or ".join(str(n) for n in names if n != "null")


def _dotted(path: Sequence[Any]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# -- CEL rules mirrored ------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """A CEL rule of the CRD checked here too: where it sits, its text, and its meaning."""

    schema_path: tuple[str, ...]
    rule: str
    field: str
    holds: Callable[[Any], bool]
    # The path, below the rule's object, of the element that breaks it: for the line.
    culprit: Callable[[Any], Sequence[Any]] = lambda _: ()


def _get(obj: Any, path: Sequence[str]) -> tuple[bool, Any]:
    for part in path:
        if not isinstance(obj, Mapping) or part not in obj:
            return False, None
        obj = obj[part]
    return True, obj


def _regex_of(rule: str) -> re.Pattern[str]:
    """The regular expression of a `self.matches('...')` rule, so it is written once."""
    found = re.fullmatch(r"self\.matches\('(.*)'\)", rule)
    if found is None:
        raise ValueError(f"not a self.matches rule: {rule}")
    return re.compile(found.group(1))


def _matches(rule: str) -> Callable[[Any], bool]:
    pattern = _regex_of(rule)
    return lambda value: isinstance(value, str) and pattern.search(value) is not None


_URL_RULE = "self.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://.+')"
_FUNCTION_RULE = (
    "self.matches('^[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*"
    ":[A-Za-z_][A-Za-z0-9_]*([.][A-Za-z_][A-Za-z0-9_]*)*$')"
)
_NAME_PATTERN_RULE = "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')"

# The CRD's CEL rules that concern a file, re-checked here (with the reserved-env rule,
# see mirrored_rules). A rule is found in the CRD by its exact text, and its message is
# the CRD's: editing a rule there without here fails tests/unit/test_crd_schema.py
# instead of letting the two drift apart.
MIRRORED_RULES: tuple[_Rule, ...] = (
    _Rule(
        (),
        "self.metadata.name.size() <= 42",
        "metadata.name",
        lambda job: len(str(job["metadata"]["name"])) <= 42,
    ),
    _Rule(
        (),
        _NAME_PATTERN_RULE,
        "metadata.name",
        lambda job: (
            re.search(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", str(job["metadata"]["name"])) is not None
        ),
    ),
    _Rule(
        ("spec", "trainer"),
        "has(self.command) != has(self.function)",
        "spec.trainer",
        lambda t: ("command" in t) != ("function" in t),
    ),
    _Rule(
        ("spec", "trainer"),
        "!has(self.args) || has(self.command)",
        "spec.trainer",
        lambda t: "args" not in t or "command" in t,
    ),
    _Rule(
        ("spec", "trainer", "function"),
        _FUNCTION_RULE,
        "spec.trainer.function",
        _matches(_FUNCTION_RULE),
    ),
    _Rule(
        ("spec", "checkpoint", "storage"), _URL_RULE, "spec.checkpoint.storage", _matches(_URL_RULE)
    ),
    _Rule(("spec", "resumeFrom"), _URL_RULE, "spec.resumeFrom", _matches(_URL_RULE)),
    _Rule(
        ("spec", "failurePolicy", "backoff"),
        "!has(self.initialSeconds) || !has(self.maxSeconds) "
        "|| self.initialSeconds <= self.maxSeconds",
        "spec.failurePolicy.backoff",
        lambda b: (
            "initialSeconds" not in b
            or "maxSeconds" not in b
            or b["initialSeconds"] <= b["maxSeconds"]
        ),
    ),
    # Both see the spec after defaulting, as the API server does (replicas and recovery
    # are always there, an elastic object gets minReplicas 1), and name the field the
    # CRD's fieldPath names.
    _Rule(
        ("spec",),
        "!has(self.elastic) || !has(self.elastic.minReplicas) "
        "|| self.elastic.minReplicas <= self.replicas",
        "spec.elastic.minReplicas",
        lambda s: (
            "elastic" not in s
            or "minReplicas" not in s["elastic"]
            or s["elastic"]["minReplicas"] <= s["replicas"]
        ),
    ),
    _Rule(
        ("spec",),
        "!has(self.elastic) || !has(self.recovery) || self.recovery == 'Warm'",
        "spec.recovery",
        lambda s: "elastic" not in s or "recovery" not in s or s["recovery"] == "Warm",
    ),
    _Rule(
        ("spec",),
        "!has(self.spares) || self.spares == 0 || !has(self.recovery) || self.recovery == 'Warm'",
        "spec.spares",
        lambda s: not s.get("spares") or "recovery" not in s or s["recovery"] == "Warm",
    ),
    _Rule(
        ("spec",),
        "!has(self.spares) || self.spares == 0 || self.replicas >= 2",
        "spec.spares",
        lambda s: not s.get("spares") or s["replicas"] >= 2,
    ),
    _Rule(
        ("spec",),
        "!has(self.elastic) || !has(self.checkpoint) || !has(self.checkpoint.keepAllRanks) "
        "|| !self.checkpoint.keepAllRanks",
        "spec.checkpoint.keepAllRanks",
        lambda s: (
            "elastic" not in s
            or not isinstance(s.get("checkpoint"), Mapping)
            or not s["checkpoint"].get("keepAllRanks", False)
        ),
    ),
)


_ENV_RULE_START = "self.all(e, !(e.name in ["
_ENV_PATH = ("spec", "trainer", "env")


def _reserved_env_rule() -> _Rule:
    """The CRD's rule that keeps trainer.env off the pod contract's variables.

    The reserved names are read from the rule itself, so the list lives in the CRD only.
    """
    found = [r for p, r in crd_rules() if p == _ENV_PATH and r.startswith(_ENV_RULE_START)]
    if len(found) == 1:
        rule = found[0]
        reserved = frozenset(re.findall(r"'([^']+)'", rule))

        def clashes(env: Any) -> list[int]:
            items = env if isinstance(env, list) else []
            return [
                i
                for i, e in enumerate(items)
                if isinstance(e, Mapping) and e.get("name") in reserved
            ]

        return _Rule(
            _ENV_PATH,
            rule,
            "spec.trainer.env",
            holds=lambda env: not clashes(env),
            culprit=lambda env: [clashes(env)[0], "name"],
        )
    raise LookupError(
        f"the CRD has no rule starting {_ENV_RULE_START!r} at spec.trainer.env: "
        "update spotrun.local.trainjob._reserved_env_rule with the CRD"
    )


@functools.cache
def mirrored_rules() -> tuple[_Rule, ...]:
    """Every CEL rule of the CRD that this module re-checks for a file."""
    return (*MIRRORED_RULES, _reserved_env_rule())


def crd_rules() -> dict[tuple[tuple[str, ...], str], str]:
    """Every CEL rule of the CRD schema, by (object path, rule text), with its message."""
    found: dict[tuple[tuple[str, ...], str], str] = {}

    def walk(schema: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for entry in schema.get("x-kubernetes-validations") or []:
            found[(path, " ".join(str(entry["rule"]).split()))] = " ".join(
                str(entry.get("message", "")).split()
            )
        for name, sub in (schema.get("properties") or {}).items():
            walk(sub, (*path, name))
        if isinstance(schema.get("items"), Mapping):
            walk(schema["items"], (*path, "[]"))

    walk(openapi_schema(), ())
    return found


def rule_message(schema_path: Sequence[str], rule: str) -> str:
    """The CRD's message for the CEL `rule` at `schema_path`."""
    try:
        return crd_rules()[(tuple(schema_path), " ".join(rule.split()))]
    except KeyError:
        raise LookupError(
            f"the CRD has no CEL rule {rule!r} at {'.'.join(schema_path) or '<root>'}: "
            "update spotrun.local.trainjob.MIRRORED_RULES with the CRD"
        ) from None


def _rule_problems(manifest: Mapping[str, Any], lines: _Lines) -> Iterator[Problem]:
    for rule in mirrored_rules():
        present, value = _get(manifest, rule.schema_path)
        if present and not rule.holds(value):
            where = [*rule.field.split("."), *rule.culprit(value)]
            yield Problem(rule.field, rule_message(rule.schema_path, rule.rule), lines.of(where))


# -- the typed view ----------------------------------------------------------------------


def _view(manifest: Mapping[str, Any], source: str) -> TrainJob:
    metadata = manifest.get("metadata") or {}
    spec = manifest["spec"]
    trainer = spec["trainer"]
    checkpoint = spec.get("checkpoint") or {}
    command = trainer.get("command")
    ttl = spec.get("ttlSecondsAfterFinished")
    return TrainJob(
        name=str(metadata["name"]),
        namespace=str(metadata.get("namespace") or DEFAULT_NAMESPACE),
        replicas=int(spec["replicas"]),
        nproc_per_node=int(spec["nprocPerNode"]),
        trainer=Trainer(
            image=str(trainer["image"]),
            command=tuple(command) if command is not None else None,
            args=tuple(trainer.get("args") or ()),
            function=trainer.get("function"),
            env=tuple(
                EnvVar(str(e["name"]), e.get("value"), e.get("valueFrom"))
                for e in trainer.get("env") or ()
            ),
            resources=dict(trainer.get("resources") or {}),
            image_pull_policy=trainer.get("imagePullPolicy"),
        ),
        checkpoint=CheckpointSpec(
            storage=checkpoint.get("storage"), settings=CheckpointSettings.from_spec(checkpoint)
        ),
        failure_policy=FailurePolicy.from_spec(spec.get("failurePolicy") or {}),
        config=dict(spec.get("config") or {}),
        template=dict(spec.get("template") or {}),
        resume_from=spec.get("resumeFrom"),
        suspend=bool(spec.get("suspend", False)),
        ttl_seconds_after_finished=None if ttl is None else int(ttl),
        labels=dict(metadata.get("labels") or {}),
        annotations=dict(metadata.get("annotations") or {}),
        manifest=manifest,
        source=source,
    )


# -- line numbers ----------------------------------------------------------------------


class _Lines:
    """Finds the line of a field in the YAML node tree, for error messages."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def of(self, path: Sequence[Any]) -> int | None:
        """The 1-based line of the deepest node along `path` that exists."""
        node = self.root
        if node is None:
            return None
        line = _mark_line(node)
        for part in path:
            child = _child(node, part)
            if child is None:
                break
            key_node, node = child
            line = _mark_line(key_node if not isinstance(node, yaml.ScalarNode) else node)
        return line


def _child(node: yaml.Node, part: Any) -> tuple[yaml.Node, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key, value
    elif (
        isinstance(node, yaml.SequenceNode)
        and isinstance(part, int)
        and 0 <= part < len(node.value)
    ):
        item = node.value[part]
        return item, item
    return None


def _mark_line(node: yaml.Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1
