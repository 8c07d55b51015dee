"""`la-seg`: LightningCLI for fit / validate / test / predict, and `la-seg synth` for phantom data."""

from __future__ import annotations

import dataclasses
import difflib
import errno
import inspect
import json
import os
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml
from jsonargparse import CLI, ArgumentError
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from la_seg.atomic import FolderLock
from la_seg.callbacks import (
    InferenceCalibration,
    NiftiPredictionWriter,
    SegmentationMetrics,
    TensorBoardImages,
)
from la_seg.callbacks.layout import ChannelsLastDecoder
from la_seg.callbacks.termination import (
    SIGINT_STATUS,
    StopOnNonFiniteLoss,
    StopOnSigterm,
    sigterm_stop,
    stop_status,
)
from la_seg.checkpoints import (
    CALIBRATED_FIELDS,
    INPUT_DEFAULTS,
    NETWORK_FIELDS,
    DataOnlyCheckpointIO,
    SameCheckpointOnEveryRank,
    best_validation_dice,
    check_member_input,
    check_one_cross_validation,
    check_settings,
    checkpoint_list,
    find_run_checkpoint,
    legacy_orientation_note,
    load_checkpoint,
    network_settings,
    network_to_rebuild,
    stored_calibration,
    trained_data,
    training_augmentation,
)
from la_seg.data.datamodule import LADataModule
from la_seg.distributed import end_process_group, is_reported_elsewhere
from la_seg.errors import DataError, naming_options
from la_seg.inference import check_tta_trained
from la_seg.models.segmenter import SegmenterConfig
from la_seg.module import LASegModule, load_member
from la_seg.plausibility import low_dice_warning
from la_seg.runtime import apply_cpu_precision, configure_threads, on_command_line, quiet_lightning

CONFIG_DIR = Path(__file__).parent / "configs"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


# `la-seg --help`: one line each, la-seg's words (Lightning's docstrings are cut at their first line break)
OVERVIEW = {
    "fit": "Train a model on data.root's split; --ckpt_path last resumes an interrupted run.",
    "validate": "Score a checkpoint on its run's validation cases.",
    "test": "Score a checkpoint or an ensemble on the held-out cases: report, table and QC page.",
    "predict": "Segment new volumes with a checkpoint or an ensemble: masks and their volumes.csv.",
    "synth": "Write synthetic LAScarQS-style LGE volumes with LA labels (the demo's data).",
    "evaluate": "Score a folder of masks against reference labels (nnU-Net's or any other).",
    "export-nnunet": "Export a run's split as an nnU-Net dataset, for a side-by-side comparison.",
    "analyse": "LA surface with its wall IIR map, fibrosis share, Utah stage, LA size and shape.",
}


def overview() -> str:
    """`la-seg --help`: every subcommand, without building the four Lightning parsers (most of a start)."""
    width = max(map(len, OVERVIEW))
    lines = [
        f"usage: la-seg {{{','.join(OVERVIEW)}}} ...",
        "",
        "la-seg: left-atrium segmentation from LGE MRI with a DINOv2 encoder.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {text}" for name, text in OVERVIEW.items()),
        "",
        "`la-seg SUBCOMMAND --help` describes each.",
    ]
    return "\n".join(lines)


