"""What a command imports before it answers (issue 28): `--help`, argument errors, `synth`, `evaluate` and
`export-nnunet` answer without Lightning or the model stack, and predict refuses a bad output folder before it
reads a checkpoint. Checked on the modules a fresh process has loaded, not on time (benchmarks/startup.py
measures that)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from la_seg.cli import main
from la_seg.data.synthetic import write_dataset

# Runs `la-seg ARGS` in a fresh interpreter and prints, last, the heavy libraries it has loaded.
PROBE = """
import json, sys
from la_seg.cli import main
try:
    main()  # as the console script does: argv from sys.argv
except SystemExit:
    pass
heavy = ("torch", "lightning", "timm", "monai", "torchvision", "torchmetrics", "albumentations")
print(json.dumps(sorted(name for name in heavy if name in sys.modules)))
"""
MODEL_STACK = {"lightning", "timm", "monai", "torchvision", "torchmetrics", "albumentations"}


def loaded_by(argv: list[str], cwd) -> tuple[set[str], str]:
    """The heavy libraries `la-seg argv` loaded, and what it printed."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    return set(json.loads(lines[-1])), "\n".join(lines[:-1]) + done.stderr


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup_cases")
    write_dataset(root, cases=2, seed=0, shape=(24, 20, 4), spacing=(1.6, 1.6, 4.0))
    return root


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--help"], "subcommands:"),
        (["fitt"], "invalid choice: 'fitt'"),
        (["synth", "--help"], "usage: la-seg synth"),
        (["synth", "--outt", "x"], "did you mean --out?"),
        (["fit", "--config", "demo.yaml", "--data.rooot", "x"], "did you mean --data.root?"),
        (["predict", "--trainer.devics", "2"], "did you mean --trainer.devices?"),
        (["synth", "--out", "data", "--cases", "1", "--shape", "[24, 20, 4]"], "Wrote 1 synthetic cases"),
    ],
)  # fmt: skip
def test_help_typos_and_synth_load_neither_torch_nor_lightning(tmp_path, argv, says):
    loaded, output = loaded_by(argv, tmp_path)
    assert says in output
    assert loaded == set(), f"la-seg {' '.join(argv)} loaded {sorted(loaded)}"


def test_evaluate_and_export_answer_without_the_model_stack(tmp_path, cases):
    """They need torch for their work, never Lightning, timm or MONAI's networks for their help, a typo or a
    refused output folder."""
    for argv, says in (
        (["evaluate", "--help"], "usage: la-seg evaluate"),
        (["evaluate", "--pred", str(cases), "--reff", str(cases)], "did you mean --ref?"),
        (["export-nnunet", "--help"], "usage: la-seg export-nnunet"),
        (["export-nnunet", "--data.root", str(cases), "--out", str(cases)], "never writes into its input"),
    ):
        loaded, output = loaded_by(argv, tmp_path)
        assert says in output
        assert not loaded & MODEL_STACK, f"la-seg {' '.join(argv)} loaded {sorted(loaded & MODEL_STACK)}"


def test_predict_refuses_writing_into_its_input_before_reading_the_checkpoint(tmp_path, cases, capsys):
    """The output folder is checked first (the checkpoint named does not even exist): typed, before Lightning
    loads (a fresh process); from a config file, once the parser has read it (in this process)."""
    argv = ["predict", "--config", "demo.yaml", "--ckpt_path", str(tmp_path / "missing.ckpt")]
    typed = ["--data.predict_root", str(cases), "--writer.output_dir", str(cases / "masks")]
    loaded, said = loaded_by([*argv, *typed], tmp_path)
    paths = {"data": {"predict_root": str(cases)}, "writer": {"output_dir": str(cases / "masks")}}
    (tmp_path / "paths.yaml").write_text(json.dumps(paths))
    with pytest.raises(SystemExit):
        main([*argv, "--config", str(tmp_path / "paths.yaml")])
    for output in (said, capsys.readouterr().err):
        assert "--writer.output_dir" in output and "never writes into its input" in output
        assert "missing.ckpt" not in output
    assert "lightning" not in loaded


def test_predict_loads_neither_monai_nor_the_training_augmentation(tmp_path, cases):
    """What only training needs stays unloaded in predict: MONAI (the loss; the largest component is
    scipy's) and albumentations (even as a type, which jsonargparse would import)."""
    argv = ["predict", "--config", "demo.yaml", "--untrained", "true", "--data.predict_root", str(cases)]
    argv += ["--writer.output_dir", str(tmp_path / "masks"), "--data.num_workers", "0"]
    loaded, said = loaded_by(argv, tmp_path)
    assert (tmp_path / "masks" / "volumes.csv").is_file(), said
    assert not loaded & {"monai", "albumentations"}, f"predict loaded {sorted(loaded)}"


def test_the_benchmark_times_the_first_line_apart_from_the_exit(load_benchmark, tmp_path):
    """benchmarks/startup.py --commands: the first line (stderr counts) is timed apart from the exit."""
    timed = load_benchmark("startup").timed
    script = "import sys, time; print('first', file=sys.stderr, flush=True); time.sleep(1.0); print('last')"
    result = timed([sys.executable, "-c", script], tmp_path, dict(os.environ))
    assert result["first_line"] == "first" and result["output_tail"] == "last" and result["status"] == 0
    assert result["exit_s"] - result["first_line_s"] >= 0.9


def test_analyse_in_a_fresh_process_loads_no_lightning(cases, tmp_path):
    """A command's own imports, first in a fresh interpreter: the circle qc -> callbacks -> metrics -> qc
    broke `la-seg analyse` while every in-process test, with the callbacks imported earlier, passed."""
    loaded, said = loaded_by(
        ["analyse", "--images", str(cases), "--out", str(tmp_path / "a"), "--blood_pool.erosion_mm", "0.5",
         "--blood_pool.min_voxels", "1", "--plausibility.min_volume_ml", "0"],
        tmp_path,
    )  # fmt: skip
    assert "la-seg: error" not in said, said
    assert (tmp_path / "a" / "analysis.csv").is_file(), said
    assert not loaded & {"lightning", "timm"}, f"analyse loaded {sorted(loaded)}"
