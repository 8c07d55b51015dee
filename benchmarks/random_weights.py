#!/usr/bin/env python
"""Write random weights of a timm DINOv2 model to a local .safetensors file, once, for `--model.net.weights`.

Random weights cost the same to load and run as the real ones, and need no download: the GPU check and the
startup benchmark use them to exercise local-file loading and lean checkpoints offline.

    python benchmarks/random_weights.py vit_giant_patch14_dinov2 ~/.cache/la-seg/random_giant.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def ensure_random_weights(
    name: str, path: Path, model_kwargs: dict | None = None, device: str = "cpu"
) -> Path:
    """`path`, written (atomically) only if it does not exist yet; the same file serves every later run."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    import timm
    import torch
    from safetensors.torch import save_file

    start = time.perf_counter()
    with torch.device(device):  # the giant ViT initialises in seconds on a GPU, a minute on a few CPU cores
        model = timm.create_model(name, pretrained=False, num_classes=0, **(model_kwargs or {}))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(state, str(partial))
    partial.replace(path)
    size = path.stat().st_size / 1e9
    print(
        f"wrote random {name} weights ({size:.2f} GB) to {path} in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="timm model name, e.g. vit_giant_patch14_dinov2")
    p.add_argument("path", type=Path, help="the .safetensors file to write (kept if it exists)")
    p.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON, e.g. '{\"depth\": 4}'")
    p.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is quicker)")
    args = p.parse_args(argv)
    print(ensure_random_weights(args.name, args.path, args.model_kwargs, args.device))


if __name__ == "__main__":
    main()