def parsed_subcommands(argv: list[str]) -> tuple[str, ...]:
    """The subcommands that get a parser: only the one being run, as each holds every Trainer, model and data
    argument and building all four took most of a command's start (0.3 of 0.45 s); all of them otherwise
    (a misspelt subcommand, `la-seg --config FILE --help`; a bare `la-seg --help` prints `overview`)."""
    return (argv[0],) if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS


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
        # sys.argv is what Lightning's DDP launcher runs again for the other ranks of this node
        self.relaunched_argv = kwargs.get("args") is None
        self.resolved_ckpt: tuple[str, str] | None = None  # (--ckpt_path as given, what it resolved to)
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        every = LightningCLI.subcommands()
        return {name: every[name] for name in parsed_subcommands(self.given_options)}

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

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse, then hold --ckpt_path back until `before_instantiate_classes`: given a checkpoint file,
        LightningCLI would overlay its hyper-parameters on the parsed config, silently undoing options the
        user typed (e.g. --model.threshold); `apply_checkpoint_rule` applies la-seg's one rule instead."""
        super().parse_arguments(parser, args)
        command = self.config.get("subcommand")
        self.held_ckpt_path = self.config[command].get("ckpt_path") if command else None
        if self.held_ckpt_path is not None:
            self.config[command].ckpt_path = None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if self.held_ckpt_path is not None:
            config.ckpt_path = self.held_ckpt_path
        apply_cpu_precision(config.trainer, self.given_options)
        self.apply_checkpoint_rule(config)  # best / last are found through the configured logger's folder
        if self.subcommand == "predict":  # the writer writes each case; holding all outputs only costs memory
            config.return_predictions = False
            config.trainer.logger = False  # nothing to log: no event file in the training run

    def apply_checkpoint_rule(self, config) -> None:
        """Resolve --ckpt_path (a file, best / last, a list or a folder of fold runs) and take the network's
        settings from the checkpoint; the run's folder follows the checkpoint's."""
        ckpt = config.get("ckpt_path")
        members = checkpoint_list(str(ckpt)) if ckpt else []
        if len(members) < 2:  # an ensemble of folds is no fold's run
            _name_fold_run(config)
        if not ckpt:
            if self.subcommand == "fit":
                check_tta_trained(config.model.tta, config.data.augmentation.as_dict(), "the model to train")
            if self.subcommand in ("validate", "test", "predict") and not config.untrained:
                raise DataError(
                    f"{self.subcommand} needs --ckpt_path (a checkpoint file, or best / last of the "
                    "configured run): without one the model's weights are untrained; pass --untrained true "
                    "to do it anyway"
                )
            return
        run_dir = _logger_run_dir(config)
        given = str(ckpt)
        if len(members) > 1 or members[0] != str(ckpt):
            if self.subcommand in ("fit", "validate"):
                raise DataError(
                    f"--ckpt_path {ckpt}: {self.subcommand} takes a single checkpoint file (or best / last); "
                    "several checkpoints (a list or a folder of runs) are an ensemble, for test and predict"
                )
            chosen = f"ensemble of {', '.join(members)}" if len(members) > 1 else f"using {members[0]}"
            if Path(ckpt).is_dir():  # a folder's runs must be the folds of one cross-validation
                self.preloaded = {member: load_checkpoint(member) for member in members}
                check_one_cross_validation(str(ckpt), list(self.preloaded.values()))
            _say(f"la-seg: --ckpt_path {ckpt}: {chosen}")
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
            _say(f"la-seg: --ckpt_path {ckpt}: using {found}")
            config.ckpt_path = ckpt = str(found)
        self.member_paths = [str(ckpt), *members[1:]]
        self.resolve_once(given, self.member_paths)
        checkpoint = self.preloaded.get(str(ckpt)) or load_checkpoint(ckpt)
        self.preloaded[str(ckpt)] = checkpoint
        if len(self.member_paths) < 2:
            _continue_run_of(config, Path(ckpt), run_dir)
        apply_checkpoint_settings(config, checkpoint, self.given_options)
        if self.subcommand in ("validate", "test"):
            apply_checkpoint_data(config, checkpoint, self.given_options)
        if self.subcommand != "fit":
            warn_if_low_dice(checkpoint, str(ckpt), config.model.plausibility.min_val_dice)
        check_tta_trained(config.model.tta, training_augmentation(checkpoint), f"checkpoint {ckpt}")

    def resolve_once(self, given: str, paths: list[str]) -> None:
        """Rank 0 of a node resolves `--ckpt_path` (best, last, a folder of runs): the node's other ranks,
        which Lightning starts by running sys.argv again, get its answer appended there. Ranks that another
        launcher starts (other nodes) resolve for themselves; `SameCheckpointOnEveryRank` checks, on every
        rank, that they found what rank 0 found."""
        resolved = paths[0] if len(paths) == 1 else json.dumps(paths)
        if self.relaunched_argv and resolved != given:
            sys.argv += ["--ckpt_path", resolved]
        self.resolved_ckpt = (given, resolved)

    def _run_subcommand(self, subcommand: str) -> None:
        """A fit that fails before its first checkpoint leaves no run folder behind (no empty version_N)."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            run = getattr(self, "fresh_run", None)
            kept = run is None or not self.trainer.is_global_zero or any(run.glob("**/checkpoints/*.ckpt"))
            if not kept:
                shutil.rmtree(run, ignore_errors=True)
            raise

    def before_test(self) -> None:
        """la-seg's own table (printed by SegmentationMetrics) replaces Lightning's "Test metric" box."""
        if not on_command_line("verbose", self.given_options):
            self.config_init[self.subcommand]["verbose"] = False

    def after_fit(self) -> None:
        """What a user needs next: the best score and its epoch, the checkpoint, the run, the test command."""
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if self.trainer.is_global_zero and not self.trainer.interrupted:
            print(fit_summary(self.trainer, log_dir, self.given_options))
            warn_if_fit_failed(self.trainer, log_dir)

    def instantiate_trainer(self, **kwargs):
        """Every checkpoint Lightning reads goes through la-seg's data-only loader (a trainer plugin), unless
        the config names a CheckpointIO of its own."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            first = {path: self.preloaded[path] for path in self.member_paths[:1] if path in self.preloaded}
            kwargs["plugins"] = [*plugins, DataOnlyCheckpointIO(first)]  # the one checkpoint Lightning reads
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        if self.subcommand:
            check_log_dir_writable(self.config[self.subcommand])
        try:
            super().instantiate_classes()
        except ValueError as error:  # a network's argument: name the option that sets it
            raise naming_options(error) from error
        log_dir = self.trainer.log_dir if self.subcommand == "fit" else None  # no collective before launch
        missing = [f for f in (Path(log_dir), *Path(log_dir).parents) if not f.exists()] if log_dir else []
        self.fresh_run = missing[-1] if missing else None  # the outermost folder this fit will create
        if self.resolved_ckpt is not None:
            self.trainer.callbacks.append(SameCheckpointOnEveryRank(*self.resolved_ckpt))
        # every run: SIGTERM stops cleanly, with a resumable checkpoint, and so does a non-finite loss,
        # without one (la_seg/callbacks/termination.py); decoders take the memory layout their device
        # prefers (la_seg/callbacks/layout.py)
        self.trainer.callbacks.extend([StopOnSigterm(), StopOnNonFiniteLoss(), ChannelsLastDecoder()])
        if self.member_paths:
            self.model.member_name = self.member_paths[0]
            weights = self.config[self.subcommand].model.net.weights
            for path in self.member_paths[1:]:
                checkpoint = self.preloaded.pop(path, None) or load_checkpoint(path)
                augmentation = training_augmentation(checkpoint)
                check_tta_trained(self.model.hparams.tta, augmentation, f"checkpoint {path}")
                check_member_input(checkpoint, self.model.input_spec)
                warn_if_low_dice(checkpoint, path, self.model.plausibility.min_val_dice)
                self.model.add_member(load_member(path, weights, checkpoint))


