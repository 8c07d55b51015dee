#!/usr/bin/env bash
# CPU under load (issue 8.5): the demo's fit + test, on an idle machine and with another process keeping one
# core busy, as JSON. Run it on a quiet machine (it measures the machine, so nothing else should run):
#   bash benchmarks/cpu_load.sh benchmarks/results/cpu_load.json
# Modes (MODES, default "idle loaded loaded_active"):
#   idle           fit + test alone;
#   loaded         the same beside a busy loop pinned to core 0 (taskset), la-seg's own thread policy;
#   loaded_active  loaded, with OMP_WAIT_POLICY=ACTIVE (spinning threads: what la-seg avoids).
# Environment: PY (default .venv/bin/python, else python3), LA_SEG_PATH (the checkout to measure, default this
# one: point it at a worktree of the base commit to compare), ARGS (more la-seg options for fit and test, e.g.
# "--trainer.max_epochs 5" for a shorter run), CASES (synthetic cases, default 16 as `make demo`).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT_JSON=${1:-$REPO/benchmarks/results/cpu_load.json}
PY=${PY:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
LA_SEG_PATH=$(cd "${LA_SEG_PATH:-$REPO}" && pwd)
MODES=${MODES:-idle loaded loaded_active}
read -r -a EXTRA <<<"${ARGS:-}"
WORK=$(mktemp -d /tmp/la-seg-cpu-load.XXXXXX)
export PYTHONPATH=$LA_SEG_PATH NO_ALBUMENTATIONS_UPDATE=1
RESULTS=()

"$PY" -m la_seg.cli synth --out "$WORK/demo_data" --cases "${CASES:-16}" --seed 0 >/dev/null || exit 1

demo() { # fit + test of the demo config in a fresh folder; prints the seconds it took
    local dir=$WORK/$1 start
    mkdir -p "$dir" && cd "$dir" || return 1
    start=$(date +%s%N)
    "$PY" -m la_seg.cli fit --config demo.yaml --data.root "$WORK/demo_data" "${EXTRA[@]}" >fit.log 2>&1 &&
        "$PY" -m la_seg.cli test --config demo.yaml --data.root "$WORK/demo_data" --ckpt_path best \
            "${EXTRA[@]}" >test.log 2>&1 || { tail -20 fit.log test.log >&2; return 1; }
    awk "BEGIN { print ($(date +%s%N) - $start) / 1e9 }"
}

for mode in $MODES; do
    busy=
    if [ "$mode" != idle ]; then
        taskset -c 0 bash -c 'while :; do :; done' &
        busy=$!
    fi
    echo "[cpu_load] $mode ..." >&2
    if [ "$mode" = loaded_active ]; then
        seconds=$(OMP_WAIT_POLICY=ACTIVE demo "$mode")
    else
        seconds=$(demo "$mode")
    fi
    rc=$?
    [ -n "$busy" ] && kill "$busy"
    echo "[cpu_load] $mode: ${seconds:-failed} s (exit $rc)" >&2
    RESULTS+=("$mode=${seconds:-nan}")
done

PYTHONPATH=$REPO "$PY" - "$OUT_JSON" "$LA_SEG_PATH" "${RESULTS[@]}" <<'PYEOF'
import json, os, subprocess, sys
from pathlib import Path

# As the runs saw them (None: la-seg chooses); read before la_seg is imported, which sets a wait policy.
thread_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")}
from la_seg.runtime import describe_cpu

out, checkout, *pairs = sys.argv[1:]
seconds = {mode: float(value) for mode, value in (pair.split("=") for pair in pairs)}
commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
report = {"checkout": checkout, "commit": commit.strip(), "seconds": seconds, **describe_cpu(),
          "thread_env": thread_env,
          "slowdown_vs_idle": {m: s / seconds["idle"] for m, s in seconds.items()} if "idle" in seconds else None,
          "load_average_after": list(os.getloadavg())}
Path(out).parent.mkdir(parents=True, exist_ok=True)
Path(out).write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
PYEOF
rm -rf "$WORK"
