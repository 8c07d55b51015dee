"""`la-seg`: LightningCLI for fit / validate / test / predict, and `la-seg synth` for phantom data."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from jsonargparse import CLI
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from la_seg.callbacks import NiftiPredictionWriter, SegmentationMetrics, TensorBoardImages
from la_seg.data.datamodule import LADataModule
from la_seg.data.synthetic import write_dataset
from la_seg.errors import DataError
from la_seg.module import LASegModule
from la_seg.runtime import apply_cpu_precision, configure_threads

CONFIG_DIR = Path(__file__).parent / "configs"


class LASegCLI(LightningCLI):
    """Links arguments that must agree and adds the callbacks every run needs."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.img_size", "model.net.img_size")
        parser.link_arguments("data.slice_context", "model.slice_context")
        parser.add_lightning_class_args(SegmentationMetrics, "metrics")
        parser.add_lightning_class_args(TensorBoardImages, "images")
        parser.add_lightning_class_args(NiftiPredictionWriter, "writer")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        self.command_line = list(sys.argv[1:] if args is None else args)  # to tell explicit options apart
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config  # run=False: no subcommand
        apply_cpu_precision(config.trainer, self.command_line)
        ckpt = config.get("ckpt_path")
        run_dir = _logger_run_dir(config)
        if ckpt in ("last", "best") and run_dir is not None:
            found = find_run_checkpoint(run_dir, ckpt)
            if found is not None:
                config.ckpt_path = ckpt = str(found)
        if ckpt and Path(ckpt).is_file():
            _continue_run_of(config, Path(ckpt), run_dir)
            if _checkpoint_holds_backbone(Path(ckpt)):
                # The weights come from the checkpoint: building the backbone needs no download.
                config.model.net.pretrained = False
                config.model.net.weights = None


def _logger_run_dir(config) -> Path | None:
    """`<save_dir>/<name>` of a configured TensorBoard/CSV logger, where its `version_*` folders go."""
    logger = config.trainer.get("logger")
    args = getattr(logger, "init_args", None)
    if args is None or args.get("save_dir") is None:
        return None
    return Path(args.save_dir) / (args.get("name") or "lightning_logs")


def find_run_checkpoint(run_dir: Path, which: str) -> Path | None:
    """The newest `<run_dir>/version_*/checkpoints/<which>.ckpt`, or None."""
    candidates = list(run_dir.glob(f"*/checkpoints/{which}.ckpt"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _continue_run_of(config, ckpt: Path, run_dir: Path | None) -> None:
    """Log into the run that wrote `ckpt` (resume continues its curves; the test report lands beside it)."""
    version_dir = ckpt.resolve().parent.parent
    if run_dir is None or ckpt.parent.name != "checkpoints" or version_dir.parent != run_dir.resolve():
        return
    config.trainer.logger.init_args.version = version_dir.name


def _checkpoint_holds_backbone(ckpt: Path) -> bool:
    checkpoint = torch.load(ckpt, map_location="cpu", mmap=True, weights_only=False)
    return checkpoint.get("backbone", {}).get("stored", True)


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
    if Path(name).is_file():
        return name
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return str(candidate)
    return name


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
    folders = write_dataset(Path(out), cases, seed, shape=tuple(shape), spacing=tuple(spacing))
    print(f"Wrote {len(folders)} synthetic cases to {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; bad input ends with its message and exit status 2 rather than a traceback."""
    configure_threads()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "synth":
            CLI(synth, args=argv[1:], as_positional=False)
            return
        argv = resolve_config_paths(argv)
        if from_command_line:  # DDP re-launches sys.argv: let it carry the resolved config paths
            sys.argv[1:] = argv
        subcommand = argv[0] if argv else ""
        LASegCLI(
            LASegModule,
            LADataModule,
            args=None if from_command_line else argv,
            # A test or predict run logs into the folder of the run it evaluates: keep that run's config.yaml.
            save_config_kwargs={
                "overwrite": True,
                "config_filename": "config.yaml" if subcommand == "fit" else f"config_{subcommand}.yaml",
            },
            parser_kwargs={
                "description": "la-seg: left-atrium segmentation from LGE MRI with a DINOv2 encoder. "
                "Subcommands: fit, validate, test, predict (Lightning), and `la-seg synth` (synthetic data).",
            },
        )
    except (DataError, FileExistsError, FileNotFoundError) as error:
        print(f"la-seg: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
