"""Checkpoints are data and carry their run's network settings; every failure is one `la-seg: error:` line."""

import dataclasses
import errno
import os
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from test_cli import TINY  # noqa: I001 (tests/ is on sys.path under pytest)

from la_seg import checkpoint_rule
from la_seg.checkpoints import DATAMODULE_KEY, DataOnlyCheckpointIO, load_checkpoint, trained_data
from la_seg.cli import main
from la_seg.errors import DataError, describe_error
from la_seg.lightning_cli import LASegCLI
from la_seg.models.segmenter import SegmenterConfig
from la_seg.module import LASegModule
from la_seg.runs import find_checkpoint

# The network TINY (demo.yaml and its overrides) builds, as a module would record it.
TINY_NET = SegmenterConfig(
    backbone="vit_small_patch14_dinov2",
    pretrained=False,
    img_size=56,
    trainable_blocks=-1,
    backbone_kwargs={"depth": 4, "embed_dim": 32, "num_heads": 2},
    decoder_channels=[16, 16, 8, 8],
    stem_channels=8,
)


AS_DEMO = {"in_plane": "spacing", "target_spacing": 4.0}  # TINY's input settings (demo.yaml's field of view)


def save(module: LASegModule, path: Path) -> Path:
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="session")  # built once per test process, whatever the order
def context_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the TINY network trained (here: initialised) with 2.5D slice context."""
    torch.manual_seed(0)
    return save(
        LASegModule(net=TINY_NET, slice_context=True, **AS_DEMO), tmp_path_factory.mktemp("ckpt") / "ctx.ckpt"
    )


class Instantiated(BaseException):
    """Stops the CLI once its classes exist (main handles Exceptions only)."""


def built_by(monkeypatch, argv: list[str]) -> LASegCLI:
    """The CLI object `argv` builds, stopped before the subcommand runs."""

    def stop(self):
        raise Instantiated(self)

    monkeypatch.setattr(LASegCLI, "after_instantiate_classes", stop)
    with pytest.raises(Instantiated) as stopped:
        main(argv)
    return stopped.value.args[0]


def one_error_line(capsys, argv: list[str]) -> str:
    """Run main, expect exit 2 and exactly one `la-seg: error:` line on stderr; return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("la-seg: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(lines), lines
    return errors[0]


def test_network_settings_come_from_the_checkpoint(monkeypatch, synth_root, context_ckpt):
    common = ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", str(context_ckpt)]
    built = built_by(monkeypatch, [*common, "--model.threshold", "0.7", "--model.postprocess", "none"])
    model = built.model
    assert (
        model.hparams.slice_context and built.datamodule.input_spec.slice_context
    )  # trained 2.5D, not in the config
    assert model.hparams.threshold == 0.7 and model.hparams.postprocess == "none"  # inference choices apply
    assert model.inference_settings()["threshold"] == 0.7
    assert isinstance(built.trainer.strategy.checkpoint_io, DataOnlyCheckpointIO)


@pytest.mark.parametrize(
    ("option", "value", "trained"),
    [("--data.slice_context", "false", "True"), ("--data.img_size", "70", "56"),
     ("--model.net.fusion_groups", "4", "1")],
)  # fmt: skip
def test_a_contradicting_setting_is_an_error(capsys, synth_root, context_ckpt, option, value, trained):
    argv = ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", str(context_ckpt), option, value]
    line = one_error_line(capsys, argv)
    assert option[2:] in line and str(context_ckpt) in line and trained in line


def test_a_stretching_checkpoint_ignores_a_configured_target_spacing(monkeypatch, tmp_path, synth_root):
    """Slices are resized as the checkpoint was trained; a stretching one never used a target spacing, so a
    config's (the paper configs say 0.9 mm) does not contradict it, and a config's `in_plane: spacing` (the
    code default) is not a choice against it either. in_plane typed on the command line is."""
    stretched = save(LASegModule(net=TINY_NET, in_plane="stretch"), tmp_path / "stretch.ckpt")
    common = ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", str(stretched)]
    for extra in (["--data.in_plane", "stretch", "--data.target_spacing", "0.9"], []):  # demo.yaml: spacing
        built = built_by(monkeypatch, [*common, *extra])
        assert built.datamodule.input_spec.in_plane == built.model.hparams.in_plane == "stretch"
        monkeypatch.undo()
    with pytest.raises(SystemExit):
        main([*common, "--data.in_plane", "spacing"])


def test_a_checkpoint_from_before_the_headroom_is_normalised_with_the_old_clip(
    monkeypatch, tmp_path, synth_root, context_ckpt
):
    """Checkpoints written before data.intensity_headroom existed were trained on volumes clipped at the
    99.5th percentile: test, predict and load_from_checkpoint use 1.0 for them, not the default 1.5."""
    checkpoint = torch.load(context_ckpt, weights_only=True)
    assert checkpoint["hyper_parameters"].pop("intensity_headroom") == 1.5
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    built = built_by(monkeypatch, ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", str(old)])
    assert built.datamodule.input_spec.intensity_headroom == built.model.hparams.intensity_headroom == 1.0
    assert LASegModule.load_from_checkpoint(old).hparams.intensity_headroom == 1.0


def write_marker(path: str) -> None:
    Path(path).write_text("code ran")


class Trap:
    """Unpickling this object runs write_marker: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return write_marker, (str(self.marker),)


def test_a_checkpoint_with_pickled_code_is_refused(capsys, tmp_path, synth_root, context_ckpt):
    marker = tmp_path / "marker"
    checkpoint = torch.load(context_ckpt, weights_only=True)
    checkpoint["hyper_parameters"]["trap"] = Trap(marker)
    evil = tmp_path / "evil.ckpt"
    torch.save(checkpoint, evil)
    argv = ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", str(evil)]
    line = one_error_line(capsys, argv)
    assert str(evil) in line and "pickled" in line
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the trap is real: loading it as Lightning used to runs the code
    assert marker.read_text() == "code ran"


def bad_files(tmp_path: Path, good: Path) -> dict[str, Path]:
    data = good.read_bytes()
    files = {
        "empty": tmp_path / "empty.ckpt",
        "truncated": tmp_path / "cut.ckpt",
        "text": tmp_path / "a.ckpt",
    }
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["text"].write_text("not a checkpoint\n")
    files["directory"] = tmp_path / "dir.ckpt"
    files["directory"].mkdir()
    files["tensors"] = tmp_path / "tensors.ckpt"
    torch.save({"weight": torch.zeros(2)}, files["tensors"])
    files["missing"] = tmp_path / "missing.ckpt"
    return files


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "directory", "tensors", "missing"])
def test_a_bad_checkpoint_file_is_one_line(capsys, tmp_path, synth_root, context_ckpt, kind):
    path = bad_files(tmp_path, context_ckpt)[kind]
    for subcommand in ("test", "fit"):
        line = one_error_line(
            capsys, [subcommand, *TINY, "--data.root", str(synth_root), "--ckpt_path", str(path)]
        )
        assert str(path) in line


def test_a_checkpoint_of_another_model_size_is_one_line(capsys, tmp_path, synth_root):
    bigger = dataclasses.replace(TINY_NET, decoder_channels=[32, 16, 8, 8])
    checkpoint = torch.load(
        save(LASegModule(net=bigger, **AS_DEMO), tmp_path / "big.ckpt"), weights_only=True
    )
    checkpoint["hyper_parameters"]["net"]["decoder_channels"] = [16, 16, 8, 8]  # settings that lie
    mislabelled = tmp_path / "mislabelled.ckpt"
    torch.save(checkpoint, mislabelled)
    argv = ["predict", *TINY, "--ckpt_path", str(mislabelled), "--data.predict_root", str(synth_root),
            "--writer.output_dir", str(tmp_path / "out")]  # fmt: skip
    line = one_error_line(capsys, argv)
    assert str(mislabelled) in line and "shape" in line


def test_a_changed_backbone_weights_file_is_one_line(capsys, tmp_path, synth_root):
    weights = tmp_path / "vit.pth"

    def write_weights(seed):
        torch.manual_seed(seed)
        vit = timm.create_model(TINY_NET.backbone, img_size=56, num_classes=0, **TINY_NET.backbone_kwargs)
        torch.save(vit.state_dict(), weights)

    write_weights(1)
    frozen = dataclasses.replace(TINY_NET, weights=str(weights), trainable_blocks=0)
    lean = save(LASegModule(net=frozen, **AS_DEMO), tmp_path / "lean.ckpt")
    write_weights(2)
    argv = ["test", *TINY, "--model.net.trainable_blocks", "0", "--data.root", str(synth_root),
            "--ckpt_path", str(lean)]  # fmt: skip
    line = one_error_line(capsys, argv)
    assert "fingerprint" in line and str(lean) in line and "model.net.weights" in line


def test_evaluation_without_a_checkpoint_is_refused(capsys, synth_root):
    line = one_error_line(capsys, ["validate", *TINY, "--data.root", str(synth_root)])
    assert "--ckpt_path" in line and "--untrained" in line


def test_best_without_a_run_names_where_it_looked(capsys, tmp_path, monkeypatch, synth_root):
    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", "best"])
    assert "runs/demo/version_*/checkpoints" in line


def test_best_is_the_highest_version_not_the_newest_file(tmp_path):
    for version in ("version_2", "version_10", "version_x", "old"):
        (tmp_path / version / "checkpoints").mkdir(parents=True)
        (tmp_path / version / "checkpoints" / "best.ckpt").write_bytes(b"")
    os.utime(tmp_path / "version_2" / "checkpoints" / "best.ckpt", (4e9, 4e9))  # touched last
    assert find_checkpoint(tmp_path, "best") == tmp_path / "version_10" / "checkpoints" / "best.ckpt"
    assert find_checkpoint(tmp_path, "last") is None


def test_model_config_errors_name_the_option(capsys, synth_root):
    line = one_error_line(capsys, ["fit", *TINY, "--data.root", str(synth_root), "--data.img_size", "50"])
    assert "data.img_size" in line and "50" in line


def test_argument_errors_are_one_line(capsys):
    line = one_error_line(capsys, ["fit", "--config", "demo.yaml", "--model.loss", "focal"])
    assert "model.loss" in line


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (PermissionError(errno.EACCES, "Permission denied", "runs/x.ckpt"), "permission denied: runs/x.ckpt"),
        (OSError(errno.ENOSPC, "No space left on device", "runs/x.ckpt"), "no space left on device while"),
        (KeyError("net"), "LA_SEG_DEBUG=1"),
    ],
)  # fmt: skip
def test_system_errors_are_one_line(capsys, monkeypatch, synth_root, context_ckpt, error, expected):
    def fail(path):
        raise error

    monkeypatch.setattr(checkpoint_rule, "load_checkpoint", fail)
    line = one_error_line(
        capsys, ["test", *TINY, "--data.root", str(synth_root), "--ckpt_path", str(context_ckpt)]
    )
    assert expected in line


def test_debug_shows_the_traceback(monkeypatch, synth_root):
    monkeypatch.setenv("LA_SEG_DEBUG", "1")
    with pytest.raises(DataError, match="ckpt_path"):
        main(["test", *TINY, "--data.root", str(synth_root)])


class FailingDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise DataError("case train_1: enhanced.nii.gz is truncated")


def test_a_dataloader_worker_error_is_unwrapped():
    loader = torch.utils.data.DataLoader(FailingDataset(), num_workers=1)
    with pytest.raises(DataError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)  # torch re-raises with the worker's traceback as the message
    assert describe_error(caught.value) == "case train_1: enhanced.nii.gz is truncated"


def test_loaded_once_as_data(context_ckpt, monkeypatch):
    calls = []
    real_load = torch.load
    monkeypatch.setattr(
        torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real_load(*a, **k)
    )
    module = LASegModule.load_from_checkpoint(context_ckpt)
    assert calls == [True] and module.hparams.slice_context
    assert load_checkpoint(context_ckpt)["hyper_parameters"]["slice_context"] is True


def test_trained_data_is_the_recorded_folders(tmp_path):
    def checkpoint(**recorded) -> dict:
        return {DATAMODULE_KEY: {"split": {"train": ["a"], **recorded}}, "la_seg_loaded_from": "x.ckpt"}

    assert trained_data(checkpoint()) == {}  # written before la-seg recorded its folders
    assert trained_data(checkpoint(root=str(tmp_path))) == {"root": str(tmp_path), "test_root": None}
    with pytest.raises(DataError, match=r"x\.ckpt was trained on data\.test_root .*gone.*--data\.test_root"):
        trained_data(checkpoint(root=str(tmp_path), test_root=str(tmp_path / "gone")))
