"""The one exception type of la-seg, bad input that the user can fix, and the one line `la-seg` prints for
any error.

`la-seg` turns an error into one `la-seg: error: ...` line and exit status 2, so every message names the file
or option and what is wrong with it.
"""

from __future__ import annotations

import difflib
import errno
import re
import sys
from argparse import ArgumentError, ArgumentParser  # jsonargparse's ArgumentError is argparse's
from collections.abc import Iterable


class DataError(ValueError):
    """Bad input data or settings: the message names the file or field and what is wrong with it."""


MAX_ERROR_CHARS = 2000  # an error line stays readable in a terminal and a job log
_EXPECTED = (DataError, ValueError, OSError, ArgumentError)  # bad input, bad options or values, files, disks
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Iteration): ")
_WORKER_HEADER = re.compile(r"Caught \w+ in DataLoader worker process \d+")


def describe_error(error: BaseException) -> str:
    """One line for `error`: unwrapped from a DataLoader worker's re-raise, with a hint for the unexpected."""
    message = str(error)
    if _WORKER_HEADER.search(message):  # torch re-raises the worker's error with its traceback as message
        message = _worker_error(message)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        message = f"no space left on device{where}: free some space and run again"
    elif isinstance(error, PermissionError):
        message = f"permission denied: {error.filename or message}"
    elif (option := _trainer_option(error, message)) is not None:  # a Trainer argument: name its option
        message = f"{option}: {message}"
    elif not isinstance(error, _EXPECTED):
        message = f"{type(error).__name__}: {message} (unexpected: LA_SEG_DEBUG=1 shows the traceback)"
    message = " ".join(message.split())
    if len(message) > MAX_ERROR_CHARS:  # an option's echoed value can be megabytes (an expanded YAML alias)
        message = f"{message[:MAX_ERROR_CHARS]} ... ({len(message) - MAX_ERROR_CHARS} characters cut)"
    return message


def _worker_error(message: str) -> str:
    """The original error of a DataLoader worker, from the traceback torch re-raises it with."""
    lines = message.splitlines()
    starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
    original = "\n".join(lines[starts[-1] :]) if starts else lines[-1]
    return _EXCEPTION_LINE.sub("", original.strip(), count=1)


def _trainer_option(error: BaseException, message: str) -> str | None:
    """For Lightning's MisconfigurationException, the --trainer option its message names first (or "trainer
    settings"); None for any other error. Only a process that imported Lightning can raise one."""
    exceptions = sys.modules.get("lightning.fabric.utilities.exceptions")
    if exceptions is None or not isinstance(error, exceptions.MisconfigurationException):
        return None
    import inspect

    from lightning.pytorch import Trainer

    found = [
        (m.start(), p)
        for p in inspect.signature(Trainer).parameters
        if (m := re.search(rf"\b{p}\b", message))
    ]
    return f"--trainer.{min(found)[1]}" if found else "trainer settings"


_UNKNOWN = re.compile(r"(?:unrecognized arguments|Unrecognized arguments|Unexpected option)[^-]*(--[\w.-]+)")
_OPTION = re.compile(r"(?<![\w-])--[\w.+-]*\w")  # an option as a parser's help lists it


def with_nearest_option(error: ArgumentError, parsers: Iterable[ArgumentParser]) -> Exception:
    """For an unknown option, a DataError naming the nearest option of `parsers` (`--data.rooot`: did you
    mean --data.root?); `error` itself otherwise. The options are read from the parsers' help, which lists
    all."""
    unknown = _UNKNOWN.search(str(error))
    if unknown is None:
        return error
    known = {option for parser in parsers for option in _OPTION.findall(parser.format_help())}
    return nearest_option(unknown.group(1), known) or error


def nearest_option(unknown: str, known: Iterable[str]) -> DataError | None:
    """The error for option `unknown` naming the nearest of `known` (`--data.rooot`: did you mean
    --data.root?); None when none is near enough to name."""
    near = difflib.get_close_matches(unknown, sorted(known), n=1, cutoff=0.8)
    return DataError(f"unknown option {unknown}: did you mean {near[0]}?") if near else None


# The command-line option that sets each argument of la-seg's networks (la_seg.models): the models raise
# ValueErrors about their own arguments (`groups=4 ...`) and know nothing of the command line.
NETWORK_OPTIONS = {
    "groups": "model.net.fusion_groups",  # BlockFusion's
    "fusion_groups": "model.net.fusion_groups",
    "mode": "model.net.fusion",  # BlockFusion's
    "decoder_channels": "model.net.decoder_channels",
    "indices": "model.net.indices",
    "trainable_blocks": "model.net.trainable_blocks",
    "model_kwargs": "model.net.backbone_kwargs",  # DINOBackbone's
    "pretrained": "model.net.pretrained",
    "img_size": "data.img_size",  # linked to model.net.img_size
}
_ARGUMENT = re.compile(rf"(?<![\w.])({'|'.join(NETWORK_OPTIONS)})(?=\s*[<>]?=|\))")


def naming_options(error: ValueError) -> DataError:
    """A network's ValueError as the user-facing DataError, each argument it names as `name=value`,
    `name <= n` or `len(name)` replaced by the option that sets it (NETWORK_OPTIONS)."""
    return DataError(_ARGUMENT.sub(lambda match: NETWORK_OPTIONS[match.group(1)], str(error)))
