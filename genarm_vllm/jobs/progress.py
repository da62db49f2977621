"""Progress and totals of a batch job: rows/s and generated tokens/s, failures by reason."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

MAX_LISTED_FAILURES = 10  # failed rows named (file and line) in the final summary


@dataclass
class JobSummary:
    rows_done: int = 0          # rows this run wrote with a generation
    rows_failed: int = 0        # rows this run wrote as error rows
    rows_before: int = 0        # rows the output already held (a resume)
    generated_tokens: int = 0
    seconds: float = 0.0
    peak_buffered: int = 0      # most finished rows that waited in the reorder buffer at once
    failures: Counter = field(default_factory=Counter)   # reason kind -> rows
    first_failures: list[str] = field(default_factory=list)

    @property
    def rows_written(self) -> int:
        return self.rows_done + self.rows_failed

    def line(self) -> str:
        """The final totals line."""
        failed = ""
        if self.rows_failed:
            failed = " (" + ", ".join(f"{n} {kind}" for kind, n in self.failures.most_common()) + ")"
        seconds = max(self.seconds, 1e-9)
        resumed = f", {self.rows_before} already there" if self.rows_before else ""
        return (f"{self.rows_done} rows done, {self.rows_failed} failed{failed}{resumed}; "
                f"{self.generated_tokens} tokens generated in {self.seconds:.1f} s: "
                f"{self.rows_written / seconds:.1f} rows/s, "
                f"{self.generated_tokens / seconds:.1f} generated tokens/s")

    def report(self) -> str:
        """The totals line, then the first failed rows with their reasons."""
        lines = [self.line()]
        if self.first_failures:
            more = self.rows_failed - len(self.first_failures)
            lines += ["failed rows:", *("  " + f for f in self.first_failures)]
            if more > 0:
                lines.append(f"  ... and {more} more (rows with an \"error\" field in the output)")
        return "\n".join(lines)


class JobProgress:
    """A tqdm bar over the input's rows with rows/s and generated tokens/s; the totals."""

    def __init__(self, total: int, rows_before: int, enabled: bool = True):
        from tqdm import tqdm

        self.summary = JobSummary(rows_before=rows_before)
        self._start = time.monotonic()
        self._shown = 0.0
        self.bar = tqdm(total=total, initial=rows_before, unit="row", desc="generate",
                        disable=not enabled, dynamic_ncols=True)

    def done(self, rows: int = 1, tokens: int = 0) -> None:
        self.summary.rows_done += rows
        self.summary.generated_tokens += tokens
        self._advance(rows)

    def failed(self, kind: str, message: str) -> None:
        self.summary.rows_failed += 1
        self.summary.failures[kind] += 1
        if len(self.summary.first_failures) < MAX_LISTED_FAILURES:
            self.summary.first_failures.append(message)
        self._advance(1)

    def _advance(self, rows: int) -> None:
        self.bar.update(rows)
        now = time.monotonic()
        if now - self._shown > 0.5:  # postfix at most twice a second: it redraws the bar
            self._show_rates(now)

    def _show_rates(self, now: float) -> None:
        self._shown = now
        self.bar.set_postfix_str(
            f"{self.summary.generated_tokens / max(now - self._start, 1e-9):.0f} tok/s"
            + (f", {self.summary.rows_failed} failed" if self.summary.rows_failed else ""))

    def close(self) -> JobSummary:
        now = time.monotonic()
        self.summary.seconds = now - self._start
        self._show_rates(now)  # the bar's last state shows the job's rates, not a stale one
        self.bar.close()
        return self.summary