def fit_summary(trainer, log_dir: str | None, given_options: list[str]) -> str:
    """The lines printed after `fit`: best val/dice and its epoch, checkpoints, run folder, next command."""
    lines = [f"la-seg: fit finished after {trainer.current_epoch} epoch(s); run folder {log_dir}"]
    for callback in trainer.checkpoint_callbacks:
        best, score = getattr(callback, "best_model_path", ""), getattr(callback, "best_model_score", None)
        if best and score is not None:
            epoch = getattr(callback, "best_epoch", None)
            at = f" at epoch {epoch}" if epoch is not None else ""
            lines.append(f"  best {callback.monitor} {float(score):.4f}{at}: {best}")
        if getattr(callback, "last_model_path", ""):
            lines.append(f"  last epoch: {callback.last_model_path}")
        if best:
            command = ["la-seg", "test", *replayed_options(given_options), "--ckpt_path", best]
            lines.append("  next: " + shlex.join(command))
    return "\n".join(lines)


REPLAYED = ("--config", "--data", "--model.net")  # what `test` needs of fit's options to run as fit did


def replayed_options(given_options: list[str]) -> list[str]:
    """fit's options that the printed test command repeats, as typed: the configs by the names given, the
    data options, and the network's (equal to the checkpoint's, they are needed where a config's differ)."""
    replayed = []
    for i, arg in enumerate(given_options):
        name = arg.split("=", 1)[0]
        if any(name == option or name.startswith(f"{option}.") for option in REPLAYED):
            replayed += [arg] if "=" in arg else given_options[i : i + 2]
    return replayed


