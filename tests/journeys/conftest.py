"""Journeys: README's workflows chained the way a user chains them, each command fed what the previous one
wrote (never a hand-written split.json, checkpoint, report or prediction folder). Everything runs in-process
through `la_seg.cli.main` in a temporary working folder, on tiny models and phantoms."""

from __future__ import annotations

from pathlib import Path

import pytest

from la_seg.cli import main
from la_seg.data.synthetic import write_dataset
from tests.tiny_options import TINY_CLI

# A tiny network on small slices: a few seconds per epoch on 2 CPU cores.
TINY = [*TINY_CLI, "--data.batch_size", "8", "--trainer.enable_model_summary", "false"]


class Shell:
    """`la-seg ARGS` as typed in the working folder; returns (exit status, stdout, stderr)."""

    def __init__(self, capfd) -> None:
        self.capfd = capfd

    def __call__(self, *argv, expect: int = 0) -> tuple[str, str]:
        self.capfd.readouterr()
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = self.capfd.readouterr()
        command = " ".join(map(str, argv))
        assert code == expect, f"la-seg {command} exited {code}\n{out[-2000:]}\n{err[-3000:]}"
        return out, err


@pytest.fixture
def la_seg(capfd, tmp_path, monkeypatch) -> Shell:
    """la-seg run in a fresh working folder (its runs/ lands under tmp_path)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LA_SEG_DEBUG", raising=False)
    return Shell(capfd)


@pytest.fixture(scope="session")
def journey_data(tmp_path_factory) -> Path:
    """Eight small LAScarQS-style cases (slices last, label 420)."""
    root = tmp_path_factory.mktemp("journey_data")
    write_dataset(root, cases=8, seed=1, shape=(48, 44, 12), spacing=(1.6, 1.6, 4.0))
    return root
