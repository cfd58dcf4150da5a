"""What a running search says about time: the plan before it starts, an estimate once the
first evaluation interval has been timed, and an ETA in the progress line. On a terminal the
progress line is a tqdm bar; anywhere else (a log file, a pipe) it is one line per finished
unit plus, in a long unit, one line per evaluation at most once a minute: never a flood of
carriage-return updates."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from .estimate import format_duration, format_step


class Progress:
    """`todo`: iterations still to train per unit, in order (a resumed unit's remainder
    first). ``start_unit`` / ``update`` / ``evaluated`` / ``unit_done`` are called by the
    runner and ``training.Level.run``."""

    HEARTBEAT_S = 60.0

    def __init__(self, todo: list[int], units_total: int, log: Callable[[str], None] = print,
                 enabled: bool = True, stream=None, clock=time.monotonic):  # fmt: skip
        self.log, self.clock = log, clock
        self.stream = stream if stream is not None else sys.stdout
        self.units_total, self.units_done = units_total, units_total - len(todo)
        self.left = sum(todo)
        self.done_here = 0  # iterations trained in this process (the rate's numerator)
        self.t0 = self.last_line = clock()
        self.estimated = False
        self.unit = ""
        self.it = self.total = 0
        tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.lines = enabled and not tty
        self.bar = None
        if tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.left, unit="it", file=self.stream, dynamic_ncols=True,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                       "it [{elapsed}<{remaining}]{postfix}")  # fmt: skip

    def eta_seconds(self) -> float | None:
        elapsed = self.clock() - self.t0
        if not self.done_here or elapsed <= 0:
            return None
        return self.left * elapsed / self.done_here

    def _eta(self) -> str:
        eta = self.eta_seconds()
        if eta is None:
            return "ETA unknown"
        return f"ETA {format_duration(eta)} ({_clock_at(eta)})"

    def start_unit(self, name: str, start: int, total: int) -> None:
        self.unit, self.it, self.total = name, start, total
        if self.bar is not None:
            self.bar.set_description(f"[{self.units_done + 1}/{self.units_total}] {name}")

    def status(self, running: int, queued: int) -> None:
        """With workers: how many units are running and queued (shown in the bar)."""
        if self.bar is not None:
            self.bar.set_postfix_str(f"{running} running, {queued} queued", refresh=False)

    def update(self, n: int = 1) -> None:
        self.it += n
        self.left -= n
        self.done_here += n
        if self.bar is not None:
            self.bar.update(n)

    def evaluated(self, iteration: int) -> None:
        """After each evaluation: the first one of this process gives the estimate; in a log,
        a line now and then so that a long unit is not mistaken for a hang."""
        if not self.estimated and self.done_here:
            self.estimated = True
            per_it = (self.clock() - self.t0) / self.done_here
            rest = per_it * self.left
            self.write(
                f"measured {format_step(per_it)} per iteration (training and evaluation, "
                f"{self.done_here} iterations): about {format_duration(rest)} for the "
                f"{self.left:,} iterations left (done about {_clock_at(rest)})"
            )
        elif self.lines and self.clock() - self.last_line >= self.HEARTBEAT_S:
            self.write(f"  {self.unit}: iteration {iteration:,} of {self.total:,}; {self._eta()}")

    def unit_done(self, line: str) -> None:
        self.units_done += 1
        self.write(f"{line}  [{self.units_done}/{self.units_total} units; {self._eta()}]"
                   if self.left else line)  # fmt: skip

    def write(self, line: str) -> None:
        self.last_line = self.clock()
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clock_at(seconds_from_now: float) -> str:
    return time.strftime("%a %H:%M", time.localtime(time.time() + seconds_from_now))