def warn_if_fit_failed(trainer, log_dir: str | None) -> None:
    """One warning line after fit's summary when the best val/dice is below a working model's floor
    (model.plausibility.min_val_dice)."""
    scores = [
        float(callback.best_model_score)
        for callback in trainer.checkpoint_callbacks
        if getattr(callback, "monitor", None) == "val/dice" and callback.best_model_score is not None
    ]
    floor = trainer.lightning_module.plausibility.min_val_dice
    warning = low_dice_warning(max(scores, default=None), floor, f"run {log_dir}")
    if warning:
        _say(warning)


def warn_if_low_dice(checkpoint: dict, path: str, floor: float) -> None:
    """validate / test / predict from a checkpoint of a run that did not train repeat fit's warning, once."""
    warning = low_dice_warning(best_validation_dice(checkpoint), floor, f"the run of checkpoint {path}")
    if warning:
        _say(warning)


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
        typed = on_command_line(option, given_options)
        given[field] = (option, values[field], _NOT_A_DEFAULT if typed else defaults[field])
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
    if (note := legacy_orientation_note(checkpoint)) is not None:
        _say(note)
    apply_calibration(config, checkpoint, given_options)
    rebuilt = network_to_rebuild(checkpoint, net.weights)  # the one rule for the backbone's weights
    net.pretrained, net.weights = rebuilt.pretrained, rebuilt.weights


def apply_checkpoint_data(config, checkpoint: dict, given_options: list[str]) -> None:
    """validate / test read the split's cases from the folders the run was trained on, not the config's
    data.root (another data set may share its case ids), unless --data.root or --data.test_root is typed."""
    if any(on_command_line(f"data.{field}", given_options) for field in ("root", "test_root")):
        return
    trained = trained_data(checkpoint)
    for field, folder in trained.items():
        config.data[field] = folder
    if trained:
        where = ", ".join(f"data.{field} {folder}" for field, folder in trained.items() if folder)
        _say(f"la-seg: the split's cases are read from {where}, where the run was trained")


def apply_calibration(config, checkpoint: dict, given_options: list[str]) -> None:
    """The inference settings the checkpoint's fit chose on its validation cases replace the config's, except
    those given on the command line (--model.threshold, --model.postprocess, --model.review_below); the review
    threshold is the one calibrated for the run's model.tta where there is one."""
    calibration = stored_calibration(checkpoint)
    if calibration is None:
        return
    applied = {}
    for field, value in calibration["settings"].items():
        if field in CALIBRATED_FIELDS and not on_command_line(f"model.{field}", given_options):
            config.model[field] = applied[field] = value
    by_tta = calibration.get("how", {}).get("review_below_by_tta") or {}
    if config.model.tta in by_tta and "review_below" in applied:  # the voters this run uses, calibrated
        config.model.review_below = applied["review_below"] = by_tta[config.model.tta]
    if applied:
        chosen = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in applied.items())
        _say(f"la-seg: inference settings chosen on validation at the end of fit: {chosen}")


