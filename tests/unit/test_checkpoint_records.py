"""Manifest and .done records, checkpoint names, retention, status fields: pure logic."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from spotrun.contract import CheckpointSettings
from spotrun.ledger.retention import Candidate, plan_retention, score_of
from spotrun.ledger.status import FencingError, check_fence, commit_fields, json_patch
from spotrun.store import layout
from spotrun.store.manifest import (
    Commit,
    DoneRecord,
    FileRecord,
    Manifest,
    ManifestError,
    build_manifest,
    json_metrics,
)

SHA = "a" * 64


def make_manifest(seq: int = 3, step: int = 30, **metrics: float) -> Manifest:
    done = [DoneRecord(r, (FileRecord(r, layout.shard_name(r), 10 + r, SHA),)) for r in (1, 0)]
    return build_manifest(
        seq=seq,
        step=step,
        kind="replicated",
        attempt=2,
        world_size=2,
        time=1_700_000_000.0,
        done=done,
        metrics=metrics,
    )


def test_checkpoint_names_round_trip_and_sort_by_number() -> None:
    assert layout.checkpoint_name(12) == "ckpt-000012"
    assert layout.parse_checkpoint_name("gs://b/ns/job/ckpt-000012/") == 12
    assert layout.parse_checkpoint_name("ckpt-1234567") == 1234567
    assert layout.parse_checkpoint_name("ckpt-12") is None
    assert layout.parse_checkpoint_name("status.json") is None
    assert layout.join("gs://b/", "/ns/", "job") == "gs://b/ns/job"


def test_manifest_round_trips_and_lists_files_by_rank() -> None:
    manifest = make_manifest(loss=0.5)
    again = Manifest.from_bytes(manifest.to_bytes())
    assert again == manifest
    assert [f.rank for f in again.files] == [0, 1]
    assert again.total_bytes == 21


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b[: len(b) // 2],  # truncated
        lambda b: b.replace(b'"step": 30', b'"step": 31'),  # altered field
        lambda b: b.replace(SHA.encode(), ("b" * 64).encode(), 1),  # altered shard hash
        lambda b: b"",
        lambda b: b"[]",
    ],
    ids=["truncated", "altered-step", "altered-hash", "empty", "not-an-object"],
)
def test_damaged_manifest_is_rejected(corrupt: object) -> None:
    data = make_manifest().to_bytes()
    with pytest.raises(ManifestError):
        Manifest.from_bytes(corrupt(data))  # type: ignore[operator]


def test_manifest_refuses_an_unknown_format_version() -> None:
    body = json.loads(make_manifest().to_bytes())
    body.pop("checksum")
    body["formatVersion"] = 99
    body["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    with pytest.raises(ManifestError, match="formatVersion 99"):
        Manifest.from_bytes(json.dumps(body).encode())


def test_file_records_refuse_paths_outside_the_checkpoint() -> None:
    for path in ("/etc/passwd", "../other/ckpt", "a/../../b"):
        with pytest.raises(ManifestError):
            FileRecord.from_json({"rank": 0, "path": path, "size": 1, "sha256": SHA})


def test_two_ranks_writing_the_same_file_is_an_error() -> None:
    done = [DoneRecord(r, (FileRecord(r, "same.pt", 1, SHA),)) for r in (0, 1)]
    with pytest.raises(ManifestError, match="same file"):
        build_manifest(seq=1, step=1, kind="per-rank", attempt=0, world_size=2, time=0.0, done=done)


def test_done_record_round_trips() -> None:
    record = DoneRecord(1, (FileRecord(1, "rank-00001.pt", 5, SHA),))
    assert DoneRecord.from_bytes(record.to_bytes()) == record
    with pytest.raises(ManifestError):
        DoneRecord.from_bytes(b"{not json")


def cands(*scores: float | None) -> list[Candidate]:
    return [
        Candidate(seq=i, step=i * 10, metrics={} if s is None else {"acc": s})
        for i, s in enumerate(scores)
    ]


@pytest.mark.parametrize(
    ("settings", "scores", "keep", "best"),
    [
        # no limit: everything stays
        (CheckpointSettings(), [1, 2, 3], (0, 1, 2), ()),
        # numToKeep alone: the newest N
        (CheckpointSettings(num_to_keep=2), [1, 2, 3, 4], (2, 3), ()),
        (CheckpointSettings(num_to_keep=1), [1, 2, 3], (2,), ()),
        # best by max score, and the latest even though it is worse
        (
            CheckpointSettings(num_to_keep=2, score_attribute="acc"),
            [0.9, 0.1, 0.8, 0.2],
            (0, 2, 3),
            (0, 2),
        ),
        # best by min score
        (
            CheckpointSettings(num_to_keep=2, score_attribute="acc", score_order="min"),
            [0.9, 0.1, 0.8, 0.2, 0.5],
            (1, 3, 4),
            (1, 3),
        ),
        # ties go to the newer checkpoint
        (CheckpointSettings(num_to_keep=1, score_attribute="acc"), [0.5, 0.5, 0.1], (1, 2), (1,)),
        # checkpoints without the score are never "best" but the latest stays
        (CheckpointSettings(num_to_keep=1, score_attribute="acc"), [0.3, None, None], (0, 2), (0,)),
        # a score but no limit: keep all, list the top 3
        (CheckpointSettings(score_attribute="acc"), [0.1, 0.4, 0.2, 0.3], (0, 1, 2, 3), (1, 3, 2)),
        # a code that never reports the score still keeps numToKeep (unscored rank lowest)
        (CheckpointSettings(num_to_keep=2, score_attribute="acc"), [None] * 4, (2, 3), ()),
        (
            CheckpointSettings(num_to_keep=3, score_attribute="acc"),
            [None, 0.5, None, None],
            (1, 2, 3),
            (1,),
        ),
    ],
)
def test_retention_keeps_exactly_what_the_settings_say(
    settings: CheckpointSettings,
    scores: list[float | None],
    keep: tuple[int, ...],
    best: tuple[int, ...],
) -> None:
    retention = plan_retention(cands(*scores), settings)
    assert retention.keep == keep
    assert retention.best == best
    assert set(retention.delete) == set(range(len(scores))) - set(keep)
    assert retention.latest == len(scores) - 1 and retention.latest not in retention.delete


def test_fence_refuses_an_older_attempt_and_an_older_checkpoint() -> None:
    status = {"attempt": 3, "latestCheckpoint": {"seq": 5, "step": 50}}
    check_fence(status, 3, 5)
    check_fence(status, 3, 6)
    with pytest.raises(FencingError, match="attempt 2"):
        check_fence(status, 2, 6)
    with pytest.raises(FencingError, match="ckpt-000004 would make it go down"):
        check_fence(status, 3, 4)


def test_the_fence_orders_by_spotruns_sequence_not_by_the_step_metric() -> None:
    # A newer checkpoint (seq 6) whose step is lower than the recorded one is accepted.
    check_fence({"attempt": 1, "latestCheckpoint": {"seq": 5, "step": 500}}, 1, 6)


def test_commit_fields_list_only_retained_checkpoints() -> None:
    commit = Commit(
        uri="gs://b/ns/j/ckpt-000003",
        manifest=make_manifest(seq=3, step=30, acc=0.7),
        manifest_sha256=SHA,
    )
    old = [{"seq": s, "step": s * 10, "uri": f"u{s}"} for s in (1, 2)]
    retention = plan_retention(
        [Candidate(1, 10, {}), Candidate(2, 20, {}), Candidate(3, 30, {})],
        CheckpointSettings(num_to_keep=2),
    )
    fields = commit_fields({}, commit, retention, old)
    assert [c["seq"] for c in fields["checkpoints"]] == [2, 3]
    assert fields["latestCheckpoint"]["uri"] == commit.uri
    assert fields["latestCheckpoint"]["step"] == 30
    assert fields["lastMetrics"]["step"] == 30 and fields["lastMetrics"]["acc"] == 0.7


def test_json_patch_is_fenced_by_the_attempt() -> None:
    ops = json_patch({"latestCheckpoint": {"step": 20}}, 4, {"latestCheckpoint": {"step": 30}})
    assert ops[0] == {"op": "test", "path": "/status/attempt", "value": 4}
    assert {"op": "test", "path": "/status/latestCheckpoint/step", "value": 20} in ops
    assert ops[-1]["path"] == "/status/latestCheckpoint"


@pytest.mark.parametrize(
    ("metrics", "attribute", "score"),
    [
        ({"val": {"acc": 0.7}}, "val/acc", 0.7),
        ({"a": {"b": {"c": 3}}}, "a/b/c", 3.0),
        ({"val/acc": 0.4, "val": {"acc": 0.9}}, "val/acc", 0.4),  # the flat key first
        ({"val": {"loss": 0.2}}, "val/acc", None),
        ({"val": 0.5}, "val/acc", None),
        ({"acc": float("nan")}, "acc", None),
        ({"acc": True}, "acc", None),
    ],
)
def test_score_attributes_may_name_nested_metrics_as_ray_does(
    metrics: dict[str, object], attribute: str, score: float | None
) -> None:
    assert score_of(metrics, attribute) == score


def test_nested_metrics_stay_json_objects_in_the_status() -> None:
    import torch

    out = json_metrics({"val": {"acc": torch.tensor(0.5), "hist": [1, 2.5]}, "t": torch.ones(2)})
    assert out["val"] == {"acc": 0.5, "hist": [1, 2.5]}
    assert isinstance(out["t"], str)


@pytest.mark.parametrize(
    ("codes", "world", "keep_all_ranks", "kind"),
    [
        ({1: 1}, 2, False, "replicated"),  # rank 1 alone carries a dict
        ({0: 1, 1: 1}, 2, True, "per-rank"),
        ({1: 2}, 2, False, "directory"),
        ({0: 3, 1: 3}, 2, False, "dcp"),
        ({}, 2, False, None),
    ],
)
def test_the_kind_of_a_checkpoint_comes_from_the_ranks_that_carried_one(
    codes: dict[int, int], world: int, keep_all_ranks: bool, kind: str | None
) -> None:
    from spotrun.train.session import _agreed_kind

    assert _agreed_kind(codes, world, keep_all_ranks) == kind


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        ({0: 1, 1: 2}, "dict from ranks [0], directory from ranks [1]"),
        ({0: 3}, "ranks [1] passed none"),
    ],
)
def test_ranks_that_disagree_on_the_kind_are_refused_with_who_passed_what(
    codes: dict[int, int], message: str
) -> None:
    from spotrun.train.session import CheckpointKindError, _agreed_kind

    with pytest.raises(CheckpointKindError, match=re.escape(message)):
        _agreed_kind(codes, 2, False)
