"""`la-seg`: LightningCLI for fit / validate / test / predict, and `la-seg synth` for phantom data."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import os
import re
import sys
from pathlib import Path

import yaml
from jsonargparse import CLI, ArgumentError
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from la_seg.callbacks import (
    InferenceCalibration,
    NiftiPredictionWriter,
    SegmentationMetrics,
    TensorBoardImages,
)
from la_seg.checkpoints import (
    CALIBRATED_FIELDS,
    INPUT_DEFAULTS,
    NETWORK_FIELDS,
    DataOnlyCheckpointIO,
    check_settings,
    find_run_checkpoint,
    holds_backbone,
    load_checkpoint,
    network_settings,
    stored_calibration,
)
from la_seg.data.datamodule import LADataModule
from la_seg.data.preprocess import check_img_size
from la_seg.errors import DataError
from la_seg.models.segmenter import SegmenterConfig
from la_seg.module import LASegModule, load_member
from la_seg.runtime import apply_cpu_precision, configure_threads

CONFIG_DIR = Path(__file__).parent / "configs"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class LASegCLI(LightningCLI):
    """Links arguments that must agree, adds the callbacks every run needs, and applies the checkpoint rule:
    a run's network settings come from its checkpoint, read once and as data only (la_seg/checkpoints.py)."""

    def __init__(self, *args, args_list: list[str] | None = None, **kwargs) -> None:
        typed = args_list if args_list is not None else kwargs.get("args")
        # The options as typed, to tell explicit ones from config-file values (run=False callers pass `args`).
        self.given_options = list(typed) if isinstance(typed, list) else []
        self.preloaded: dict[str, dict] = {}
        # test / predict: every ensemble member's checkpoint, the first included
        self.member_paths: list[str] = []
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.img_size", "model.net.img_size")
        parser.link_arguments("data.slice_context", "model.slice_context")
        for field in INPUT_DEFAULTS:  # how slices are resized: the data module's setting, the model's record
            parser.link_arguments(f"data.{field}", f"model.{field}")
        parser.add_lightning_class_args(SegmentationMetrics, "metrics")
        parser.add_lightning_class_args(TensorBoardImages, "images")
        parser.add_lightning_class_args(NiftiPredictionWriter, "writer")
        parser.add_lightning_class_args(InferenceCalibration, "calibration")
        parser.add_argument(
            "--untrained",
            type=bool,
            default=False,
            help="validate / test / predict without --ckpt_path on purpose (untrained weights: smoke tests)",
        )

    def _parse_ckpt_path(self) -> None:
        """Off: Lightning would overlay the checkpoint's hyper-parameters on the config (silently undoing e.g.
        --model.threshold); before_instantiate_classes applies la-seg's rule to any --ckpt_path instead."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        apply_cpu_precision(config.trainer, self.given_options)
        try:
            check_img_size(config.data.img_size)
        except DataError as error:
            raise DataError(f"data.img_size: {error}") from None
        if self.subcommand == "predict":  # the writer writes each case; holding all outputs only costs memory
            config.return_predictions = False
        ckpt = config.get("ckpt_path")
        if not ckpt:
            if self.subcommand in ("validate", "test", "predict") and not config.untrained:
                raise DataError(
                    f"{self.subcommand} needs --ckpt_path (a checkpoint file, or best / last of the "
                    "configured run): without one the model's weights are untrained; pass --untrained true "
                    "to do it anyway"
                )
            return
        run_dir = _logger_run_dir(config)
        members = checkpoint_list(str(ckpt))
        if len(members) > 1 or members[0] != str(ckpt):
            if self.subcommand in ("fit", "validate"):
                raise DataError(
                    f"--ckpt_path {ckpt}: {self.subcommand} takes a single checkpoint file (or best / last); "
                    "several checkpoints (a list or a folder of runs) are an ensemble, for test and predict"
                )
            chosen = f"ensemble of {', '.join(members)}" if len(members) > 1 else f"using {members[0]}"
            print(f"la-seg: --ckpt_path {ckpt}: {chosen}", file=sys.stderr)
            config.ckpt_path = ckpt = members[0]
            if len(members) > 1 and run_dir is not None:  # not into one fold's run, nor a new version_*
                config.trainer.logger.init_args.version = "ensemble"
        if ckpt in ("last", "best"):
            found = find_run_checkpoint(run_dir, ckpt) if run_dir is not None else None
            if found is None and self.subcommand == "fit":
                return  # nothing to resume yet: Lightning starts afresh
            if found is None:
                where = f"{run_dir}/version_*/checkpoints" if run_dir else "(no logger save_dir configured)"
                raise DataError(f"--ckpt_path {ckpt}: no {ckpt}.ckpt under {where}")
            print(f"la-seg: --ckpt_path {ckpt}: using {found}", file=sys.stderr)
            config.ckpt_path = ckpt = str(found)
        self.member_paths = [str(ckpt), *members[1:]]
        checkpoint = load_checkpoint(ckpt)
        self.preloaded[str(ckpt)] = checkpoint
        if len(self.member_paths) < 2:
            _continue_run_of(config, Path(ckpt), run_dir)
        apply_checkpoint_settings(config, checkpoint, self.given_options)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if type(self.trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            self.trainer.strategy.checkpoint_io = DataOnlyCheckpointIO(self.preloaded)
        if self.member_paths:
            self.model.member_name = self.member_paths[0]
            weights = self.config[self.subcommand].model.net.weights
            for path in self.member_paths[1:]:
                self.model.add_member(load_member(path, weights))


def checkpoint_list(ckpt: str) -> list[str]:
    """The checkpoint files that `--ckpt_path` names: a YAML/JSON list of files, a folder of fold runs (each
    `version_*/checkpoints/best.ckpt`, or the folder's own `checkpoints/best.ckpt`), or else `ckpt` itself
    (a file, best or last)."""
    if ckpt.lstrip().startswith("["):
        try:
            listed = yaml.safe_load(ckpt)
        except yaml.YAMLError as error:
            raise DataError(f"--ckpt_path {ckpt}: not a valid list ({error.problem})") from None
        if not listed or not all(isinstance(item, str) for item in listed):
            raise DataError(f"--ckpt_path {ckpt}: expected a non-empty list of checkpoint files")
        for item in listed:
            if not Path(item).is_file():
                raise DataError(f"--ckpt_path: checkpoint {item} in the list does not exist")
        return listed
    if Path(ckpt).is_dir():
        return [str(path) for path in run_folder_checkpoints(Path(ckpt))]
    return [ckpt]


def run_folder_checkpoints(folder: Path) -> list[Path]:
    """Each fold run's best.ckpt in `folder` (its `version_*` folders that hold a `checkpoints` folder, by
    number), or the folder's own checkpoints/best.ckpt when it is one run's version folder."""
    if (folder / "checkpoints").is_dir():
        runs = [folder]
    else:
        versions = [p for p in folder.glob("version_*") if re.fullmatch(r"version_\d+", p.name)]
        runs = sorted((p for p in versions if (p / "checkpoints").is_dir()), key=lambda p: int(p.name[8:]))
    if not runs:
        raise DataError(
            f"--ckpt_path {folder}: the folder holds no fold runs (no version_*/checkpoints folders, nor a "
            "checkpoints folder of its own); pass a checkpoint file, a list of files, or a run folder"
        )
    missing = [run for run in runs if not (run / "checkpoints" / "best.ckpt").is_file()]
    if missing:
        raise DataError(
            f"--ckpt_path {folder}: {missing[0] / 'checkpoints'} has no best.ckpt (was that run's training "
            'interrupted?); list the checkpoints to use instead, e.g. --ckpt_path "[a.ckpt, b.ckpt]"'
        )
    return [run / "checkpoints" / "best.ckpt" for run in runs]


def apply_checkpoint_settings(config, checkpoint: dict, given_options: list[str]) -> None:
    """Build the network the checkpoint was trained with; a given setting that contradicts it is an error.

    A setting counts as given when it differs from its default or its option is on the command line.
    """
    net = config.model.net
    options = {field: f"model.net.{field}" for field in NETWORK_FIELDS}
    options |= {"img_size": "data.img_size", "slice_context": "data.slice_context"}
    options |= {field: f"data.{field}" for field in INPUT_DEFAULTS}
    values = {field: net.get(field) for field in NETWORK_FIELDS}
    values |= {"img_size": config.data.img_size, "slice_context": config.data.slice_context}
    values |= {field: config.data[field] for field in INPUT_DEFAULTS}
    defaults = {f.name: _default(f) for f in dataclasses.fields(SegmenterConfig)}
    defaults |= {name: p.default for name, p in inspect.signature(LADataModule).parameters.items()}
    given = {}
    for field, option in options.items():
        on_command_line = any(arg == f"--{option}" or arg.startswith(f"--{option}=") for arg in given_options)
        given[field] = (option, values[field], _NOT_A_DEFAULT if on_command_line else defaults[field])
    if network_settings(checkpoint)["in_plane"] == "stretch":  # a stretching checkpoint has no target spacing
        del given["target_spacing"]
    settings = check_settings(checkpoint, given)
    for field in NETWORK_FIELDS:
        net[field] = settings.get(field, net.get(field))
    config.data.img_size = net.img_size = settings.get("img_size", config.data.img_size)
    config.data.slice_context = settings["slice_context"]
    config.model.slice_context = settings["slice_context"]
    for field in INPUT_DEFAULTS:
        config.data[field] = config.model[field] = settings[field]
    apply_calibration(config, checkpoint, given_options)
    record = checkpoint.get("backbone", {})
    if holds_backbone(checkpoint):  # the weights come from the checkpoint: no download, no weights file
        net.pretrained, net.weights = False, None
    else:  # a lean checkpoint: the recorded source, or the weights file's new location (--model.net.weights)
        net.pretrained = record.get("pretrained", net.pretrained)
        net.weights = net.weights or record.get("weights")


def apply_calibration(config, checkpoint: dict, given_options: list[str]) -> None:
    """The inference settings the checkpoint's fit chose on its validation cases replace the config's, except
    those given on the command line (--model.threshold, --model.postprocess, --model.review_below)."""
    calibration = stored_calibration(checkpoint)
    if calibration is None:
        return
    applied = {}
    for field, value in calibration["settings"].items():
        option = f"--model.{field}"
        if field in CALIBRATED_FIELDS and not any(
            a == option or a.startswith(f"{option}=") for a in given_options
        ):
            config.model[field] = applied[field] = value
    if applied:
        chosen = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in applied.items())
        print(f"la-seg: inference settings chosen on validation at the end of fit: {chosen}", file=sys.stderr)


_NOT_A_DEFAULT = object()


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def _logger_run_dir(config) -> Path | None:
    """`<save_dir>/<name>` of a configured TensorBoard/CSV logger, where its `version_*` folders go."""
    logger = config.trainer.get("logger")
    args = getattr(logger, "init_args", None)
    if args is None or args.get("save_dir") is None:
        return None
    return Path(args.save_dir) / (args.get("name") or "lightning_logs")


def _continue_run_of(config, ckpt: Path, run_dir: Path | None) -> None:
    """Log into the run that wrote `ckpt` (resume continues its curves; the test report lands beside it)."""
    version_dir = ckpt.resolve().parent.parent
    if run_dir is None or ckpt.parent.name != "checkpoints" or version_dir.parent != run_dir.resolve():
        return
    config.trainer.logger.init_args.version = version_dir.name


def resolve_config_paths(argv: list[str]) -> list[str]:
    """`--config giant.yaml` that is not a file is looked up among the configs shipped with la-seg."""
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        if arg == "--config" and i + 1 < len(resolved):
            resolved[i + 1] = _shipped_config(resolved[i + 1])
        elif arg.startswith("--config="):
            resolved[i] = "--config=" + _shipped_config(arg.split("=", 1)[1])
    return resolved


def _shipped_config(name: str) -> str:
    for candidate in (Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            _check_yaml(candidate)
            return str(candidate)
    return name


def _check_yaml(path: Path) -> None:
    """A config that is not valid YAML: name the file and the place (jsonargparse names neither)."""
    try:
        yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise DataError(f"config {path} is not valid YAML{where}: {problem}") from None


def synth(
    out: Path,
    cases: int = 12,
    seed: int = 0,
    shape: tuple[int, int, int] = (160, 160, 40),
    spacing: tuple[float, float, float] = (0.625, 0.625, 2.5),
) -> None:
    """Write a LAScarQS-task-2-style tree of synthetic LGE-like volumes (LA label 420).

    Args:
        out: folder to create; gets out/train_1 .. out/train_N.
        cases: number of cases.
        seed: random seed (same seed, same bytes).
        shape: volume shape (X, Y, Z), slices on the last axis.
        spacing: voxel spacing in mm.
    """
    from la_seg.data.synthetic import write_dataset  # only `synth` needs it

    folders = write_dataset(Path(out), cases, seed, shape=tuple(shape), spacing=tuple(spacing))
    print(f"Wrote {len(folders)} synthetic cases to {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; any failure ends with one `la-seg: error:` line and exit status 2 rather than a traceback
    (LA_SEG_DEBUG=1 shows the traceback)."""
    configure_threads()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        run(argv, from_command_line)
    except Exception as error:
        if os.environ.get("LA_SEG_DEBUG") == "1":
            raise
        print(f"la-seg: error: {describe_error(error)}", file=sys.stderr)
        raise SystemExit(2) from None


