"""Progress that fits where it runs: a redrawn bar on a terminal, a few plain lines in a log (done / total,
time left), from the helper itself and from the commands that take minutes."""

from __future__ import annotations

import io
import re
import shutil

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from la_seg.callbacks.progress import EpochLines, TerminalBar, lightning_progress_bar
from la_seg.cli import main
from la_seg.data.layouts import find_cases
from la_seg.progress import MAX_GAP_S, Progress, duration, tracked
from tests.tiny_options import TINY_CLI


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    """Fake seconds, moved on by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_long_job_prints_few_plain_lines_with_done_total_and_time_left():
    log, clock = io.StringIO(), Clock()
    for _ in tracked(range(1000), "evaluate: cases scored", stream=log, clock=clock):
        clock.now += 0.5  # 1000 items in 8 min 20 s
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert lines[0] == "evaluate: cases scored: 0/1000"
    assert lines[-1] == "evaluate: cases scored: 1000/1000, in 8 min 20 s"
    assert 10 <= len(lines) <= 2 + 500 / MAX_GAP_S  # bounded by the gap, whatever the item count
    progress = r"evaluate: cases scored: (\d+)/1000, .* so far, about .* left$"
    counts = [int(re.match(progress, line)[1]) for line in lines[1:-1]]
    assert counts == sorted(counts) and counts[0] == 60  # 10 % takes 50 s: a line after MAX_GAP_S (30 s)
    assert lines[1] == "evaluate: cases scored: 60/1000, 30 s so far, about 7 min 50 s left"


def test_a_fast_job_prints_its_start_and_its_end_only():
    log, clock = io.StringIO(), Clock()
    with Progress("export-nnunet: cases written", 6, stream=log, clock=clock) as progress:
        for _ in range(6):
            clock.now += 0.1
            progress.advance()
    lines = ["export-nnunet: cases written: 0/6", "export-nnunet: cases written: 6/6, in 1 s"]
    assert log.getvalue().splitlines() == lines


def test_slow_steps_each_get_a_line_with_the_time_left():
    log, clock = io.StringIO(), Clock()
    progress = Progress("calibration: validation cases segmented", 4, stream=log, clock=clock)
    clock.now = 60.0
    progress.advance()
    clock.now = 120.0
    progress.advance(note="case_2")
    assert log.getvalue().splitlines()[1:] == [
        "calibration: validation cases segmented: 1/4, 1 min 00 s so far, about 3 min 00 s left",
        "calibration: validation cases segmented: 2/4, 2 min 00 s so far, about 2 min 00 s left; case_2",
    ]


def test_on_a_terminal_the_bar_redraws_in_place_and_disabled_progress_says_nothing():
    screen = Terminal()
    for _ in tracked(range(5), "predict: cases written", stream=screen):
        pass
    assert "\r" in screen.getvalue() and "5/5" in screen.getvalue()
    quiet = io.StringIO()
    for _ in tracked(range(5), "predict: cases written", stream=quiet, enabled=False):
        pass
    assert quiet.getvalue() == ""


def test_failed_work_ends_without_a_last_line_that_reads_as_done():
    log = io.StringIO()
    with pytest.raises(ValueError):
        for n in tracked(range(6), "evaluate: cases scored", stream=log):
            if n == 2:
                raise ValueError("case 3 is on another grid")
    assert log.getvalue().splitlines() == ["evaluate: cases scored: 0/6"]


def test_durations_read_as_a_person_would_say_them():
    assert [duration(s) for s in (4.4, 200, 7500)] == ["4 s", "3 min 20 s", "2 h 05 min"]


def test_lightnings_bar_is_chosen_by_where_it_draws(monkeypatch):
    monkeypatch.setattr("sys.stdout", Terminal())
    (bar,) = lightning_progress_bar({"callbacks": []})
    assert isinstance(bar, TerminalBar)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    (bar,) = lightning_progress_bar({"callbacks": None})
    assert isinstance(bar, EpochLines)
    assert lightning_progress_bar({"enable_progress_bar": False}) == []
    assert lightning_progress_bar({"callbacks": [TQDMProgressBar(refresh_rate=50)]}) == []  # the user's own


def test_fit_and_calibration_without_a_terminal_log_lines_not_carriage_returns(tmp_path, synth_root, capfd):
    shown = [option for option in TINY_CLI if option not in ("--trainer.enable_progress_bar", "false")]
    main(["fit", *shown, "--data.root", str(synth_root), "--trainer.max_epochs", "2",
          "--trainer.limit_train_batches", "1"])  # fmt: skip
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    epochs = [line for line in err.splitlines() if line.startswith("fit: epochs")]
    assert epochs[0] == "fit: epochs: 0/2" and epochs[-1].startswith("fit: epochs: 2/2, in ")
    assert "val/dice" in epochs[-1]  # the latest epoch's metrics
    calibration = [line for line in err.splitlines() if line.startswith("calibration: validation cases")]
    assert calibration[0] == "calibration: validation cases segmented: 0/1"
    assert calibration[-1].startswith("calibration: validation cases segmented: 1/1, in ")


def test_predict_counts_the_cases_as_they_are_written(tmp_path, synth_root, capsys):
    main(["predict", *TINY_CLI, "--untrained", "true", "--data.predict_root", str(synth_root),
          "--writer.output_dir", str(tmp_path / "masks")])  # fmt: skip
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("predict: cases")]
    assert lines[0] == "predict: cases written: 0/6" and lines[-1].startswith("predict: cases written: 6/6")


@pytest.mark.parametrize("command", ["evaluate", "export-nnunet"])
def test_evaluate_and_export_report_their_cases(command, tmp_path, synth_root, capsys):
    if command == "evaluate":  # the references themselves as predictions
        pred = tmp_path / "pred"
        pred.mkdir()
        for case in find_cases(synth_root):
            shutil.copy(case.label_path, pred / f"{case.case_id}.nii.gz")
        main(["evaluate", "--pred", str(pred), "--ref", str(synth_root)])
        what = "evaluate: cases scored"
    else:
        main(["export-nnunet", "--data.root", str(synth_root), "--out", str(tmp_path / "raw")])
        what = "export-nnunet: cases written"
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith(what)]
    assert lines[0] == f"{what}: 0/6" and lines[-1].startswith(f"{what}: 6/6, in ")
    assert what not in captured.out  # results on stdout stay clean
