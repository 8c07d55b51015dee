"""Atomic output: write beside the target, then rename, so a crash never leaves a half-written file.

Temp files are named `.<target name>.<host>.<pid>.<random>.la-seg-tmp`: recognisable as la-seg's, and carrying
the writing host and process id, so that `remove_stale_temp_files` can delete those a killed run left behind,
and only those: on shared storage a file of another host is never judged by this host's process table.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from la_seg.errors import DataError

TEMP_SUFFIX = ".la-seg-tmp"
LOCK_NAME = ".la-seg.lock"
_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[^.]+" + re.escape(TEMP_SUFFIX) + "$")


def host_tag() -> str:
    """This host's name as it appears in temp file names (no dots, which separate the name's fields)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto `path` only if the block succeeds.

    The temp name does not end like the target, so writers that guess a format from the name must be
    told it (e.g. PIL's `format="PNG"`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.{host_tag()}.{os.getpid()}.", suffix=TEMP_SUFFIX
    )
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs should read like any other file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def loader_worker_ends_ignored() -> Iterator[None]:
    """Ignore SIGCHLD in the block (a checkpoint being written). torch's DataLoader handler raises on a loader
    worker's end; raised inside torch.save's write callback, it left the zip writer unfinished, whose
    destructor then wrote to the closed file and aborted the process (SIGABRT, no checkpoint): what a
    SIGTERM to the process group (SLURM) did. A worker that really failed is still found: the DataLoader
    also polls its workers. The handler is swapped rather than the signal masked: a mask holds for one
    thread only, and any other thread (OpenMP, TensorBoard's writer) took the signal for the main one."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        yield  # Windows has no SIGCHLD; only the main thread may set a handler (and only it runs one)
        return
    # SIG_DFL, not SIG_IGN: torch still reaps its workers and reads their status
    previous = signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGCHLD, previous)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, document: Any) -> None:
    """Write `document` as indented JSON, atomically; NaN (not JSON) becomes null."""
    atomic_write_text(path, json.dumps(json_safe(document), indent=2, default=str) + "\n")


def write_csv(
    path: str | Path,
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    comments: Mapping[str, Any] | None = None,
) -> None:
    """Write a CSV atomically, led by one `# key: value` line per comment (read it with comment="#")."""
    buffer = io.StringIO()
    for key, value in (comments or {}).items():
        buffer.write(f"# {key}: {value}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def json_safe(value: Any) -> Any:
    """`value` with every NaN float replaced by None, through dicts, lists and tuples."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete la-seg temp files in `folder` that this host wrote and whose process is gone (a killed run's
    leftovers).

    Temp files of live processes (another run writing there now) and of other hosts (whose processes this
    host cannot see: on shared storage, another node's run may be writing them now) are kept; a later run on
    their host removes them. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, host = [], host_tag()
    for entry in folder.iterdir():
        match = _TEMP_NAME.match(entry.name)
        if match and match["host"] == host and entry.is_file() and not _process_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """An output folder held by one la-seg run: a second run into it fails at once, naming the folder and the
    process that holds it, before it does any work (two runs into one folder would mix or replace each
    other's outputs). The lock is a `flock` on `lock_file` (`<folder>/.la-seg.lock` unless given: a folder
    replaced whole keeps its lock beside it), which the operating system gives up when the process ends
    however it ends; the holder's pid, host and command are written into it for the second run to name.
    Released, the lock file is removed, and so is its folder if the lock created it and it is still empty.
    """

    def __init__(self, folder: str | Path, option: str, lock_file: str | Path | None = None) -> None:
        self.folder = Path(folder)
        self.option = option
        self.lock_file = Path(lock_file) if lock_file is not None else self.folder / LOCK_NAME
        self._lock: FileLock | None = None
        self._created = False

    def acquire(self) -> None:
        """Take the folder, or raise a DataError naming it and its holder; remove killed runs' temp files."""
        home = self.lock_file.parent
        self._created = not home.exists()
        home.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.lock_file)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise DataError(
                f"{self.option} {self.folder} is in use by another la-seg run ({_holder(self.lock_file)}; "
                f"lock file {self.lock_file}); wait for it to finish or choose another folder"
            ) from None
        self._lock = lock
        command = " ".join(["la-seg", *sys.argv[1:2]]) if sys.argv[1:2] else "la-seg"
        self.lock_file.write_text(f"pid {os.getpid()} on {socket.gethostname()}: {command}\n")
        remove_stale_temp_files(home)

    def release(self) -> None:
        """Give the folder back (if held): remove the lock file, and its folder if the lock made it empty."""
        if self._lock is None:
            return
        self.lock_file.unlink(missing_ok=True)  # while held: no other run is left holding a deleted file
        self._lock.release()
        self._lock = None
        if self._created:
            with suppress(OSError):  # not empty: it holds outputs now
                self.lock_file.parent.rmdir()

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def claim_output_folder(
    out: Path, inputs: Iterable[Path | None], outputs: Iterable[Path], overwrite: bool, what: str
) -> Iterator[None]:
    """`--out` taken for one run of a command that writes a report into a folder: never an input nor a file,
    held by this run alone (FolderLock), and its earlier `outputs` (`what`: "report", ...) kept unless
    `overwrite`; they are looked for only once the folder is held."""
    refuse_writing_into_inputs(out, inputs, "--out")
    if out.is_file():
        raise DataError(f"--out {out} is a file; give a folder")
    with FolderLock(out, "--out"):
        existing = [str(path) for path in outputs if path.exists()]
        if existing and not overwrite:
            raise DataError(f"{what} files exist: {existing}; pass --overwrite true or choose another --out")
        yield


