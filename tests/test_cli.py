"""End-to-end: the `la-seg` command on small synthetic data (fit, resume, test report, predict, DDP)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from la_seg.cli import main
from la_seg.config_file import CONFIG_DIR, resolve_config_paths
from la_seg.fit_summary import replayed_options

SHIPPED = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
ABLATIONS = sorted(f"ablations/{p.name}" for p in (CONFIG_DIR / "ablations").glob("*.yaml"))

TINY = [
    "--config", "demo.yaml",
    "--data.img_size", "56",
    "--data.num_workers", "0",
    "--data.batch_size", "8",
    "--model.net.backbone_kwargs", "{depth: 4, embed_dim: 32, num_heads: 2}",
    "--model.net.decoder_channels", "[16, 16, 8, 8]",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "img_size" not in printed["model"]["net"]  # linked from data.img_size, not repeated
    if config != "demo.yaml":
        size = config[:-5].removeprefix("dinov3_")
        expected = {"huge": "huge_plus"}.get(size, size)
        family = "patch16_dinov3" if config.startswith("dinov3_") else "patch14_dinov2"
        assert printed["model"]["net"]["backbone"] == f"vit_{expected}_{family}"
        assert printed["model"]["net"]["fusion_groups"] == 1  # the paper: one softmax over all blocks
        assert printed["trainer"]["precision"] == "bf16-mixed" and printed["data"]["img_size"] == 448


@pytest.mark.parametrize("overlay", ABLATIONS)
def test_ablation_overlays_change_the_paper_config(overlay, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "giant.yaml", "--config", overlay, "--print_config"])
    net = yaml.safe_load(capsys.readouterr().out)["model"]["net"]
    paper = (net["fusion"], net["image_guidance"], net["fusion_groups"], net["stem_channels"])
    assert paper != ("softmax", True, 1, 16)


def test_config_names_resolve_to_shipped_files(tmp_path):
    local = tmp_path / "mine.yaml"
    local.write_text("{}")
    resolved = resolve_config_paths(
        ["fit", "--config", "giant.yaml", f"--config={local}", "--config", "base"]
    )
    assert resolved[2] == str(CONFIG_DIR / "giant.yaml")
    assert resolved[3] == f"--config={local}"
    assert resolved[5] == str(CONFIG_DIR / "base.yaml")


def test_the_next_command_repeats_configs_data_and_network_options_as_typed():
    fit = ["fit", "--config", "demo.yaml", "--config=mine.yaml", "--data.root", "my data", "--data.fold=2",
           "--model.net.decoder_channels", "[8, 8]", "--model.lr", "0.1",
           "--trainer.max_epochs", "1"]  # fmt: skip
    assert replayed_options(fit) == [
        "--config", "demo.yaml", "--config=mine.yaml", "--data.root", "my data", "--data.fold=2",
        "--model.net.decoder_channels", "[8, 8]",
    ]  # fmt: skip


@pytest.fixture
def workdir(tmp_path, monkeypatch, synth_root):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def read_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # everything la-seg writes is plain data


@pytest.mark.slow
def test_fit_resume_test_and_predict(workdir, synth_root):
    data = ["--data.root", str(synth_root)]
    bias_field = ["--data.augmentation.bias_field", "true"]  # off in the shipped configs: run it end to end
    main(["fit", *TINY, *data, *bias_field, "--trainer.max_epochs", "1"])
    run = workdir / "runs" / "demo" / "version_0"
    assert {"config.yaml", "split.json", "hparams.yaml"} <= {p.name for p in run.iterdir()}
    assert "bias_field: true" in (run / "config.yaml").read_text()
    first_steps = read_ckpt(run / "checkpoints" / "last.ckpt")["global_step"]
    split = json.loads((run / "split.json").read_text())
    events = EventAccumulator(str(run))
    events.Reload()
    assert {"val/dice", "val/iou", "val/dice_slice", "fusion/group0/block0"} <= set(events.Tags()["scalars"])
    assert {"val/slices", "fusion/weights"} <= set(events.Tags()["images"])

    # resume where it stopped: same run folder, the epoch counter goes on
    main(["fit", *TINY, *data, *bias_field, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    assert sorted(p.name for p in (workdir / "runs" / "demo").iterdir()) == ["version_0"]
    assert read_ckpt(run / "checkpoints" / "last.ckpt")["global_step"] == 2 * first_steps
    events = EventAccumulator(str(run))
    events.Reload()
    assert len(events.Scalars("val/dice")) == 2  # one validation per epoch: epoch 0 was not run again
    # val/dice smoothed over epochs (what best.ckpt is chosen by), carried through the resume
    dice = [event.value for event in events.Scalars("val/dice")]
    ema = [event.value for event in events.Scalars("val/dice_ema")]
    assert ema[0] == pytest.approx(dice[0], abs=1e-6)
    assert ema[1] == pytest.approx(ema[0] + 0.1 * (dice[1] - ema[0]), abs=1e-6)
    best_epoch = max(range(2), key=lambda epoch: (round(ema[epoch], 6), -epoch))  # a tie keeps the first
    assert read_ckpt(run / "checkpoints" / "best.ckpt")["epoch"] == best_epoch

    # test: that run's held-out cases, report beside the run
    main(["test", *TINY, *data, "--ckpt_path", "best"])
    with open(run / "test_heldout.csv") as handle:  # a plain table: one row per case
        rows = list(csv.DictReader(handle))
    assert [r["case_id"] for r in rows] == split["test"]
    report = json.loads((run / "test_heldout.json").read_text())
    assert set(report["cases"][0]) >= {"dice", "iou", "hd95_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml"}
    assert 0 <= report["summary"]["dice"]["mean"] <= 1
    assert (run / "config.yaml").exists() and (run / "config_test.yaml").exists()

    # predict: masks in the input's exact geometry, never over existing files
    out = workdir / "masks"
    predict = ["predict", *TINY, "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
               "--data.predict_root", str(synth_root), "--writer.output_dir", str(out)]  # fmt: skip
    main(predict)
    for case in sorted(synth_root.iterdir()):
        source = nib.load(case / "enhanced.nii.gz")
        mask = nib.load(out / f"{case.name}.nii.gz")
        assert mask.shape == source.shape
        assert np.array_equal(mask.affine, source.affine)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    with open(out / "volumes.csv") as handle:
        volumes = list(csv.DictReader(handle))
    assert len(volumes) == 6 and all(float(v["volume_ml"]) >= 0 for v in volumes)
    before = (out / "train_1.nii.gz").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        main(predict)
    assert exit_info.value.code == 2
    assert (out / "train_1.nii.gz").stat().st_mtime_ns == before
    main([*predict, "--writer.overwrite", "true"])

    with pytest.raises(SystemExit):  # never into the input folder
        main([*predict[:-1], str(synth_root / "masks")])
    assert not (synth_root / "masks").exists()


@pytest.mark.slow
def test_ddp_two_processes_fit_and_test(tmp_path, synth_root):
    """A real 2-process DDP run (gloo on CPU): training, validation and test must count each case once."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    la_seg = [sys.executable, "-m", "la_seg.cli"]
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    common = [*TINY, *ddp, "--data.root", str(synth_root), "--data.split", "[0.34, 0.16, 0.5]"]
    fit = subprocess.run([*la_seg, "fit", *common, "--trainer.max_epochs", "1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    test = subprocess.run([*la_seg, "test", *common, "--ckpt_path", "best"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert test.returncode == 0, test.stderr[-3000:]
    run = Path(tmp_path, "runs", "demo", "version_0")
    split = json.loads((run / "split.json").read_text())
    report = json.loads((run / "test_heldout.json").read_text())
    assert len(split["test"]) == 3  # odd: the ranks hold 2 and 1 cases (validation: 1 case, 2 ranks)
    assert [c["case_id"] for c in report["cases"]] == split["test"]


@pytest.mark.slow
def test_every_subcommand_runs_in_mixed_precision(workdir, synth_root, capsys):
    """bf16-mixed on CPU under the conftest guard that refuses what CUDA autocast refuses (the GPU crash)."""
    common = [*TINY, "--trainer.precision", "bf16-mixed"]
    data = ["--data.root", str(synth_root)]
    main(["fit", *common, *data, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"])
    best = workdir / "runs" / "demo" / "version_0" / "checkpoints" / "best.ckpt"
    assert read_ckpt(best)["hyper_parameters"]["net"]["img_size"] == 56
    main(["validate", *common, *data, "--ckpt_path", "last"])
    main(["test", *common, *data, "--ckpt_path", "best"])
    assert (
        f"--ckpt_path best: using {Path('runs/demo/version_0/checkpoints/best.ckpt')}"
        in capsys.readouterr().err
    )
    out = workdir / "masks"
    main(["predict", *common, "--ckpt_path", str(best), "--data.predict_root", str(synth_root),
          "--writer.output_dir", str(out)])  # fmt: skip
    assert len(list(out.glob("*.nii.gz"))) == 6


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "--config", "demo.yaml", "--trainer.max_epoch", "1"], "did you mean --trainer.max_epochs?"),
        (["test", "--config", "demo.yaml", "--data.rooot", "x"], "did you mean --data.root?"),
        (["synth", "--outt", "x"], "did you mean --out?"),
        (["evaluate", "--pred", "x", "--reff", "y"], "did you mean --ref?"),
        (["evaluate", "--pred", "missing_masks", "--ref", "."], "--pred missing_masks does not exist"),
    ],
)
def test_abbreviations_and_typos_are_refused_naming_the_nearest_option(argv, message, capsys, workdir):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("la-seg: error: ") and line.endswith(message)


@pytest.mark.parametrize("command", ["synth", "evaluate", "export-nnunet"])
def test_usage_lines_name_the_subcommand(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert capsys.readouterr().out.startswith(f"usage: la-seg {command} ")


def test_help_lists_every_subcommand_and_each_subcommand_has_its_own(capsys):
    """Only the subcommand being run gets a parser (start-up time); help still shows them all, one whole
    sentence each."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    every = ("fit", "validate", "test", "predict", "synth", "evaluate", "export-nnunet", "analyse")
    assert out.startswith(f"usage: la-seg {{{','.join(every)}}} ...")
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert list(lines) == list(every)
    assert all(line.endswith(".") and len(line) <= 100 for line in lines.values())
    for command in ("fit", "validate", "test", "predict"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        assert out.startswith(f"usage: la-seg [options] {command} ") and "--trainer.max_epochs" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == 2
    choices = f"(choose from {str(every)[1:-1]})"
    assert f"invalid choice: 'fitt' {choices}" in capsys.readouterr().err
