"""`la-seg fit / validate / test / predict`: LightningCLI, linking the arguments that must agree and adding
the callbacks every run needs. Policy lives with its subject: the checkpoint rule in checkpoint_rule.py, run
folders in runs.py, the ranks' command line in distributed.py. Imported only for these four subcommands: it
loads Lightning and the model."""

from __future__ import annotations

from argparse import ArgumentError
from pathlib import Path

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from la_seg.atomic import PREDICT_ROOTS, check_predict_roots
from la_seg.callbacks import (
    InferenceCalibration,
    NiftiPredictionWriter,
    RunCheckpoint,
    SegmentationMetrics,
    TensorBoardImages,
)
from la_seg.callbacks.layout import ChannelsLastDecoder
from la_seg.callbacks.progress import lightning_progress_bar
from la_seg.callbacks.termination import DiscardRunWithoutCheckpoint, StopOnNonFiniteLoss, StopOnSigterm
from la_seg.checkpoint_rule import ResolvedCheckpoints, apply_checkpoint_rule
from la_seg.checkpoints import INPUT_DEFAULTS, DataOnlyCheckpointIO, SameCheckpointOnEveryRank
from la_seg.data.datamodule import LADataModule
from la_seg.distributed import relaunch_with_option
from la_seg.errors import naming_options, with_nearest_option
from la_seg.fit_summary import fit_summary, warn_if_fit_failed
from la_seg.module import LASegModule
from la_seg.runs import RunLayout
from la_seg.runtime import apply_cpu_precision, on_command_line

SUBCOMMANDS = ("fit", "validate", "test", "predict")
DESCRIPTION = (
    "la-seg: left-atrium segmentation from LGE MRI with a DINOv2 encoder. "
    "Subcommands: fit, validate, test, predict (Lightning); `la-seg synth` (synthetic data), "
    "`la-seg export-nnunet` and `la-seg evaluate` (side by side with nnU-Net), `la-seg analyse` "
    "(LA surface with its wall IIR map, fibrosis share, Utah stage, LA size and shape). "
    "`la-seg SUBCOMMAND --help` describes each."
)


def parsed_subcommands(argv: list[str]) -> tuple[str, ...]:
    """The subcommands that get a parser: only the one being run, as each holds every Trainer, model and data
    argument and building all four took most of a command's start (0.3 of 0.45 s); all of them otherwise
    (`la-seg --config FILE --help`)."""
    return (argv[0],) if argv and argv[0] in SUBCOMMANDS else SUBCOMMANDS