def _holder(lock_file: Path) -> str:
    """Who holds `lock_file`, as its holder wrote it (empty while the holder is starting)."""
    try:
        text = lock_file.read_text().strip()
    except OSError:
        text = ""
    return f"held by {text}" if text else "holder not yet recorded"


def refuse_writing_into_inputs(
    output: str | Path, inputs: Iterable[str | Path | None], option: str, *, replaces: bool = False
) -> None:
    """The one "never write into the input" rule, for every command that writes.

    `inputs` are the files and folders the command reads (None and paths that do not exist are ignored); a
    file protects its folder, so a single input file is protected like a folder input. `output` (the folder,
    or the file, la-seg is about to write) may not be an input, nor be or lie inside an input's folder.
    `replaces`: the output is replaced as a whole (an export), so it may not hold an input either. Paths are
    compared resolved (links followed). A DataError names `option`, the output and the input.
    """
    target = Path(output).expanduser().resolve()
    for given in inputs:
        if given is None or not os.path.lexists(Path(given).expanduser()):
            continue
        source = Path(given).expanduser().resolve()
        if target == source:
            raise DataError(f"{option} {output} is the input {given}; la-seg never writes into its input")
        # a file protects its folder: the one it is in, and, for a link, the one its target is in
        folders = (
            {source}
            if source.is_dir()
            else {source.parent, Path(given).expanduser().absolute().parent.resolve()}
        )
        for folder in folders:
            if target == folder or folder in target.parents:
                where = "is" if target == folder else "lies inside"
                kind = "the input folder" if source.is_dir() else "the folder of the input"
                raise DataError(
                    f"{option} {output} {where} {kind} {given}; la-seg never writes into its input: "
                    "choose another folder"
                )
        if replaces and target in source.parents:
            raise DataError(
                f"{option} {output} holds the input {given} and would be replaced; la-seg never writes "
                "into its input: choose another folder"
            )


def check_output_dir(output_dir: str | Path | None, inputs: Iterable[str | Path | None]) -> None:
    """predict's --writer.output_dir is given and is none of the inputs, nor inside one; checked when typed
    before Lightning loads, by the CLI before a model is built, and by the writer with every case's files."""
    if output_dir is None:
        raise DataError(
            "--writer.output_dir is required for `la-seg predict`: the folder to write masks into"
        )
    refuse_writing_into_inputs(output_dir, inputs, "--writer.output_dir")


# The data folders predict may read, so never writes into: --data.predict_root, --data.root, --data.test_root
PREDICT_ROOTS = ("predict_root", "root", "test_root")


def check_predict_roots(output_dir: str | Path | None, roots: Iterable[str | Path | None]) -> None:
    """check_output_dir against the data roots that exist: a root that is neither file nor folder (a FIFO)
    is the data module's to refuse, naming it."""
    existing = [root for root in roots if root and (Path(root).is_dir() or Path(root).is_file())]
    check_output_dir(output_dir, existing)
