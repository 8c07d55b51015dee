"""The run layout, one owner: `<save_dir>/<name>/[fold_i/]version_N/{checkpoints/, split.json, ...}`.

A run's folder is made by its logger (TensorBoard or CSV, `trainer.logger.init_args`: save_dir, name,
version); this module names it (a cross-validation fold's, the run a checkpoint belongs to), finds in it (the
latest version's best or last checkpoint, the runs of a folder) and checks it, so that no other module spells
`version_N`. Light on imports: `la-seg` reads it before it loads Lightning.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from la_seg.errors import DataError

DEFAULT_NAME = "lightning_logs"  # the logger's name when none is configured (Lightning's default)
CHECKPOINTS = "checkpoints"  # a run's checkpoint folder: <version folder>/checkpoints/{best,last}.ckpt
ENSEMBLE_VERSION = "ensemble"  # the version folder of a test / predict of several runs' checkpoints
_VERSION = re.compile(r"version_(\d+)")
_FOLD = re.compile(r"fold_(\d+)")


def version_name(version: int | str) -> str:
    """The folder of a run's `version`: `version_N` for a number, the name itself otherwise."""
    return f"version_{version}" if isinstance(version, int) else str(version)


def version_number(folder: Path) -> int | None:
    """N of a `version_N` folder, else None."""
    numbered = _VERSION.fullmatch(Path(folder).name)
    return int(numbered.group(1)) if numbered else None


def versions(runs: Path) -> list[Path]:
    """The `version_N` folders of `runs` (`<save_dir>/<name>`), by N."""
    numbered = [(version_number(p), p) for p in Path(runs).glob("version_*") if version_number(p) is not None]
    return [path for _, path in sorted(numbered)]


def folds(folder: Path) -> list[Path]:
    """The `fold_N` folders of a cross-validation's `folder`, by N."""
    numbered = [(_FOLD.fullmatch(p.name), p) for p in Path(folder).iterdir() if p.is_dir()]
    return [path for _, path in sorted((int(m.group(1)), p) for m, p in numbered if m)]


def checkpoint_in(version_dir: Path, which: str) -> Path:
    """`<version_dir>/checkpoints/<which>.ckpt` (which: best, last)."""
    return Path(version_dir) / CHECKPOINTS / f"{which}.ckpt"


def find_checkpoint(runs: Path, which: str) -> Path | None:
    """`<runs>/version_N/checkpoints/<which>.ckpt` of the highest N that has one, or None."""
    found = [checkpoint_in(version, which) for version in versions(runs)]
    return next((path for path in reversed(found) if path.is_file()), None)


def version_folder_of(checkpoint: Path) -> Path | None:
    """The version folder that holds `checkpoint` in its checkpoints/ folder, else None (a loose file)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINTS else None


def remove_unless_checkpointed(folder: Path) -> None:
    """Remove a run folder that a failed fit created before it saved any checkpoint (no empty version_N)."""
    if not any(Path(folder).glob(f"**/{CHECKPOINTS}/*.ckpt")):
        shutil.rmtree(folder, ignore_errors=True)


class RunLayout:
    """The run folder that a parsed config's logger (`trainer.logger.init_args`) will write into."""

    def __init__(self, logger_args: Any) -> None:
        self.args = logger_args  # the parsed Namespace: naming a run here is what the logger gets

    @classmethod
    def of(cls, trainer_config: Any) -> RunLayout | None:
        """The layout of a TensorBoard/CSV logger with a save_dir, else None (no logger, or another kind)."""
        args = getattr(trainer_config.get("logger"), "init_args", None)
        return None if args is None or args.get("save_dir") is None else cls(args)

    @property
    def runs(self) -> Path:
        """`<save_dir>/<name>`, where the `version_N` folders go."""
        return Path(self.args.save_dir) / (self.args.get("name") or DEFAULT_NAME)

    @property
    def run_dir(self) -> Path:
        """The version folder when the version is set, else `runs` (the logger numbers the next one)."""
        version = self.args.get("version")
        return self.runs if version is None else self.runs / version_name(version)

    def name_fold(self, fold: int) -> None:
        """Fold i of a cross-validation logs into `<save_dir>/<name>/fold_i/version_N`, as nnU-Net names its
        folds: a user sees which run is which fold, `--ckpt_path last` resumes that fold, and
        `--ckpt_path <save_dir>/<name>` finds the folds of one cross-validation."""
        self.args.name = f"{self.args.get('name') or DEFAULT_NAME}/fold_{fold}"

    def name_ensemble(self) -> None:
        """An ensemble of several runs logs into `<runs>/ensemble`: not into a member's run, nor a new one."""
        self.args.version = ENSEMBLE_VERSION

    def continue_run_of(self, checkpoint: Path) -> None:
        """Log into the run folder that holds `checkpoint` (resume continues its curves; the test report lands
        beside it), whatever the configured name: no new version folder for a run that exists."""
        version_dir = version_folder_of(checkpoint)  # as given, not resolved: Lightning compares the paths
        if version_dir is None:
            return
        self.args.save_dir, self.args.name = str(version_dir.parent.parent), version_dir.parent.name
        number = version_number(version_dir)  # an int: the bar shows v_num=3, not n_23
        self.args.version = version_dir.name if number is None else number

    def check_writable(self) -> None:
        """The run folder (events, config, test report) must be writable: otherwise TensorBoard's writer
        thread fails with a traceback once the work is done."""
        existing = next(p for p in (self.run_dir, *self.run_dir.parents) if p.exists())
        if not os.access(existing, os.W_OK | os.X_OK):
            raise DataError(
                f"run folder {existing.absolute()} is not writable (the run's logs, config and reports go "
                "there): fix its permissions, or log elsewhere with --trainer.logger.init_args.save_dir DIR"
            )
