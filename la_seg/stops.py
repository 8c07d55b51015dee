"""How a stopped run ends: the line `la-seg` prints and its exit status, 143 after SIGTERM (128 + 15) and 130
after Ctrl-C (128 + 2), so a job script sees that the work is not done.

The callback that stops a run (la_seg/callbacks/termination.py) records them here; `la-seg`'s entry point
reads them without importing Lightning, which a command that never started a run does not need.
"""

from __future__ import annotations

import sys

EXIT_STATUS = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
SIGINT_STATUS = 130  # 128 + SIGINT, as a shell reports a process that Ctrl-C ended
_STOPS: list[str] = []  # the line of a SIGTERM or SIGINT stop in this run (la-seg's main reads and clears it)
_SIGNALS: list[str] = []  # which signal stopped this run


def record_stop(signal_name: str, line: str) -> None:
    """Note that `signal_name` (SIGTERM, SIGINT) stopped the run; `line` says so (say_more may add)."""
    _SIGNALS.append(signal_name)
    _STOPS.append(line)


def say_more(line: str) -> None:
    """Replace the stop's line with one that also says what was kept and how to go on."""
    _STOPS.append(line)


def sigterm_stop(clear: bool = False) -> str | None:
    """The line to print when this run was stopped by SIGTERM or SIGINT, else None; `clear` starts a new
    run."""
    message = _STOPS[-1] if _STOPS else None
    if clear:
        _STOPS.clear()
        _SIGNALS.clear()
    return message


def stop_status() -> int:
    """The exit status of a stopped run: 130 after Ctrl-C, 143 after SIGTERM."""
    return SIGINT_STATUS if "SIGINT" in _SIGNALS else EXIT_STATUS


def is_lightning_stop(exit_: SystemExit) -> bool:
    """Whether `exit_` is Lightning's SIGTERMException (a SystemExit of status 0, which a job script would
    read as success); only a process that imported Lightning can raise one."""
    exceptions = sys.modules.get("lightning.pytorch.utilities.exceptions")
    return exceptions is not None and isinstance(exit_, exceptions.SIGTERMException)
