"""What a batch run reports: the :class:`BatchSummary` it returns, its text form, and the live progress bar."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from longserve.clients.batch_io import BadLine


@dataclass
class BatchSummary:
    """Counts of one run; every non-blank input line lands in exactly one of succeeded, failed, skipped, bad
    (or none of them if the run was interrupted before it got there)."""

    input_path: str
    output_path: str
    succeeded: int = 0  # answered with a 2xx status in this run
    failed: int = 0  # answered in this run with an error line or a non-2xx status
    skipped: int = 0  # already answered in the output file, so not sent again
    skipped_failed: int = 0  # of those, answered with a failure by an earlier run (see --retry-failed)
    bad_lines: list[BadLine] = field(default_factory=list)  # skipped input lines, with line numbers
    retries: int = 0  # HTTP attempts beyond the first, over all requests
    total_tokens: int = 0  # sum of usage.total_tokens of the answers
    wall_s: float = 0.0
    torn_bytes: int = 0  # a torn last output line (from a killed run) that was cut off before appending
    interrupted: bool = False  # stopped early (Ctrl-C): rerun the same command to finish

    @property
    def tokens_per_s(self) -> float:
        return self.total_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """True only if every input line has a successful answer in the output file."""
        return not (self.interrupted or self.failed or self.skipped_failed or self.bad_lines)


def format_summary(summary: BatchSummary) -> str:
    lines = [
        f"batch {summary.input_path} -> {summary.output_path}: {summary.succeeded} done, {summary.failed} failed, "
        f"{summary.skipped} skipped as already answered"
        + (f" ({summary.skipped_failed} of them failed earlier)" if summary.skipped_failed else "")
        + f", {len(summary.bad_lines)} bad input lines",
        f"  {summary.wall_s:.1f} s wall, {summary.total_tokens} tokens, {summary.tokens_per_s:.1f} tokens/s, "
        f"{summary.retries} retries",
    ]
    if summary.bad_lines:
        numbers = ", ".join(str(bad.line_no) for bad in summary.bad_lines[:20])
        more = f" and {len(summary.bad_lines) - 20} more" if len(summary.bad_lines) > 20 else ""
        lines.append(f"  bad input lines: {numbers}{more}")
    if summary.torn_bytes:
        lines.append(f"  cut off a torn last output line ({summary.torn_bytes} bytes) from a killed run")
    if summary.skipped_failed:
        lines.append("  rerun with --retry-failed to send the failed ones again")
    if summary.interrupted:
        lines.append("  interrupted: rerun the same command to resume (answered lines are skipped)")
    return "\n".join(lines)


class _TokensPerSecond(ProgressColumn):
    """usage.total_tokens of the answers so far over the elapsed time."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.fields.get("tokens", 0) / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:.0f} tok/s", style="progress.data.speed")


class BatchProgress:
    """A rich progress bar on ``console`` (done/total, failed, tokens/s, ETA); does nothing when disabled."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._failed = 0
        self._tokens = 0
        if enabled:
            self._progress = Progress(
                TextColumn("batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[failed]} failed"),
                _TokensPerSecond(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )

    def __enter__(self) -> BatchProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task("batch", total=None, failed=0, tokens=0)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def set_total(self, total: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, total=total)

    def advance(self, *, failed: bool, tokens: int) -> None:
        """One more line answered (or, with tokens=0 and failed=False, one more bad line passed)."""
        if self._progress is None or self._task is None:
            return
        self._failed += failed
        self._tokens += tokens
        self._progress.update(self._task, advance=1, failed=self._failed, tokens=self._tokens)
