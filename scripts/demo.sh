#!/usr/bin/env bash
# `make demo`: synthesise a small LGE-like data set, fit the demo config on CPU, test on the held-out cases.
set -euo pipefail
cd "$(dirname "$0")/.."
LA_SEG=.venv/bin/la-seg
[ -d demo_data ] || "$LA_SEG" synth --out demo_data --cases 16 --seed 0
"$LA_SEG" fit --config demo.yaml --data.root demo_data
"$LA_SEG" test --config demo.yaml --data.root demo_data --ckpt_path best
# the test just run wrote the newest QC page (la_seg/qc.py) beside its report
pages=$(ls -t runs/demo/version_*/test_*.html)
page=${pages%%$'\n'*}
echo "QC page (open in a browser): $PWD/$page"
echo "Run folder (checkpoints, split.json, config, TensorBoard events, test report): $PWD/$(dirname "$page")"
echo "Phantoms: $PWD/demo_data   TensorBoard: .venv/bin/tensorboard --logdir runs"
