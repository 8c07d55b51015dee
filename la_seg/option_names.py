"""The option names of fit / validate / test / predict, recorded from their LightningCLI parsers, so that a
mistyped option is answered in a fraction of a second instead of after Lightning and the model have loaded
(their parsers are built from the Trainer's, the model's and the data module's signatures).

The record (`option_names.json`) holds, per subcommand, every leaf of `la-seg SUBCOMMAND --print_config`
(Lightning's own dump of the parser's defaults). The check is conservative: it refuses only an option that is
no leaf, no group of leaves and under no leaf (a leaf may take nested keys: `--trainer.logger.init_args.x`),
and only when a known option is near enough to name; everything else goes on to the parser, which stays the
authority. `tests/test_option_names.py` compares the record with the live parsers; after an option changes:

    python -m la_seg.option_names --write
"""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

from la_seg.errors import nearest_option

RECORD = Path(__file__).with_name("option_names.json")
SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Options of every LightningCLI parser that --print_config does not dump
PARSER_OPTIONS = ("config", "print_config", "help")


@cache
def recorded() -> dict[str, frozenset[str]]:
    """Each subcommand's recorded leaves (dotted names without the leading --)."""
    return {name: frozenset(leaves) for name, leaves in json.loads(RECORD.read_text()).items()}


def check_typed_options(argv: list[str]) -> None:
    """Refuse a mistyped option of `la-seg fit/validate/test/predict ...` by the record, naming the nearest
    known one; anything the record cannot decide is left to the parser."""
    if not argv or argv[0] not in SUBCOMMANDS or not RECORD.is_file():
        return
    leaves = recorded().get(argv[0])
    if not leaves:
        return
    for token in argv[1:]:
        if not token.startswith("--") or token == "--":
            continue
        name = token[2:].split("=", 1)[0].rstrip("+")  # --data.root=x, --trainer.callbacks+=X
        if not is_known(name, leaves):
            error = nearest_option(f"--{name}", [f"--{leaf}" for leaf in (*leaves, *PARSER_OPTIONS)])
            if error is not None:
                raise error


def is_known(name: str, leaves: frozenset[str]) -> bool:
    """`name` is an option, a group of options (`--data` CONFIG) or a key under one (nested init_args, dict
    keys), or one of the parser's own options."""
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return (
        name in PARSER_OPTIONS
        or bool(prefixes & leaves)
        or any(leaf.startswith(f"{name}.") for leaf in leaves)
    )


def live_leaves(subcommand: str) -> list[str]:
    """The leaves of `la-seg SUBCOMMAND --print_config` (loads Lightning and the model)."""
    import contextlib
    import io

    import yaml

    from la_seg.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        main([subcommand, "--print_config"])
    return sorted(_leaves(yaml.safe_load(printed.getvalue())))


def _leaves(config: dict, prefix: str = "") -> list[str]:
    """Dotted names of a nested mapping's leaves; an empty mapping is a leaf."""
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        names += _leaves(value, f"{name}.") if isinstance(value, dict) and value else [name]
    return names


def write_record() -> None:
    """Record every subcommand's live leaves."""
    from la_seg.atomic import atomic_write_text

    record = {name: live_leaves(name) for name in SUBCOMMANDS}
    atomic_write_text(RECORD, json.dumps(record, indent=1) + "\n")
    print(f"Recorded the options of {', '.join(SUBCOMMANDS)} in {RECORD}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python -m la_seg.option_names --write")
    sys.argv = sys.argv[:1]  # the parsers read their arguments from main(), not from this command line
    write_record()
