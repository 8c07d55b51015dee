#!/usr/bin/env bash
# GPU check of what a user runs (issue 8.2), on a lent H100 / H200, in at most 6 minutes including installs:
#   random giant weights written once to a local file and passed as --model.net.weights (lean checkpoints,
#   offline loading) -> la-seg synth (small volumes) -> la-seg fit --config giant.yaml, two short epochs ->
#   a SIGKILL mid-epoch and `--ckpt_path last` resume -> la-seg test --ckpt_path best -> la-seg predict on
#   640 x 640 x 44 volumes -> benchmarks/throughput.py (giant, 448 px, batch 32).
# Each step prints one line with its wall time and verdict, and every verdict can fail: fit and resume by the
# step count in last.ckpt, kill by the exit status of a run killed after a training step of its own (seen as
# a file that step writes, not as progress-bar text), test by the report's content (every held-out case once,
# Dice and IoU within [0, 1]), predict by one mask per volume, throughput by its figures against the targets.
# A failing step does not stop the later ones; a summary block ends the output, listing the targets missed as
# well as those met. Exit status: 0 when every step passed.
#
# Beforehand, on a machine with network: `bash benchmarks/gpu_check_prepare.sh` builds .whl/ (what a stock
# CUDA PyTorch image lacks, ~17 MB). Then, lead, run it ONCE with the device tool (repo root is the cwd):
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=420)
# Working files (weights, data, runs, masks, the install) stay in $WORK under /tmp; $OUT receives at most
# four small files (each cut to its last 16 MiB): gpu_check.log (this output), steps.log (every step's
# output), test_metrics.json and throughput.json.
#
# Environment overrides: PY (python, default python3), OUT (results, default /tmp/la-seg-gpu-check), WORK
# (default /tmp/la-seg-gpu-check-work), WHEELS (default .whl), SITE (install target, default $WORK/site),
# BUDGET_S (whole script, default 340), and
#   SMOKE=1: CPU, demo.yaml with a tiny ViT, small volumes: rehearses every step on a machine without a GPU.
#   CONFIG, EXTRA_ARGS (la-seg options added to fit/test/predict), WEIGHTS_MODEL, WEIGHTS_KWARGS (JSON timm
#   kwargs of the random weights), WEIGHTS (the file), SYNTH_SHAPE, PREDICT_SHAPE, THROUGHPUT_ARGS.
set -uo pipefail
export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-340}
WHEELS=${WHEELS:-.whl}
OUT=${OUT:-/tmp/la-seg-gpu-check}
WORK=${WORK:-/tmp/la-seg-gpu-check-work}
SITE=${SITE:-$WORK/site}
if [ "${SMOKE:-0}" = 1 ]; then
    CONFIG=${CONFIG:-demo.yaml}
    EXTRA_ARGS=${EXTRA_ARGS:-"--trainer.accelerator cpu --data.img_size 56 --data.batch_size 4 --data.num_workers 0"}
    NET_ARGS=(--model.net.backbone_kwargs "{depth: 4, embed_dim: 32, num_heads: 2}" --model.net.trainable_blocks 0
        --model.net.decoder_channels "[16, 16, 8, 8]")
    WEIGHTS_MODEL=${WEIGHTS_MODEL:-vit_small_patch14_dinov2}
    WEIGHTS_KWARGS=${WEIGHTS_KWARGS:-'{"depth": 4, "embed_dim": 32, "num_heads": 2}'}
    SYNTH_SHAPE=${SYNTH_SHAPE:-[48, 48, 8]}
    PREDICT_SHAPE=${PREDICT_SHAPE:-[64, 64, 8]}
    THROUGHPUT_ARGS=${THROUGHPUT_ARGS:-"--device cpu --img-size 56 --batch-size 4 --steps 1 --warmup 0 --volumes 1
        --volume-shape 64 64 8 --num-workers 0"}
    WEIGHTS_DEVICE=cpu
else
    CONFIG=${CONFIG:-giant.yaml}
    EXTRA_ARGS=${EXTRA_ARGS:-"--trainer.devices 1 --data.batch_size 8 --data.num_workers 4"}
    NET_ARGS=()
    WEIGHTS_MODEL=${WEIGHTS_MODEL:-vit_giant_patch14_dinov2}
    WEIGHTS_KWARGS=${WEIGHTS_KWARGS:-'{}'}
    SYNTH_SHAPE=${SYNTH_SHAPE:-[128, 128, 16]}
    PREDICT_SHAPE=${PREDICT_SHAPE:-[640, 640, 44]}
    THROUGHPUT_ARGS=${THROUGHPUT_ARGS:-"--device cuda --img-size 448 --batch-size 32 --steps 10 --warmup 3
        --volumes 3 --volume-shape 640 640 44"}
    WEIGHTS_DEVICE=cuda
fi
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
WORK=$(mkdir -p "$WORK" && cd "$WORK" && pwd)
WEIGHTS=${WEIGHTS:-$WORK/random_$WEIGHTS_MODEL.safetensors}
REPO=$(cd "$(dirname "$0")/.." && pwd)
LOG="$WORK/gpu_check.log"
: >"$LOG"
: >"$WORK/steps.log"
LOG_LIMIT=$((16 * 1024 * 1024))
finish() { # the results: at most four files in $OUT, each its last 16 MiB
    cat "$WORK"/*.step.log >"$WORK/steps.log" 2>/dev/null
    for file in gpu_check.log steps.log test_metrics.json throughput.json; do
        [ -f "$WORK/$file" ] && tail -c "$LOG_LIMIT" "$WORK/$file" >"$OUT/$file"
    done
}
trap finish EXIT
SUMMARY=()
FAILED=0
say() { echo "[gpu_check ${SECONDS}s] $*" | tee -a "$LOG"; }
record() { # record NAME RC SECONDS: the step's summary line
    SUMMARY+=("$(printf '%-10s %-4s rc=%-3s %4ss' "$1" "$([ "$2" = 0 ] && echo ok || echo FAIL)" "$2" "$3")")
    [ "$2" = 0 ] || FAILED=$((FAILED + 1))
    say "step $1: rc=$2 in $3 s (its output: steps.log)"
    [ "$2" = 0 ] || tail -15 "$WORK/$1.step.log" | sed 's/^/    /'
}
step() { # step NAME LIMIT_S COMMAND...: run it under a time limit, its output to $WORK/NAME.step.log
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    say "start $name (limit ${limit}s)"
    echo "==== step $name: $*" >"$WORK/$name.step.log"
    timeout "$limit" "$@" >>"$WORK/$name.step.log" 2>&1
    record "$name" $? $((SECONDS - start))
}
la_seg() { "$PY" -m la_seg.cli "$@"; }
left() { echo $((BUDGET_S - SECONDS)); }
last_step() { # the global step stored in the newest last.ckpt of the run
    "$PY" -c "import glob, os, torch; p = max(glob.glob('runs/*/version_*/checkpoints/last.ckpt'), \
key=os.path.getmtime); print(torch.load(p, map_location='cpu', weights_only=False)['global_step'])"
}
make_data() {
    la_seg synth --out data --cases 6 --shape "$SYNTH_SHAPE" &&
        la_seg synth --out predict_src --cases 1 --shape "$PREDICT_SHAPE" && mkdir -p predict &&
        cp predict_src/train_1/enhanced.nii.gz predict/case_1.nii.gz &&
        cp predict_src/train_1/enhanced.nii.gz predict/case_2.nii.gz
}
kill_mid_epoch() { # fit from last.ckpt, SIGKILL once a training step of the resumed run has finished
    # A checkpoint after every training step into marks/: its first file says a step ran (no log text read).
    rm -rf marks
    "$PY" -m la_seg.cli fit "${COMMON[@]}" --trainer.max_epochs 1000 --ckpt_path last \
        --trainer.callbacks+=ModelCheckpoint --trainer.callbacks.dirpath marks \
        --trainer.callbacks.every_n_train_steps 1 --trainer.callbacks.save_top_k -1 &
    local pid=$!
    for _ in $(seq 1 1200); do
        if compgen -G "marks/*.ckpt" >/dev/null; then
            kill -KILL "$pid"
            wait "$pid"
            local status=$?
            echo "killed mid-epoch: exit status $status (137 = SIGKILL); last.ckpt holds step $(last_step)"
            [ "$status" = 137 ]
            return
        fi
        kill -0 "$pid" 2>/dev/null || { echo "the run ended before it could be killed"; return 1; }
        sleep 0.1
    done
    kill -KILL "$pid"
    echo "no training step within 120 s"
    return 1
}
resume() { # resume from last.ckpt for three more steps (one short epoch); the new last.ckpt must hold them
    local before
    before=$(last_step) || return 1
    timeout 150 "$PY" -m la_seg.cli fit "${COMMON[@]}" --ckpt_path last --trainer.max_steps $((before + 3)) ||
        return 1
    echo "resumed from step $before, now at step $(last_step)"
    [ "$(last_step)" = $((before + 3)) ]
}
predict_masks() {
    la_seg predict "${COMMON[@]}" --ckpt_path best --data.predict_root predict --writer.output_dir masks &&
        ls masks/*.nii.gz && [ "$(ls masks/*.nii.gz | wc -l)" = 2 ]
}
test_report() { # la-seg test, then its report must hold every held-out case of the split once, scores in [0, 1]
    la_seg test "${COMMON[@]}" --ckpt_path best || return 1
    "$PY" - <<'PYEOF'
import glob, json, os, shutil, sys
report_path = max(glob.glob("runs/*/version_*/test_heldout*.json"), key=os.path.getmtime)
run = os.path.dirname(report_path)
report, split = json.load(open(report_path)), json.load(open(os.path.join(run, "split.json")))
cases = [c["case_id"] for c in report["cases"]]
problems = []
if cases != sorted(split["test"]):
    problems.append(f"report cases {cases} are not the split's test cases {sorted(split['test'])}")
if report["summary"]["cases"]["n"] != len(cases):
    problems.append(f"summary n = {report['summary']['cases']['n']} for {len(cases)} cases")
for case in report["cases"]:
    for key in ("dice", "iou"):
        if not (isinstance(case[key], float) and 0.0 <= case[key] <= 1.0):
            problems.append(f"{case['case_id']}: {key} = {case[key]}")
shutil.copyfile(report_path, os.path.join(os.environ["WORK"], "test_metrics.json"))
print(f"report {report_path}: {len(cases)} case(s), mean Dice {report['summary']['dice']['mean']}")
print("\n".join(problems) or "report content: ok")
sys.exit(1 if problems else 0)
PYEOF
}
throughput_figures() { # the benchmark, then its figures against the targets (a missed target fails the step)
    "$PY" "$REPO/benchmarks/throughput.py" --config "$CONFIG" --weights "$WEIGHTS" "${THROUGHPUT[@]}" \
        --phantom-dir "$WORK/phantom" --json "$WORK/throughput.json" -- "${NET_ARGS[@]}" &&
        "$PY" "$REPO/benchmarks/gpu_check_targets.py" "$WORK/throughput.json"
}
export -f la_seg make_data predict_masks test_report throughput_figures
export CONFIG WEIGHTS REPO
export PY SYNTH_SHAPE PREDICT_SHAPE WORK

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    say "installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl >>"$LOG" 2>&1 || { tail -30 "$LOG"; exit 1; }
    export PYTHONPATH="${PYTHONPATH_PREFIX:-}$SITE:$REPO"
else
    say "no $WHEELS/ carried: relying on the installed packages"
    export PYTHONPATH="${PYTHONPATH_PREFIX:-}$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
"$PY" -c "import torch, timm, lightning, la_seg.cli; print('torch', torch.__version__, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU', '| timm', timm.__version__, \
'| lightning', lightning.__version__)" 2>&1 | tee -a "$LOG" || { say "imports failed"; exit 1; }

cd "$WORK" || exit 1 # the configs' loggers write runs/ here
rm -rf runs data predict_src predict masks marks phantom throughput.json test_metrics.json ./*.step.log
read -r -a EXTRA <<<"$EXTRA_ARGS"
# la-seg options of fit / test / predict: the local weights file, the small data set, short epochs.
COMMON=(--config "$CONFIG" --model.net.weights "$WEIGHTS" --data.root data --data.split "[0.5, 0.25, 0.25]"
    --trainer.limit_train_batches 3 --trainer.limit_val_batches 2 "${NET_ARGS[@]}" "${EXTRA[@]}")

step weights 150 "$PY" "$REPO/benchmarks/random_weights.py" "$WEIGHTS_MODEL" "$WEIGHTS" \
    --model-kwargs "$WEIGHTS_KWARGS" --device "$WEIGHTS_DEVICE"
step synth 150 bash -c make_data
step fit 150 "$PY" -m la_seg.cli fit "${COMMON[@]}" --trainer.max_epochs 2
start=$SECONDS
say "start kill (fit --ckpt_path last, SIGKILL after its first training step)"
echo "==== step kill" >"$WORK/kill.step.log"
kill_mid_epoch >>"$WORK/kill.step.log" 2>&1
record kill $? $((SECONDS - start))
start=$SECONDS
say "start resume (fit --ckpt_path last, three more steps)"
echo "==== step resume" >"$WORK/resume.step.log"
resume >>"$WORK/resume.step.log" 2>&1
record resume $? $((SECONDS - start))
step test 120 bash -c "$(declare -p COMMON); test_report"
step predict 150 bash -c "$(declare -p COMMON); predict_masks"
read -r -a THROUGHPUT <<<"$THROUGHPUT_ARGS"
if [ "$(left)" -ge 45 ]; then
    step throughput $(($(left) - 5)) bash -c "$(declare -p THROUGHPUT NET_ARGS); throughput_figures"
else
    say "no time left for throughput.py ($(left) s of ${BUDGET_S} s)"
    record throughput skipped 0
fi

echo "==== gpu_check summary ($SECONDS s, $FAILED failed; results in $OUT, working files in $WORK) ====" |
    tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
[ -f "$WORK/throughput.json" ] && "$PY" "$REPO/benchmarks/gpu_check_targets.py" "$WORK/throughput.json" |
    tee -a "$LOG"
exit $((FAILED > 0))
