"""The worker process of `spotrun launch --function module:fn`: fn(config) inside a session.

Ray Train users hand over a `train_func(config)`; this module is what turns it into a
worker process, so the function needs no `if __name__ == "__main__"` block and the session
(process group, preemption notice, resume) is up before the first line of user code runs.
Run as `python -m spotrun.train._function_worker module:fn`; the launcher does that.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from spotrun import contract
from spotrun.train import _exit, regroup, writer
from spotrun.train import group as process_group
from spotrun.train.session import Session, get_session, regroup_session

log = logging.getLogger("spotrun")


# Imported by a spare before it waits: DDP's constructor imports torch._dynamo on first use
# (1.4 s measured), which the group would otherwise wait for in its first collective.
SPARE_PRELOADS = ("torch.nn.parallel", "torch._dynamo")


class FunctionNotFound(LookupError):
    """`module:fn` does not name a callable; the message says which part is wrong."""


def resolve(target: str) -> Callable[..., Any]:
    """Import `module:fn` (fn may be dotted: `module:Class.method`) and return the callable."""
    module_name, sep, qualname = target.partition(":")
    if not sep or not module_name or not qualname:
        raise FunctionNotFound(f"expected module:function, got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise FunctionNotFound(
            f"cannot import {module_name!r} for {target!r}: {err}; the working directory "
            "and PYTHONPATH are searched, run from the directory that holds the module"
        ) from err
    for part in qualname.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise FunctionNotFound(f"{module_name!r} has no attribute {qualname!r}") from None
    if not callable(obj):
        raise FunctionNotFound(f"{target!r} is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]


def call_with_config(fn: Callable[..., Any], config: dict[str, Any]) -> Any:
    """fn(config), or fn() for a function that takes no arguments (as Ray Train allows)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(config)
    if not parameters:
        return fn()
    return fn(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the session, call the function with the job's config, finish the session.

    In a warm recovery the function is called again in this same process, in the session
    of the next group, when the group lost a member (see spotrun.train.regroup).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    target = args[0] if args else contract.PodContract.from_env().function
    if not target:
        raise FunctionNotFound(f"no function to call: pass module:fn or set {contract.FUNCTION}")
    start_writer_early()
    fn = resolve(target)
    await_promotion()
    while True:
        try:
            session = get_session()
        except regroup.Regroup as err:
            join_after_abandoned(err)
            continue
        try:
            call_with_config(fn, dict(session.context.config))
        except BaseException as err:
            if not await_next_group(session, err):
                raise
            continue
        session.finish()
        return 0


def start_writer_early() -> None:
    """Starts the first session's checkpoint writer now, so its import overlaps this one's.

    A writer process imports torch before it serves (seconds); started here, that import
    runs beside the user code's imports and the rendezvous instead of after them, and the
    first progress report and second save of the session do not wait for it.
    """
    try:
        background = contract.PodContract.from_env().checkpoint.async_save
    except contract.ContractError:
        return  # no pod contract: the session will say so
    if background:
        writer.prepare_standby()


def await_promotion() -> None:
    """A warm spare's worker, imports done: wait until a group promotes this spare, join it.

    Returns at once in a worker that is not a spare. The state then comes as it does for
    any replacement: from a surviving peer's memory, else from the bucket.
    """
    if not regroup.is_spare():
        return
    slot = os.environ.get(contract.SPARE)
    for module in SPARE_PRELOADS:
        # What the first session imports lazily, imported while nobody waits for this spare.
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    # warning: the level the "spotrun" logger shows without a handler (the pod log).
    log.warning("spare %s: ready, waiting to be promoted into a group", slot)
    started = time.monotonic()
    group = regroup.wait_for_promotion()
    assert group is not None  # no stop condition: it waits for as long as the spare lives
    log.warning(
        "spare %s: promoted to node %d of attempt %d after %.1fs waiting",
        slot,
        group.node_rank,
        group.attempt,
        time.monotonic() - started,
    )
    regroup_session(group)


def await_next_group(session: Session, err: BaseException) -> bool:
    """After `err`, whether this worker joined a next group (a warm recovery) to train again.

    Only a lost member qualifies (a failed collective, or another replica's agreed notice);
    an error of the training code itself fails the worker as always.
    """
    if not session.warm or isinstance(err, SystemExit | KeyboardInterrupt):
        return False
    if not regroup.is_group_failure(err):
        return False
    # Peers not next to the lost member may still wait in a collective: fail theirs too.
    process_group.abort_connections()
    rank, attempt = session.context.world_rank, session.context.attempt
    log.warning(
        "rank %d: %s; waiting for the next group (attempt > %d)", rank, _first_line(err), attempt
    )
    started = time.monotonic()
    group = regroup.wait_for_group(attempt, stop=lambda: session.noticed)
    if group is None and session.noticed:
        # This replica is reclaimed too while it waited: what it reported is committed (or
        # held by the group), so it goes as a preempted worker.
        log.warning("rank %d: preemption notice while regrouping; exiting", rank)
        contract.announce_preempted_exit(session.context.local_rank)
        raise SystemExit(contract.EXIT_PREEMPTED) from err
    if group is None:
        log.error("rank %d: no next group came; exiting", rank)
        return False
    log.warning(
        "rank %d: joining attempt %d (%.2fs after the loss)",
        rank,
        group.attempt,
        time.monotonic() - started,
    )
    regroup_session(group)
    return True


def join_after_abandoned(err: regroup.Regroup) -> None:
    """The rendezvous of this worker's group was given up: join the group published instead.

    An elastic group that re-formed without the member this worker waited for; the state
    this worker carried (if any) goes with it into the next session.
    """
    attempt = int(os.environ.get(contract.ATTEMPT, "0"))
    process_group.abort_connections()
    log.warning("%s; joining the next group (attempt > %d)", err, attempt)
    group = regroup.wait_for_group(attempt)
    if group is None:
        raise err
    regroup_session(group)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


if __name__ == "__main__":
    _exit.run(main)