_NOT_A_DEFAULT = object()


def _default(field: dataclasses.Field):
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


@rank_zero_only
def _say(message: str) -> None:
    """A line for the user, printed once however many ranks parse the command."""
    print(message, file=sys.stderr)


def _logger_run_dir(config) -> Path | None:
    """`<save_dir>/<name>` of a configured TensorBoard/CSV logger, where its `version_*` folders go."""
    logger = config.trainer.get("logger")
    args = getattr(logger, "init_args", None)
    if args is None or args.get("save_dir") is None:
        return None
    return Path(args.save_dir) / (args.get("name") or "lightning_logs")


def _name_fold_run(config) -> None:
    """Fold i of a cross-validation logs into `<save_dir>/<name>/fold_i/version_N`, as nnU-Net names its
    folds: a user sees which run is which fold, `--ckpt_path last` resumes that fold, and
    `--ckpt_path <save_dir>/<name>` finds the folds of one cross-validation."""
    args = getattr(config.trainer.get("logger"), "init_args", None)
    if config.data.folds > 1 and args is not None and args.get("save_dir") is not None:
        args.name = f"{args.get('name') or 'lightning_logs'}/fold_{config.data.fold}"


def check_log_dir_writable(config) -> None:
    """The run folder the logger writes into (events, config, test report) must be writable: otherwise
    TensorBoard's writer thread fails with a traceback once the work is done."""
    run_dir = _logger_run_dir(config)
    if run_dir is None:
        return
    version = config.trainer.logger.init_args.get("version")
    if version is not None:
        run_dir = run_dir / (f"version_{version}" if isinstance(version, int) else str(version))
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(
            f"run folder {existing.absolute()} is not writable (the run's logs, config and reports go there):"
            " fix its permissions, or log elsewhere with --trainer.logger.init_args.save_dir DIR"
        )


def _continue_run_of(config, ckpt: Path, run_dir: Path | None) -> None:
    """Log into the run folder that holds `ckpt` (resume continues its curves; the test report lands beside
    it), whatever the configured name: no new version folder for a run that exists."""
    version_dir = ckpt.parent.parent  # as given, not resolved: Lightning compares the paths it records
    if run_dir is None or ckpt.parent.name != "checkpoints":
        return
    args = config.trainer.logger.init_args
    numbered = re.fullmatch(r"version_(\d+)", version_dir.name)  # an int: the bar shows v_num=3, not n_23
    args.save_dir, args.name = str(version_dir.parent.parent), version_dir.parent.name
    args.version = int(numbered.group(1)) if numbered else version_dir.name


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


MAX_CONFIG_NODES = 100_000  # values a config may expand to through its aliases (la-seg's own: a few hundred)


class _ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges, not a key
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (lines {seen[key]} and {line})",
                    key_node.start_mark,
                )  # fmt: skip
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node | None, sizes: dict[int, float]) -> float:
    """How many values `node` becomes once its aliases are expanded (inf for an alias cycle), counted on the
    composed graph, where each alias is one shared node: linear time, whatever the expansion."""
    if node is None:
        return 0
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = float("inf")  # while counting: meeting it again is a cycle
    children: list = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in children)
    return sizes[id(node)]


def _check_yaml(path: Path) -> None:
    """A config that is not valid YAML, holds a key twice or expands without bound through its aliases (a
    "billion laughs"): name the file and the place (jsonargparse names neither, and expands every alias)."""
    try:
        loader = _ConfigLoader(path.read_text())
        try:
            node = loader.get_single_node()
            if (size := _expanded_size(node, {})) > MAX_CONFIG_NODES:
                expands = "an endless cycle" if size == float("inf") else f"{size:.3g} values"
                raise DataError(
                    f"config {path} expands through its YAML aliases (&name / *name) to {expands}, more than "
                    f"{MAX_CONFIG_NODES}: write the values out"
                )
            document = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise DataError(f"config {path} is not valid YAML{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read config {path}: {error}") from None
    if not isinstance(document, dict):
        found = "nothing (an empty file)" if document is None else f"a {type(document).__name__}"
        raise DataError(
            f"config {path} holds {found}; a config is a mapping of sections (model:, data:, trainer:)"
        )


