"""`la-seg`: the entry point. It links each subcommand to what runs it and imports only that: `--help`, an
argument error (fit / validate / test / predict's mistyped options by their recorded names,
la_seg/option_names.py), `synth`, `evaluate`, `export-nnunet` and `analyse` answer without Lightning or the
model, which fit / validate / test / predict load (la_seg/lightning_cli.py). Any failure ends as one error
line."""

from __future__ import annotations

import gc
import os
import sys
from argparse import ArgumentError
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from la_seg.atomic import PREDICT_ROOTS, FolderLock, check_predict_roots
from la_seg.config_file import resolve_config_paths
from la_seg.distributed import end_process_group, is_reported_elsewhere, relaunch_with
from la_seg.errors import describe_error, with_nearest_option
from la_seg.option_names import check_typed_options
from la_seg.runtime import configure_threads, quiet_lightning, typed_value
from la_seg.stops import SIGINT_STATUS, is_lightning_stop, sigterm_stop, stop_status

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


# plain functions, parsed by jsonargparse from their signatures
FUNCTION_COMMANDS = ("synth", "evaluate", "export-nnunet", "analyse")


def overview() -> str:
    """`la-seg --help`: every subcommand, one line each, without building any parser."""
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


def synth(
    out: Path,
    cases: int = 12,
    seed: int = 0,
    shape: tuple[int, int, int] = (240, 240, 60),
    spacing: tuple[float, float, float] = (0.625, 0.625, 2.5),
    scar: float | None = None,
    style: Literal["classic", "varied", "heldout"] = "classic",
) -> None:
    """Write a LAScarQS-task-2-style tree of synthetic LGE-like volumes (LA label 420).

    Args:
        out: folder to create; gets out/train_1 .. out/train_N.
        cases: number of cases.
        seed: random seed (same seed, same bytes).
        shape: volume shape (X, Y, Z), slices on the last axis. The heart is drawn for the grid's smallest
            extent (in mm): the default's 150 mm gives adult-size atria (LA about 35-95 mL); smaller grids
            hold smaller hearts.
        spacing: voxel spacing in mm.
        scar: wall enhancement patches of known area (IIR about 2.2 before blur) over this share of the LA
            wall, times 0.5..1.5 per case; default: the wall's random patchy enhancement of unknown extent.
        style: the phantoms' physics. classic: one fixed physics (the demo's data). varied: the training
            family, each case drawing contrast, wall, fat, neighbours, LA warp, grid rotation (in the
            affine), bias, noise and its pulmonary veins (four, a left common trunk or a right middle vein)
            over ranges as centres and patients differ. heldout: a setting no training family case has
            (both vein variants at once, closer neighbours, more warp and noise), for benchmarks. Ranges:
            la_seg/data/synthetic.py (VARIED, HELDOUT).
    """
    from la_seg.data.synthetic import write_dataset  # only `synth` needs it

    with FolderLock(out, "--out"):  # a second synth into `out` would pair its images with this one's labels
        folders = write_dataset(
            Path(out), cases, seed, shape=tuple(shape), spacing=tuple(spacing), scar=scar, style=style
        )
    print(f"Wrote {len(folders)} synthetic cases to {out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point; any failure ends with one `la-seg: error:` line and exit status 2 rather than a traceback
    (LA_SEG_DEBUG=1 shows the traceback)."""
    quiet_lightning()
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    sigterm_stop(clear=True)
    try:
        run(argv, from_command_line)
    except SystemExit as exit_:  # Lightning's SIGTERM stop, a SystemExit (status 0): a job would see success
        if not is_lightning_stop(exit_):
            raise
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
        if from_command_line:  # the process ends now: its last garbage collection would walk every object
            # of torch and Lightning (0.9 s on 2 cores). Each output is closed and renamed by now, and nothing
            # of la-seg's relies on finalizers at exit, which Python does not promise anyway.
            gc.freeze()


def run(argv: list[str], from_command_line: bool) -> None:
    """Parse `argv` and run its subcommand."""
    if argv in (["--help"], ["-h"]):
        print(overview())
        raise SystemExit(0)
    if not argv or not argv[0].startswith("-") and argv[0] not in OVERVIEW:
        given = f"invalid choice: {argv[0]!r}" if argv else "none given"
        raise ArgumentError(None, f"argument subcommand: {given} (choose from {str(tuple(OVERVIEW))[1:-1]})")
    if argv[0] in FUNCTION_COMMANDS:
        run_function(argv[0], argv[1:])
        return
    check_typed_options(argv)  # a typo answered before Lightning loads
    if argv[0] == "predict" and (output_dir := typed_value("writer.output_dir", argv)):  # and so is this
        check_predict_roots(output_dir, [typed_value(f"data.{root}", argv) for root in PREDICT_ROOTS])
    typed, argv = argv, resolve_config_paths(argv)
    if from_command_line:  # DDP re-launches sys.argv: let it carry the resolved config paths
        relaunch_with(argv)
    configure_threads()
    from la_seg.lightning_cli import run_lightning  # Lightning and the model: only these need them

    run_lightning(argv, typed, from_command_line)


def run_function(name: str, args: list[str]) -> None:
    """Run the function of `la-seg name` through jsonargparse (options from its signature, help from its
    docstring); an unknown option names the nearest known one."""
    from jsonargparse import CLI, capture_parser

    command = function_command(name)
    if "torch" in sys.modules:  # one torch thread per available core; a command without torch needs none
        configure_threads()
    parser = {"prog": f"la-seg {name}", "exit_on_error": False, "allow_abbrev": False}
    try:
        CLI(command, args=args, as_positional=False, **parser)
    except ArgumentError as error:  # the parser again, built only to list its options (no parsing, no run)
        options = capture_parser(lambda: CLI(command, args=args, as_positional=False, **parser))
        raise with_nearest_option(error, [options]) from None


def function_command(name: str) -> Callable[..., None]:
    """The function of `la-seg name`, its module imported only now: each needs its own libraries."""
    if name == "synth":
        return synth
    if name == "analyse":  # trimesh and matplotlib's 3D
        from la_seg.analysis.command import analyse

        return analyse
    if name == "evaluate":
        from la_seg.evaluate import evaluate

        return evaluate
    from la_seg.nnunet import export_nnunet

    return export_nnunet


if __name__ == "__main__":
    main()