class LASegCLI(LightningCLI):
    """Links arguments that must agree, adds the callbacks every run needs, and applies the checkpoint rule:
    a run's network settings come from its checkpoint, read once and as data only (la_seg/checkpoints.py)."""

    def __init__(self, *args, args_list: list[str] | None = None, **kwargs) -> None:
        typed = args_list if args_list is not None else kwargs.get("args")
        # The options as typed, to tell explicit ones from config-file values (run=False callers pass `args`).
        self.given_options = list(typed) if isinstance(typed, list) else []
        self.checkpoints: ResolvedCheckpoints | None = None  # what --ckpt_path named, once resolved
        # sys.argv is what Lightning's DDP launcher runs again for the other ranks of this node
        self.relaunched_argv = kwargs.get("args") is None
        self.option_parsers: list[LightningArgumentParser] = []  # an unknown option is compared with theirs
        super().__init__(*args, **kwargs)

    def subcommands(self) -> dict[str, set[str]]:
        every = LightningCLI.subcommands()
        return {name: every[name] for name in parsed_subcommands(self.given_options)}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        self.option_parsers.append(parser)
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
        """Parse (an unknown option names the nearest known one), then hold --ckpt_path back until
        `before_instantiate_classes`: given a checkpoint file, LightningCLI would overlay its hyper-parameters
        on the parsed config, silently undoing options the user typed (e.g. --model.threshold);
        `apply_checkpoint_rule` applies la-seg's one rule instead."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as error:
            raise with_nearest_option(error, [parser, *self.option_parsers]) from None
        command = self.config.get("subcommand")
        self.held_ckpt_path = self.config[command].get("ckpt_path") if command else None
        if self.held_ckpt_path is not None:
            self.config[command].ckpt_path = None

    def before_instantiate_classes(self) -> None:
        """Every check of the command's paths and checkpoint, before a model is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        if self.held_ckpt_path is not None:
            config.ckpt_path = self.held_ckpt_path
        if self.subcommand == "predict":  # never into the input: refused before the checkpoint is read
            roots = [config.data[field] for field in PREDICT_ROOTS]
            check_predict_roots(config.writer.output_dir or None, roots)
        apply_cpu_precision(config.trainer, self.given_options)
        self.checkpoints = apply_checkpoint_rule(config, self.subcommand, self.given_options)
        resolved = self.checkpoints
        if resolved is not None and self.relaunched_argv and resolved.resolved != resolved.given:
            # rank 0 of a node resolves --ckpt_path (best, last, a folder of runs) for the node's other ranks;
            # other nodes resolve for themselves, and SameCheckpointOnEveryRank checks that they agree
            relaunch_with_option("--ckpt_path", resolved.resolved)
        if self.subcommand == "predict":  # the writer writes each case; holding all outputs only costs memory
            config.return_predictions = False
            config.trainer.logger = False  # nothing to log: no event file in the training run
        if self.subcommand and (layout := RunLayout.of(config.trainer)) is not None:
            layout.check_writable()

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
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        plugins = config.get("trainer", {}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            first = self.checkpoints.first_preloaded() if self.checkpoints is not None else {}
            kwargs["plugins"] = [*plugins, DataOnlyCheckpointIO(first)]  # the one checkpoint Lightning reads
        self.trainer_defaults["callbacks"] = lightning_progress_bar(config.get("trainer", {}))
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """Models raise ValueErrors about their own arguments; the user reads the option that sets each."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            raise naming_options(error) from error

    def after_instantiate_classes(self) -> None:
        """The callbacks every run has, and an ensemble's other members."""
        callbacks = self.trainer.callbacks
        if self.checkpoints is not None:
            callbacks.append(SameCheckpointOnEveryRank(self.checkpoints.given, self.checkpoints.resolved))
        # every run: SIGTERM stops cleanly, with a resumable checkpoint, and so does a non-finite loss,
        # without one (la_seg/callbacks/termination.py); decoders take the memory layout their device
        # prefers (la_seg/callbacks/layout.py)
        callbacks.extend([StopOnSigterm(), StopOnNonFiniteLoss(), ChannelsLastDecoder()])
        if self.subcommand == "fit" and self.checkpoints is not None:
            for callback in callbacks:
                if isinstance(callback, RunCheckpoint):
                    callback.continues_run = True
        if self.subcommand == "fit" and (run := self.fresh_run()) is not None:
            callbacks.append(DiscardRunWithoutCheckpoint(run))  # last: after StopOnSigterm's save
        if self.checkpoints is not None:
            self.checkpoints.add_members_to(self.model, self.config[self.subcommand].model.net.weights)

    def fresh_run(self) -> Path | None:
        """The outermost folder this fit will create (None when its run folder exists already); asked before
        the processes launch, where trainer.log_dir is no collective yet."""
        log_dir = self.trainer.log_dir
        missing = [f for f in (Path(log_dir), *Path(log_dir).parents) if not f.exists()] if log_dir else []
        return missing[-1] if missing else None


def run_lightning(argv: list[str], typed: list[str], from_command_line: bool) -> None:
    """Run a Lightning subcommand; `typed` is `argv` before configs were resolved (the names a printed
    command repeats)."""
    subcommand = argv[0] if argv else ""
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
            "description": DESCRIPTION,
            "exit_on_error": False,
            "allow_abbrev": False,  # `--trainer.max_epoch 1` must not silently mean max_epochs
            **{name: {"exit_on_error": False, "allow_abbrev": False} for name in parsed_subcommands(argv)},
        },
    )
