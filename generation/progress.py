"""Progress of long work on stderr: a tqdm bar on a terminal; on a log file or pipe, a line at every tenth of
the work (a scheduled job's log shows it is moving, without a line per step)."""

from __future__ import annotations

import sys


class Progress:
    """Call with (done, total) as work advances."""

    def __init__(self, label: str, unit: str = "steps"):
        self.label, self.unit = label, unit
        self.bar = None
        self.next_tenth = 1

    def __call__(self, done: int, total: int) -> None:
        if sys.stderr.isatty():
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=self.label, unit=f" {self.unit}", file=sys.stderr, leave=True)
            self.bar.update(done - self.bar.n)
            if done >= total:
                self.bar.close()
            return
        if done >= total or done * 10 >= self.next_tenth * total:
            print(f"{self.label}: {done}/{total} {self.unit}", file=sys.stderr, flush=True)
            self.next_tenth = done * 10 // max(total, 1) + 1