def synth(
    out: Path,
    cases: int = 12,
    seed: int = 0,
    shape: tuple[int, int, int] = (160, 160, 40),
    spacing: tuple[float, float, float] = (0.625, 0.625, 2.5),
    scar: float | None = None,
) -> None:
    """Write a LAScarQS-task-2-style tree of synthetic LGE-like volumes (LA label 420).

    Args:
        out: folder to create; gets out/train_1 .. out/train_N.
        cases: number of cases.
        seed: random seed (same seed, same bytes).
        shape: volume shape (X, Y, Z), slices on the last axis.
        spacing: voxel spacing in mm.
        scar: wall enhancement patches of known area (IIR about 2.2 before blur) over this share of the LA
            wall, times 0.5..1.5 per case; default: the wall's random patchy enhancement of unknown extent.
    """
    from la_seg.data.synthetic import write_dataset  # only `synth` needs it

    with FolderLock(out, "--out"):  # a second synth into `out` would pair its images with this one's labels
        folders = write_dataset(Path(out), cases, seed, shape=tuple(shape), spacing=tuple(spacing), scar=scar)
    print(f"Wrote {len(folders)} synthetic cases to {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; any failure ends with one `la-seg: error:` line and exit status 2 rather than a traceback
    (LA_SEG_DEBUG=1 shows the traceback)."""
    configure_threads()
    quiet_lightning()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    sigterm_stop(clear=True)
    try:
        run(argv, from_command_line)
    except SIGTERMException:  # a SystemExit (status 0) to Lightning: a job script would see success
        status = stop_status()
        print(f"la-seg: {sigterm_stop(clear=True) or 'stopped by SIGTERM'}", file=sys.stderr)
        raise SystemExit(status) from None
    except KeyboardInterrupt:  # Ctrl-C where Lightning does not handle it (synth, export-nnunet, evaluate)
        print(
            "la-seg: stopped by SIGINT (Ctrl-C): nothing half-written is left under a final name; run the "
            "same command again to complete the work",
            file=sys.stderr,
        )
        raise SystemExit(SIGINT_STATUS) from None
    except Exception as error:
        status = stop_status()
        if (stop := sigterm_stop(clear=True)) is not None:  # SIGTERM ended the loader workers too
            print(f"la-seg: {stop}", file=sys.stderr)
            raise SystemExit(status) from None
        if os.environ.get("LA_SEG_DEBUG") == "1":
            raise
        if not is_reported_elsewhere(error):  # under DDP, one process prints an error that all ranks share
            print(f"la-seg: error: {describe_error(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        end_process_group()


def run(argv: list[str], from_command_line: bool) -> None:
    """Parse `argv` and run its subcommand."""
    if argv in (["--help"], ["-h"]):
        print(overview())
        raise SystemExit(0)
    if argv and argv[0] in ("synth", "export-nnunet", "evaluate", "analyse"):
        if argv[0] == "synth":
            command = synth
        elif argv[0] == "analyse":  # imported here: only `analyse` needs trimesh and matplotlib's 3D
            from la_seg.analysis.command import analyse

            command = analyse
        else:  # imported here: fit/test/predict never need them
            from la_seg.evaluate import evaluate
            from la_seg.nnunet import export_nnunet

            command = export_nnunet if argv[0] == "export-nnunet" else evaluate
        parser = {"prog": f"la-seg {argv[0]}", "exit_on_error": False, "allow_abbrev": False}
        with suggesting_options():
            CLI(command, args=argv[1:], as_positional=False, **parser)
        return
    typed, argv = argv, resolve_config_paths(argv)
    if from_command_line:  # DDP re-launches sys.argv: let it carry the resolved config paths
        sys.argv[1:] = argv
    subcommand = argv[0] if argv else ""
    with suggesting_options():
        _lightning_cli(argv, typed, from_command_line, subcommand)


def _lightning_cli(argv: list[str], typed: list[str], from_command_line: bool, subcommand: str) -> None:
    """`typed` is `argv` before configs were resolved: the names a printed command repeats."""
    LASegCLI(
        LASegModule,
        LADataModule,
        args=None if from_command_line else argv,
        args_list=typed,
        # A test or predict run logs into the folder of the run it evaluates: keep that run's config.yaml.
        save_config_callback=None if subcommand == "predict" else SaveConfigCallback,  # logs nowhere
        save_config_kwargs={
            "overwrite": True,
            "config_filename": "config.yaml" if subcommand == "fit" else f"config_{subcommand}.yaml",
        },
        # Argument errors raise (main prints them as one line) instead of printing the whole usage.
        parser_kwargs={
            "prog": "la-seg",
            "description": "la-seg: left-atrium segmentation from LGE MRI with a DINOv2 encoder. "
            "Subcommands: fit, validate, test, predict (Lightning); `la-seg synth` (synthetic data), "
            "`la-seg export-nnunet` and `la-seg evaluate` (side by side with nnU-Net), `la-seg analyse` "
            "(LA surface with its wall IIR map, fibrosis share, Utah stage, LA size and shape). "
            "`la-seg SUBCOMMAND --help` describes each.",
            "exit_on_error": False,
            "allow_abbrev": False,  # `--trainer.max_epoch 1` must not silently mean max_epochs
            **{name: {"exit_on_error": False, "allow_abbrev": False} for name in parsed_subcommands(argv)},
        },
    )


_UNKNOWN = re.compile(r"(?:unrecognized arguments|Unrecognized arguments|Unexpected option)[^-]*(--[\w.-]+)")


@contextmanager
def suggesting_options():
    """An unknown option's error names the nearest known one (`--data.rooot`: did you mean --data.root?)."""
    import argparse

    import jsonargparse

    parsers: list = []
    original = jsonargparse.ArgumentParser.parse_args

    def remember(parser, *args, **kwargs):
        parsers.append(parser)
        return original(parser, *args, **kwargs)

    jsonargparse.ArgumentParser.parse_args = remember
    try:
        yield
    except (argparse.ArgumentError, ArgumentError) as error:
        match = _UNKNOWN.search(str(error))
        near = difflib.get_close_matches(match.group(1), _options(parsers), n=1, cutoff=0.8) if match else []
        if not near:
            raise
        raise DataError(f"unknown option {match.group(1)}: did you mean {near[0]}?") from None
    finally:
        jsonargparse.ArgumentParser.parse_args = original


def _options(parsers: list) -> list[str]:
    """Every --option of `parsers` and of their subcommands' parsers."""
    found: list[str] = []
    while parsers:
        parser = parsers.pop()
        found += [option for option in parser._option_string_actions if option.startswith("--")]
        subcommands = getattr(parser, "_subcommands_action", None)
        parsers += list(getattr(subcommands, "_name_parser_map", {}).values())
    return found


MAX_ERROR_CHARS = 2000  # an error line stays readable in a terminal and a job log
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
    elif isinstance(error, MisconfigurationException):  # a Trainer argument: name its option
        found = [
            (m.start(), p)
            for p in inspect.signature(Trainer).parameters
            if (m := re.search(rf"\b{p}\b", message))
        ]
        message = f"--trainer.{min(found)[1]}: {message}" if found else f"trainer settings: {message}"
    elif not isinstance(error, _EXPECTED):
        message = f"{type(error).__name__}: {message} (unexpected: LA_SEG_DEBUG=1 shows the traceback)"
    message = " ".join(message.split())
    if len(message) > MAX_ERROR_CHARS:  # an option's echoed value can be megabytes (an expanded YAML alias)
        message = f"{message[:MAX_ERROR_CHARS]} ... ({len(message) - MAX_ERROR_CHARS} characters cut)"
    return message


if __name__ == "__main__":
    main()
