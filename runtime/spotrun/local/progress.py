"""What `spotrun run` shows a person: a live view while the job runs, and a summary after.

The point of local mode is to watch a job survive preemptions, so the view puts side by
side what the supervisor did (attempts, injected faults, restarts) and what training
reached (step, loss, the latest checkpoint and its age). On a terminal it is a rich Live
panel; otherwise (a pipe, CI, `--no-live`) the same events are plain log lines, with a
progress line every few seconds. The summary at the end says what the interruptions cost:
steps redone and time without training, each interruption with its reason.

Everything shown comes from the job's status (the same fields the cluster's TrainJob
carries) plus the supervisor's own events; rich is imported only when something is drawn.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from spotrun.lifecycle import FAILED, RUNNING, SUCCEEDED, parse_time
from spotrun.local.status_command import human_duration

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.live import Live

PREFIX = "[spotrun run]"
PLAIN_PROGRESS_SECONDS = 10.0
LIVE_EVENTS = 8
LOG_TAIL_LINES = 20


@dataclass(frozen=True)
class Snapshot:
    """One pass of the supervisor, as the live view draws it."""

    job: str
    namespace: str
    status: Mapping[str, Any]
    now: float
    started: float
    replicas: int
    running: tuple[tuple[int, int], ...] = ()  # (replica index, launcher pid) of the attempt
    total_steps: int | None = None
    next_faults: Mapping[str, float | None] = field(default_factory=dict)
    holding: str | None = None
    spares: int = 0  # warm spares waiting (--spares)


class Display(Protocol):
    """Where the supervisor's events and snapshots go."""

    def event(self, when: float, text: str, *, quiet: bool = False) -> None:
        """Something happened; `quiet` events (checkpoints, progress) only show in the live view."""

    def update(self, snapshot: Snapshot) -> None:
        """The state after a pass."""

    def __enter__(self) -> Display: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def make_display(*, live: bool) -> Display:
    """The live view on a terminal when `live`, else plain log lines on stdout."""
    if live and sys.stdout.isatty():
        return LiveDisplay()
    return PlainDisplay()


# --- plain log lines --------------------------------------------------------------------


