"""The recorded option names (la_seg/option_names.py) answer a typo as the LightningCLI parser would,
and never refuse an option the parser takes."""

from __future__ import annotations

import random

import pytest

from la_seg.errors import DataError
from la_seg.lightning_cli import run_lightning
from la_seg.option_names import SUBCOMMANDS, check_typed_options, live_leaves, recorded

# What la-seg adds to LightningCLI's parsers (la_seg/lightning_cli.py), as against Lightning's own options
LA_SEG_GROUPS = ("model", "data", "writer", "metrics", "images", "calibration", "untrained")


@pytest.fixture(scope="module")
def live() -> dict[str, set[str]]:
    return {name: set(live_leaves(name)) for name in SUBCOMMANDS}


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_every_option_the_parser_takes_passes_the_record(live, subcommand):
    """A missing name would refuse a real option, so none may be missing; recorded names the live parser lacks
    may only be Lightning's (another version's Trainer: 2.5 has no `weights_only`), never la-seg's own: after
    an option changes, `python -m la_seg.option_names --write`."""
    missing = live[subcommand] - recorded()[subcommand]
    assert not missing, f"record lacks {sorted(missing)}: run python -m la_seg.option_names --write"
    stale = {n for n in recorded()[subcommand] - live[subcommand] if n.split(".")[0] in LA_SEG_GROUPS}
    assert not stale, f"record holds options la-seg no longer has: {sorted(stale)}"
    for leaf in live[subcommand]:  # as typed, with a value, and with keys under it (init_args, list append)
        for typed in (f"--{leaf}", f"--{leaf}=1", f"--{leaf}+=x", f"--{leaf}.init_args.some_field"):
            check_typed_options([subcommand, "--config", "demo.yaml", typed, "1"])


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_a_typo_gets_the_parsers_own_answer(live, subcommand, tmp_path, monkeypatch):
    """Typos of la-seg's and Lightning's options (a letter dropped, doubled or swapped): where the record
    answers, its line is the one the parser gives after loading everything."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(subcommand)
    leaves = sorted(live[subcommand])
    chosen = ["data.root", "trainer.max_epochs", "model.net.backbone", *rng.sample(leaves, 3)]
    answered = 0
    for leaf in chosen:
        at = rng.randrange(1, len(leaf))
        typo = rng.choice([leaf[:at] + leaf[at + 1 :], leaf[:at] + leaf[at] + leaf[at:]])
        argv = [subcommand, f"--{typo}", "1"]
        try:
            check_typed_options(argv)
            continue  # left to the parser
        except DataError as fast:
            answered += 1
            with pytest.raises(DataError) as slow:
                run_lightning(argv, argv, from_command_line=False)
            assert str(fast) == str(slow.value), typo
    assert answered >= 3  # the common typos are answered by the record