def run(argv: list[str], from_command_line: bool) -> None:
    """Parse `argv` and run its subcommand."""
    if argv and argv[0] == "synth":
        CLI(synth, args=argv[1:], as_positional=False, exit_on_error=False)
        return
    if argv and argv[0] in ("export-nnunet", "evaluate"):  # imported here: fit/test/predict never need them
        from la_seg.evaluate import evaluate
        from la_seg.nnunet import export_nnunet

        command = export_nnunet if argv[0] == "export-nnunet" else evaluate
        CLI(command, args=argv[1:], as_positional=False, exit_on_error=False)
        return
    argv = resolve_config_paths(argv)
    if from_command_line:  # DDP re-launches sys.argv: let it carry the resolved config paths
        sys.argv[1:] = argv
    subcommand = argv[0] if argv else ""
    LASegCLI(
        LASegModule,
        LADataModule,
        args=None if from_command_line else argv,
        args_list=argv,
        # A test or predict run logs into the folder of the run it evaluates: keep that run's config.yaml.
        save_config_kwargs={
            "overwrite": True,
            "config_filename": "config.yaml" if subcommand == "fit" else f"config_{subcommand}.yaml",
        },
        # Argument errors raise (main prints them as one line) instead of printing the whole usage.
        parser_kwargs={
            "description": "la-seg: left-atrium segmentation from LGE MRI with a DINOv2 encoder. "
            "Subcommands: fit, validate, test, predict (Lightning); `la-seg synth` (synthetic data), "
            "`la-seg export-nnunet` and `la-seg evaluate` (side by side with nnU-Net).",
            "exit_on_error": False,
            **{name: {"exit_on_error": False} for name in SUBCOMMANDS},
        },
    )


_EXPECTED = (DataError, ValueError, OSError, ArgumentError)  # bad input, bad options or values, files, disks
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Iteration): ")
_WORKER_HEADER = re.compile(r"Caught \w+ in DataLoader worker process \d+")


def describe_error(error: BaseException) -> str:
    """One line for `error`: unwrapped from a DataLoader worker's re-raise, with a hint for the unexpected."""
    message = str(error)
    if _WORKER_HEADER.search(message):  # torch re-raises the worker's error with its traceback as message
        lines = message.splitlines()
        starts = [i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line)]
        original = "\n".join(lines[starts[-1] :]) if starts else lines[-1]
        message = _EXCEPTION_LINE.sub("", original.strip(), count=1)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" while writing {error.filename}" if error.filename else ""
        message = f"no space left on device{where}: free some space and run again"
    elif isinstance(error, PermissionError):
        message = f"permission denied: {error.filename or message}"
    elif not isinstance(error, _EXPECTED):
        message = f"{type(error).__name__}: {message} (unexpected: LA_SEG_DEBUG=1 shows the traceback)"
    return " ".join(message.split())


if __name__ == "__main__":
    main()