def clock(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def progress_line(snapshot: Snapshot) -> str:
    """`attempt 2 Running: step 120/400, loss 0.0801; checkpoint step 119 (3s ago); ...`."""
    status = snapshot.status
    parts = [f"attempt {status.get('attempt', 0)} {status.get('state', 'Pending')}"]
    detail = [_step_text(snapshot)]
    metrics = _metrics_text(status)
    if metrics:
        detail.append(metrics)
    text = parts[0] + ": " + ", ".join(d for d in detail if d)
    text += f"; checkpoint {_checkpoint_text(snapshot)}"
    text += f"; {_count(status.get('preemptions', 0), 'preemption')}"
    text += f", {_count(status.get('failures', 0), 'failure')}"
    return text


class PlainDisplay:
    """Events as log lines, and a progress line every PLAIN_PROGRESS_SECONDS while running."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self._last_line = 0.0

    def __enter__(self) -> PlainDisplay:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def event(self, when: float, text: str, *, quiet: bool = False) -> None:
        if not quiet:
            print(f"{PREFIX} {clock(when)} {text}", file=self.stream, flush=True)

    def update(self, snapshot: Snapshot) -> None:
        if snapshot.status.get("state") != RUNNING or not snapshot.status.get("lastMetrics"):
            return
        if snapshot.now - self._last_line < PLAIN_PROGRESS_SECONDS:
            return
        self._last_line = snapshot.now
        print(
            f"{PREFIX} {clock(snapshot.now)} {progress_line(snapshot)}",
            file=self.stream,
            flush=True,
        )


# --- the live view ----------------------------------------------------------------------


class LiveDisplay:
    """A rich Live panel redrawn after every pass (no refresh thread: the supervisor forks)."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console: Console = Console(highlight=False)
        self.events: deque[tuple[float, str]] = deque(maxlen=LIVE_EVENTS)
        self._live: Live | None = None
        self._snapshot: Snapshot | None = None

    def __enter__(self) -> LiveDisplay:
        from rich.live import Live

        self._live = Live(
            console=self.console, auto_refresh=False, transient=False, redirect_stderr=False
        )
        self._live.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._draw()
            self._live.__exit__(kind, value, tb)
            self._live = None

    def event(self, when: float, text: str, *, quiet: bool = False) -> None:
        self.events.append((when, text))
        self._draw()

    def update(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._draw()

    def _draw(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def _render(self) -> RenderableType:
        from rich.console import Group
        from rich.markup import escape
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column()
        snapshot = self._snapshot
        title = "spotrun run"
        if snapshot is not None:
            status = snapshot.status
            title = f"spotrun run {snapshot.namespace}/{snapshot.job}"
            state = str(status.get("state", "Pending"))
            pids = ", ".join(f"{i}:{pid}" for i, pid in snapshot.running)
            grid.add_row(
                "state",
                f"[{_colour(state)}]{state}[/]  attempt {status.get('attempt', 0)}  "
                f"{len(snapshot.running)}/{snapshot.replicas} replicas running"
                + (f" (pids {pids})" if pids else "")
                + (f", {snapshot.spares} spare(s) waiting" if snapshot.spares else "")
                + f"  elapsed {human_duration(snapshot.now - snapshot.started)}",
            )
            step = (status.get("lastMetrics") or {}).get("step")
            if snapshot.total_steps and isinstance(step, int):
                bar = Table.grid(padding=(0, 1))
                bar.add_row(
                    ProgressBar(total=snapshot.total_steps, completed=step + 1, width=40),
                    _step_text(snapshot),
                )
                grid.add_row("step", bar)
            else:
                grid.add_row("step", _step_text(snapshot))
            grid.add_row("metrics", escape(_metrics_text(status) or "-"))
            grid.add_row("checkpoint", escape(_checkpoint_text(snapshot)))
            grid.add_row("interruptions", escape(_interruptions_text(status)))
            waiting = _waiting_text(snapshot)
            if waiting:
                grid.add_row("restart", escape(waiting))
            faults = _faults_text(snapshot) if state == RUNNING else ""
            if faults:
                grid.add_row("next fault", faults)
        log = Text()
        for when, text in self.events:
            log.append(f"{clock(when)} ", style="dim")
            log.append(f"{text}\n")
        return Panel(Group(grid, Text(""), log), title=title, title_align="left")


def _colour(state: str) -> str:
    return {RUNNING: "green", SUCCEEDED: "bold green", FAILED: "bold red"}.get(state, "yellow")


# --- texts shared by both -----------------------------------------------------------------


def _count(n: Any, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _step_text(snapshot: Snapshot) -> str:
    step = (snapshot.status.get("lastMetrics") or {}).get("step")
    if step is None:
        return "step -"
    if snapshot.total_steps:
        return f"step {step + 1}/{snapshot.total_steps}"
    return f"step {step}"


def _metrics_text(status: Mapping[str, Any]) -> str:
    metrics = status.get("lastMetrics") or {}
    shown = []
    for key, value in metrics.items():
        if key in ("step", "time"):
            continue
        shown.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return ", ".join(shown)


def _checkpoint_text(snapshot: Snapshot) -> str:
    status = snapshot.status
    latest = status.get("latestCheckpoint") or {}
    if not latest:
        return "none yet"
    name = str(latest.get("uri", "")).rstrip("/").rsplit("/", 1)[-1]
    age = _age(latest.get("time"), snapshot.now)
    kept = len(status.get("checkpoints") or [])
    return f"step {latest.get('step')} ({name}, {age} ago), {kept} kept"


def _interruptions_text(status: Mapping[str, Any]) -> str:
    text = (
        f"{_count(status.get('preemptions', 0), 'preemption')}, "
        f"{_count(status.get('failures', 0), 'failure')}"
    )
    entries = status.get("interruptions") or []
    if entries:
        last = entries[-1]
        text += f"; last: {last.get('reason')} in attempt {last.get('attempt')}"
        if "stepsLost" in last:
            text += f", {last['stepsLost']} steps lost"
    return text


def _waiting_text(snapshot: Snapshot) -> str | None:
    if snapshot.holding:
        return f"waiting: {snapshot.holding}"
    not_before = snapshot.status.get("restartNotBefore")
    if not_before:
        left = parse_time(str(not_before)) - snapshot.now
        return f"backing off: restart in {max(0.0, left):.1f}s"
    return None


def _faults_text(snapshot: Snapshot) -> str:
    shown = [
        f"{kind} in {left:.0f}s of training"
        for kind, left in snapshot.next_faults.items()
        if left is not None
    ]
    return ", ".join(shown)


def _age(timestamp: Any, now: float) -> str:
    if not timestamp:
        return "?"
    return human_duration(now - parse_time(str(timestamp)))


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 120 else human_duration(value)


# --- the summary --------------------------------------------------------------------------


@dataclass(frozen=True)
class Cost:
    """What one interruption cost: steps redone and seconds from the loss to training again."""

    entry: Mapping[str, Any]
    steps_lost: int | None
    seconds_without_training: float | None


def costs(status: Mapping[str, Any], training_started: Mapping[int, float]) -> list[Cost]:
    """Each interruption in the ledger with its cost; the next attempt's first report ends it."""
    out = []
    for entry in status.get("interruptions") or []:
        lost = entry.get("stepsLost")
        back = training_started.get(int(entry.get("attempt", 0)) + 1)
        seconds = back - parse_time(str(entry["time"])) if back is not None else None
        out.append(Cost(entry, None if lost is None else int(lost), seconds))
    return out


def summary_lines(
    status: Mapping[str, Any],
    *,
    job: str,
    namespace: str,
    elapsed: float,
    total_steps: int | None,
    training_started: Mapping[int, float],
    status_path: str,
) -> tuple[list[tuple[str, str]], list[list[str]], list[tuple[str, str]]]:
    """The summary: (label, text) rows, the interruptions' table rows, and closing rows."""
    state = str(status.get("state", "?"))
    attempts = int(status.get("attempt") or 0)
    head: list[tuple[str, str]] = [
        (
            "job",
            f"{namespace}/{job} {state} after {_seconds(elapsed)}, {_count(attempts, 'attempt')}",
        )
    ]
    metrics = status.get("lastMetrics") or {}
    step = metrics.get("step")
    if step is not None:
        done = f"{step + 1}" + (f" of {total_steps}" if total_steps else "")
        extra = _metrics_text(status)
        head.append(("steps", done + (f" ({extra} at the last report)" if extra else "")))
    kept = status.get("checkpoints") or []
    latest = status.get("latestCheckpoint") or {}
    if kept:
        names = ", ".join(
            f"{str(c.get('uri', '')).rsplit('/', 1)[-1]} (step {c.get('step')})" for c in kept
        )
        head.append(
            ("checkpoints", f"{len(kept)} kept: {names}; latest at step {latest.get('step')}")
        )
    else:
        head.append(("checkpoints", "none committed"))
    head.append(("interruptions", _interruptions_total(status)))
    for cond in status.get("conditions") or []:
        if cond.get("type") in LEDGER_CONDITIONS and cond.get("status") == "True":
            head.append((LEDGER_CONDITIONS[str(cond["type"])], str(cond.get("message", ""))))
    table: list[list[str]] = []
    paid = costs(status, training_started)
    for i, cost in enumerate(paid, 1):
        entry = cost.entry
        recovered = entry.get("secondsToRecover")
        table.append(
            [
                str(i),
                str(entry.get("attempt", "")),
                str(entry.get("kind", "")),
                str(entry.get("reason", "")),
                str(entry.get("step", "-")),
                "-" if cost.steps_lost is None else str(cost.steps_lost),
                "-" if recovered is None else _seconds(float(recovered)),
                "-"
                if cost.seconds_without_training is None
                else _seconds(cost.seconds_without_training),
            ]
        )
    tail_rows: list[tuple[str, str]] = []
    if paid:
        lost = sum(c.steps_lost or 0 for c in paid)
        idle = sum(c.seconds_without_training or 0.0 for c in paid)
        share = f" ({100.0 * lost / total_steps:.1f}% of {total_steps})" if total_steps else ""
        tail_rows.append(
            (
                "work lost",
                f"{_count(lost, 'step')} redone{share}; {_seconds(idle)} without training",
            )
        )
    else:
        tail_rows.append(("work lost", "none"))
    tail_rows.append(("status", status_path))
    return head, table, tail_rows


# The runtime's conditions about the ledger, as the summary labels them.
LEDGER_CONDITIONS = {"CheckpointCorrupt": "fell back", "LedgerRepaired": "ledger repaired"}

INTERRUPTION_COLUMNS = (
    "#",
    "attempt",
    "kind",
    "reason",
    "at step",
    "steps lost",
    "replicas up in",
    "training again in",
)


def _interruptions_total(status: Mapping[str, Any]) -> str:
    text = (
        f"{_count(status.get('preemptions', 0), 'preemption')} (no failure budget spent), "
        f"{_count(status.get('failures', 0), 'failure')}"
    )
    entries = status.get("interruptions") or []
    total = int(status.get("preemptions", 0)) + int(status.get("failures", 0))
    if total > len(entries):
        text += f"; the ledger keeps the last {len(entries)}"
    return text


def print_summary(
    status: Mapping[str, Any],
    *,
    job: str,
    namespace: str,
    elapsed: float,
    total_steps: int | None,
    training_started: Mapping[int, float],
    status_path: str,
    failure_log: str | None,
) -> None:
    """Prints the run's summary on stdout (rich; plain text when stdout is not a terminal)."""
    from rich.markup import escape
    from rich.table import Table

    head, interruptions, closing = summary_lines(
        status,
        job=job,
        namespace=namespace,
        elapsed=elapsed,
        total_steps=total_steps,
        training_started=training_started,
        status_path=status_path,
    )
    out: list[RenderableType] = [""]

    def grid(rows: Sequence[tuple[str, str]]) -> Table:
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold", no_wrap=True, min_width=len("interruptions"))
        table.add_column()
        for label, text in rows:
            table.add_row(label, escape(text))
        return table

    out.append(grid(head))
    if interruptions:
        ledger = Table(
            *INTERRUPTION_COLUMNS, box=None, padding=(0, 1), header_style="bold", pad_edge=False
        )
        for line in interruptions:
            ledger.add_row(*line)
        out.append(ledger)
    out.append(grid(closing))
    if status.get("state") == FAILED:
        failed = _failed_condition(status)
        out.append(
            f"[bold red]Failed[/]: {escape(str(failed.get('reason')))}: "
            f"{escape(str(failed.get('message')))}"
        )
        if failure_log:
            out.append(f"last lines of {escape(failure_log)}:")
            out.extend(f"  {escape(text)}" for text in tail(failure_log, LOG_TAIL_LINES))
    emit(out)


def emit(renderables: Sequence[RenderableType]) -> None:
    """Prints with rich on a terminal; elsewhere as plain text without trailing blanks."""
    from rich.console import Console

    if sys.stdout.isatty():
        console = Console(highlight=False)
        for item in renderables:
            console.print(item)
        return
    capture = Console(highlight=False, width=200, no_color=True, color_system=None)
    with capture.capture() as captured:
        for item in renderables:
            capture.print(item, soft_wrap=isinstance(item, str))
    for line in captured.get().splitlines():
        print(line.rstrip())
    sys.stdout.flush()


def _failed_condition(status: Mapping[str, Any]) -> Mapping[str, Any]:
    for cond in status.get("conditions") or []:
        if cond.get("type") == FAILED:
            found: Mapping[str, Any] = cond
            return found
    return {"reason": "Failed", "message": ""}


def tail(path: str, lines: int) -> Sequence[str]:
    """The last `lines` lines of a log file ([] if unreadable)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return [line.rstrip("\n") for line in deque(handle, maxlen=lines)]
    except OSError:
        return []
