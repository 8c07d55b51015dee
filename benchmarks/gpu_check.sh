#!/usr/bin/env bash
# GPU throughput check for la-seg (issue 5) on a lent H100 / H200: one prepared run, about 3-5 minutes.
#
# Lead, run it ONCE with the device tool (repo root is the working dir there):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=480)
# (kind left out: an H100 or H200 both do; the JSON names the card). Results come back in $OUT:
#   gpu_giant_448.json (the figures), gpu_giant_448_channels_last.json (if time allowed), gpu_demo_smoke.json,
#   gpu_check.log; the end of the output prints the giant JSON and a one-line summary per run.
#
# .whl/ (git-ignored, ~17 MB) holds what the device image lacks or may hold in another version, for Python 3.12
# x86_64; la-seg itself travels with the tree and is used through PYTHONPATH. To rebuild it here:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     monai==1.6.1 nibabel==5.4.2 pynrrd==1.1.3 albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 \
#     pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 \
#     simsimd==6.5.16 stringzilla==5.3.2 jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 \
#     timm==1.0.31
# Already on the image (KINDS.md): torch, lightning, torchmetrics, tensorboard, opencv-python-headless, scipy,
# scikit-image, pillow, numpy, pyyaml, huggingface-hub, safetensors, torchvision.
#
# Environment overrides: PY (python, default python3), BUDGET_S (seconds for the whole script, default 330),
# WHEELS (wheel folder, default .whl), SITE (install target, default /tmp/site), PYTHONPATH_PREFIX, and
# DRY_RUN=1: CPU and the tiny config only, to rehearse this script on a machine without a GPU.
set -uo pipefail
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-330}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
DEVICE=cuda
[ "${DRY_RUN:-0}" = 1 ] && DEVICE=cpu
OUT=${OUT:-/tmp/la-seg-gpu-check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
say() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$LOG"; }

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
    export PYTHONPATH="${PYTHONPATH_PREFIX:-}$SITE:$PWD"
else
    say "no $WHEELS/ carried: relying on the image's packages"
    export PYTHONPATH="${PYTHONPATH_PREFIX:-}$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, timm, lightning, monai, albumentations, jsonargparse, la_seg.cli; \
print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', \
'| timm', timm.__version__, '| lightning', lightning.__version__)" 2>&1 | tee -a "$LOG" \
    || { say "imports failed"; exit 1; }

bench() {  # bench NAME SECONDS ARGS...: one throughput.py run, JSON to $OUT/NAME.json, output to the log
    local name=$1 limit=$2
    shift 2
    say "run $name (limit ${limit}s): $*"
    timeout "$limit" "$PY" benchmarks/throughput.py --device "$DEVICE" --phantom-dir /tmp/la-seg-phantom \
        --json "$OUT/$name.json" "$@" >>"$LOG" 2>&1
    local rc=$?
    say "$name finished with rc=$rc"
    if [ $rc -ne 0 ]; then tail -40 "$LOG"; fi
    return $rc
}

# 1. Smoke test: the tiny demo ViT at 56 px (seconds); stops here if the pipeline is broken on this machine.
bench gpu_demo_smoke 90 --config demo.yaml --img-size 56 --batch-size 8 --steps 2 --warmup 1 --volumes 1 \
    --volume-shape 64 64 8 || exit 1

# 2. The figure that matters: giant, frozen, bf16-mixed, 448 px, batch 32; predict on 640 x 640 x 44 volumes.
GIANT=(--config giant.yaml --img-size 448 --batch-size 32 --steps 10 --warmup 3 --volumes 4 --volume-shape 640 640 44)
if [ "${DRY_RUN:-0}" = 1 ]; then
    GIANT=(--config demo.yaml --img-size 56 --batch-size 4 --steps 2 --warmup 1 --volumes 2 --volume-shape 64 64 8)
fi
bench gpu_giant_448 $((BUDGET_S - SECONDS - 10)) "${GIANT[@]}"
giant_rc=$?

# 3. If time is left: the same with a channels_last decoder (keep whichever wins).
left=$((BUDGET_S - SECONDS - 10))
if [ $giant_rc -eq 0 ] && [ $left -ge 90 ]; then
    bench gpu_giant_448_channels_last "$left" "${GIANT[@]}" --channels-last
else
    say "skipping the channels_last run (${left}s left)"
fi

cat "$OUT/gpu_giant_448.json" 2>/dev/null
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    t = r["targets"]
    print(f"{path.stem}: {r['device']} {r['backbone']} S={r['img_size']} B={r['batch_size']} {r['precision']} | "
          f"backbone {r['backbone_slices_per_s']:.1f} sl/s, train {r['train_slices_per_s']:.1f} "
          f"({r['train_ratio']:.2f}x), predict {r['predict_slices_per_s']:.1f} ({r['predict_ratio']:.2f}x) | "
          f"peak {r['peak_memory_gb']:.1f} GB (train {r['peak_memory_by_phase_gb']['train']:.1f}) | "
          f"MFU train {r['mfu_train']} | GPU targets: train>=0.7x {t['gpu_train_vs_backbone']['met']}, "
          f"mem<24GB {t['gpu_peak_memory_gb']['met']}")
EOF
say "done"
exit $giant_rc
