"""Shared fixtures: tiny random ViTs and small synthetic LGE trees, so everything runs on CPU in seconds."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from la_seg.data.synthetic import write_dataset
from la_seg.models.segmenter import SegmenterConfig

# Two threads on the 2-core CI machine; OMP_NUM_THREADS=1 when other work shares the cores.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TINY_VIT = {"depth": 4, "embed_dim": 32, "num_heads": 2}

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: N workers share the cores, one torch thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for the la-seg processes that tests start
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    """Slow tests last (otherwise in their order): under `-n auto --dist worksteal` a worker that runs out
    of tests takes half of the other's remaining queue from its end, so the long runs get shared out. On 2
    cores: 7 min 39 s, against 8 min 9 s with slow tests first and 8 min 41 s with plain `--dist load`."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


def _autocast_enabled() -> bool:
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


@pytest.fixture(autouse=True)
def run_in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test runs in its own temporary working folder: la-seg's default runs/ (and anything else written
    relative to the working folder) never lands in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def refuse_autocast_banned_ops(monkeypatch):
    """Make CPU tests fail where CUDA autocast would: the ops on its banned list raise under any autocast.

    CUDA autocast refuses binary_cross_entropy (and nn.BCELoss); CPU autocast runs it, so without this a
    bf16-mixed CPU test passes while every GPU run crashes at its first validation.
    """
    original = F.binary_cross_entropy

    def guarded(*args, **kwargs):
        if _autocast_enabled():
            raise RuntimeError("binary_cross_entropy is unsafe to autocast (refused by CUDA autocast)")
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "binary_cross_entropy", guarded)
    monkeypatch.setattr(torch.nn.modules.loss.F, "binary_cross_entropy", guarded)
    original_forward = nn.BCELoss.forward

    def guarded_forward(self, *args, **kwargs):
        if _autocast_enabled():
            raise RuntimeError("nn.BCELoss is unsafe to autocast (refused by CUDA autocast)")
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(nn.BCELoss, "forward", guarded_forward)


@pytest.fixture
def tiny_net() -> SegmenterConfig:
    return SegmenterConfig(
        backbone="vit_small_patch14_dinov2",
        pretrained=False,
        img_size=56,
        backbone_kwargs=dict(TINY_VIT),
        decoder_channels=[32, 16, 16, 8],
        stem_channels=4,
    )


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """Six small synthetic LAScarQS-style cases, written once per test session."""
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, cases=6, seed=0, shape=(64, 60, 24), spacing=(1.6, 1.6, 4.0))
    return root


@pytest.fixture(scope="session")
def load_benchmark():
    """Loads a script of benchmarks/ (scripts, not a package) as a module: load_benchmark("throughput")."""

    def load(name: str):
        script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"la_seg_benchmark_{name}", script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as importlib's recipe: dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load
