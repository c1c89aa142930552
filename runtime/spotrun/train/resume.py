"""Where a new attempt resumes: the ledger's record, checked against what storage holds.

The status names a checkpoint (SPOTRUN_RESUME_FROM, from status.latestCheckpoint or
spec.resumeFrom), but the storage is the truth behind it. A checkpoint can be committed
and never recorded (its group failed, or was fenced out, between the manifest and the
status write), and the status itself can be lost (a deleted status.json, a TrainJob deleted
and applied again over the same prefix). So rank 0 looks at the job's own folder too, and
resumes from the newest committed checkpoint there that verifies, when it is newer than
the one named. A named checkpoint that fails verification is walked back from, never
silently replaced by step 0. Either way the outcome says what happened, so the ledger can
be repaired and people told.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from spotrun.store import layout
from spotrun.store.commit import (
    CheckpointCorruptError,
    CheckpointStore,
    NoValidCheckpointError,
    Verified,
    split_uri,
)

log = logging.getLogger("spotrun")


@dataclass(frozen=True)
class ResumeChoice:
    """The verified checkpoint to resume from (None: a fresh start), and why."""

    verified: Verified | None
    # The checkpoint the ledger named (None when it named none).
    named: str | None
    # Checkpoints passed over because they failed verification, newest first, with why.
    corrupt: tuple[tuple[str, str], ...] = ()
    # The chosen checkpoint is newer than the named one: the ledger had not recorded it.
    rediscovered: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fell_back(self) -> bool:
        """The named checkpoint itself could not be used, and an earlier one was."""
        return self.named is not None and any(uri == self.named for uri, _ in self.corrupt)

    @property
    def repairs_ledger(self) -> bool:
        """The status should be moved to the chosen checkpoint."""
        return self.verified is not None and (self.fell_back or self.rediscovered)

    def message(self) -> str:
        """One sentence for logs, conditions and events."""
        parts = [f"{_name(uri)} failed verification ({why})" for uri, why in self.corrupt]
        if self.corrupt and not self.rediscovered and self.verified is not None:
            parts.append(
                f"resumed from {_name(self.verified.uri)} (step {self.verified.manifest.step})"
            )
        return "; ".join([*parts, *self.notes])


def choose(store: CheckpointStore, named: str | None) -> ResumeChoice:
    """The checkpoint a new attempt of the job in `store` resumes from.

    `named` is the checkpoint the ledger names (any job's), or None. The job's own newest
    committed checkpoint wins when it is newer than `named` (or `named` is another job's,
    or none): it is this job's own later progress. Raises NoValidCheckpointError when
    checkpoints exist but none verifies: a job with a history never restarts from step 0.
    """
    own = [c.manifest.seq for c in store.committed()]
    named_root, named_seq = split_uri(named) if named else (None, None)
    named_is_own = named_root == store.root
    newest_own = own[-1] if own else None

    corrupt: list[tuple[str, str]] = []
    notes: list[str] = []
    if newest_own is not None and (not named_is_own or newest_own > (named_seq or -1)):
        # Newer committed checkpoints than the ledger knows: try them, newest first, down to
        # the named one (own) or through all of the job's own (foreign or none named).
        floor = named_seq if named_is_own and named_seq is not None else -1
        for seq in reversed(own):
            if seq <= floor:
                break
            try:
                verified = store.verify(seq)
            except (CheckpointCorruptError, OSError) as err:
                corrupt.append((store.uri(seq), str(err)))
                log.error("checkpoint %s is not usable: %s", store.uri(seq), err)
                continue
            what = f"the ledger named {_name(named)}" if named else "the ledger named none"
            notes.append(
                f"{what}, but {store.root} holds the newer committed checkpoint "
                f"{_name(verified.uri)} (step {verified.manifest.step}); resuming from it"
            )
            log.warning("%s", notes[-1])
            return ResumeChoice(verified, named, tuple(corrupt), True, tuple(notes))
        if named is None:
            raise NoValidCheckpointError(
                f"{store.root} holds committed checkpoints but none verifies "
                f"({'; '.join(f'{_name(u)}: {w}' for u, w in corrupt)}). Refusing to start "
                "from step 0 over them: move the job folder away to start afresh, or set "
                "spec.resumeFrom to a good checkpoint."
            )
    if named is None:
        return ResumeChoice(None, None, tuple(corrupt))
    assert named_root is not None and named_seq is not None
    source = store if named_is_own else CheckpointStore(named_root)
    verified, problems = source.resolve(named_seq)
    if problems:
        # resolve() walked back: every checkpoint it passed over failed, the named one first.
        skipped = [named] + [
            source.uri(c.manifest.seq)
            for c in reversed(source.committed())
            if verified.manifest.seq < c.manifest.seq < named_seq
        ]
        corrupt.extend(zip(skipped, problems, strict=False))
    return ResumeChoice(verified, named, tuple(corrupt), False, tuple(notes))


def _name(uri: str | None) -> str:
    return layout.checkpoint_name(split_uri(uri)[1]) if uri else "none"
