#!/usr/bin/env bash
# One-shot GPU acceptance run: everything in pnfs that needs a GPU, in one go, in under
# 10 minutes on one H100/H200 (see bench/README.md, "GPU acceptance").
#
#   bash bench/gpu_acceptance.sh            # run it (needs CUDA)
#   bash bench/gpu_acceptance.sh --dry-run  # print the stages, check their scripts/flags/keys
#
# Stages, each under its own `timeout` so that one hang cannot eat the run:
#   tests          pytest -m "gpu and not interpret and not slow" (TRITON_INTERPRET unset)
#   kernels        bench/kernels.py --device cuda
#   train_step     bench/train_step.py --device cuda, mpii_mobilenetv2_p3_256, batch 32, bf16,
#                  eager cases only (--no-compile; the result that must come back)
#   demo_<loader>  launch/demo.py on CUDA for 2 epochs with data.loader=torch, gpu, dali
#   train_step_compiled  the same with the torch.compile cases too (last: the slowest stage)
# A stage whose Python packages do not import is skipped with a line naming them; the whole
# run also stops starting stages once its budget (RUN_BUDGET_S, default 570 s) is spent.
#
# Results go to $OUT/gpu-acceptance when $OUT is set, else bench/results/gpu-acceptance-<date>:
# per stage <stage>.log (its output) and <stage>.json (status, rc, seconds, command, device,
# torch version, commit, date and the stage's own JSON result), then summary.json/.txt.
# Environment: PYTHON (default .venv/bin/python, else python3), OUT, PNFS_COMMIT (when the
# tree is not a git checkout), T_<STAGE> time boxes in seconds (T_TESTS, T_KERNELS,
# T_TRAIN_STEP, T_DEMO per loader, T_TRAIN_STEP_COMPILED), RUN_BUDGET_S.
set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

DRY_RUN=0
case "${1:-}" in
    "") ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown option '$1' (expected --dry-run or nothing)" >&2; exit 2 ;;
esac

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's pnfs, installed or not
DATE=$(date -u +%F)
if [ -n "${OUT:-}" ]; then RESULTS="$OUT/gpu-acceptance"; else RESULTS="bench/results/gpu-acceptance-$DATE"; fi
SCRATCH=runs/gpu-acceptance  # demo data and run folders (large; only their results are kept)
RUN_BUDGET_S=${RUN_BUDGET_S:-570}
T_TESTS=${T_TESTS:-80}
T_KERNELS=${T_KERNELS:-100}
T_TRAIN_STEP=${T_TRAIN_STEP:-60}
T_DEMO=${T_DEMO:-60}
T_TRAIN_STEP_COMPILED=${T_TRAIN_STEP_COMPILED:-130}
LOADERS=(torch gpu dali)
DEMO_ARGS=(--seed 0 --nproc 1 --train 800 --val 200)  # the CI demo's size (tests/test_demo.py)
STEP_ARGS=(--config mpii_mobilenetv2_p3_256 --batch 32 --device cuda)
STEP_OVERRIDES=(train.amp=bf16)

# ----------------------------------------------------------------------------- checks
# The scripts and flags this run calls, and the config keys its overrides set, checked
# against the checkout before any GPU time is spent (and by --dry-run, on any machine).
PROBLEMS=0
check_flags() {  # SCRIPT FLAG...: the script exists and its --help lists every flag
    local script=$1
    shift
    if [ ! -f "$script" ]; then
        echo "check: $script does not exist" >&2
        PROBLEMS=$((PROBLEMS + 1))
        return
    fi
    local help
    if ! help=$("$PY" "$script" --help 2>&1); then
        echo "check: '$PY $script --help' failed:" >&2
        echo "$help" | tail -5 >&2
        PROBLEMS=$((PROBLEMS + 1))
        return
    fi
    local flag
    for flag in "$@"; do
        if ! grep -q -- "$flag\b" <<<"$help"; then
            echo "check: $script has no flag $flag" >&2
            PROBLEMS=$((PROBLEMS + 1))
        fi
    done
}

check_flags bench/kernels.py --device --json
check_flags bench/train_step.py --config --batch --device --json --no-compile
check_flags launch/demo.py --seed --nproc --train --val --out --data
check_flags launch/train.py --config --out
if [ "$PROBLEMS" -gt 0 ]; then
    echo "gpu_acceptance.sh: $PROBLEMS problem(s) with the scripts it calls; nothing run" >&2
    exit 2
fi
demo_overrides() { echo "train.device=cuda data.loader=$1 train.epochs=2"; }
if ! "$PY" - "${STEP_OVERRIDES[@]}" <<EOF; then
import sys
from pnfs.config import load_config
load_config("mpii_mobilenetv2_p3_256", [*sys.argv[1:], "train.device=cuda"])
for loader in "${LOADERS[*]}".split():
    load_config("demo", "$(demo_overrides LOADER)".replace("LOADER", loader).split())
EOF
    echo "gpu_acceptance.sh: the config overrides above do not load; nothing run" >&2
    exit 2
fi

# ----------------------------------------------------------------------------- stages
STARTED=$(date +%s)
SUMMARY=()
FAILED=0

if [ "$DRY_RUN" = 0 ]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
        echo "gpu_acceptance.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
        echo "  (bash bench/gpu_acceptance.sh --dry-run shows what would run)" >&2
        exit 1
    fi
    mkdir -p "$RESULTS" "$SCRATCH"
    COMMIT=${PNFS_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
    if [ "$COMMIT" != unknown ] && [ -z "${PNFS_COMMIT:-}" ] && [ -n "$(git status --porcelain 2>/dev/null)" ]; then
        COMMIT="$COMMIT+changes"
    fi
    "$PY" - "$RESULTS/environment.json" "$COMMIT" <<'EOF'
import datetime, json, platform, sys
import torch
info = {
    "device": torch.cuda.get_device_name(0),
    "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "python": platform.python_version(),
    "commit": sys.argv[2],
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}
for name in ("triton", "torchvision", "nvidia.dali"):
    try:
        info[name] = __import__(name, fromlist=["__version__"]).__version__
    except Exception as e:
        info[name] = f"missing ({type(e).__name__})"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print("environment:", json.dumps(info))
EOF
fi

missing_modules() {  # MODULE...: prints those that do not import
    local m out=()
    for m in "$@"; do
        "$PY" -c "import $m" >/dev/null 2>&1 || out+=("$m")
    done
    echo "${out[*]}"
}

# stage NAME TIMEOUT "MODULES" RESULT_JSON -- COMMAND...
stage() {
    local name=$1 limit=$2 modules=$3 result=$4
    shift 5
    local shown
    printf -v shown '%q ' "$@"
    if [ "$DRY_RUN" = 1 ]; then
        printf '[dry-run] %-20s timeout %4ss  needs: %-28s %s\n' "$name" "$limit" "${modules:--}" "$shown"
        return
    fi
    local status rc=0 seconds=0 missing left
    missing=$(missing_modules $modules)
    left=$((RUN_BUDGET_S - ($(date +%s) - STARTED)))
    if [ -n "$missing" ]; then
        status="skipped: missing Python package(s): $missing"
    elif [ "$left" -lt 20 ]; then
        status="skipped: run budget of ${RUN_BUDGET_S}s spent"
    else
        [ "$left" -lt "$limit" ] && limit=$left
        echo "== $name (timeout ${limit}s): $shown"
        local t0
        t0=$(date +%s)
        timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
        rc=$?
        seconds=$(($(date +%s) - t0))
        case $rc in
            0) status=ok ;;
            124 | 137) status="timeout after ${limit}s" ;;
            *) status="failed (exit $rc)" ;;
        esac
        [ "$status" = ok ] || FAILED=$((FAILED + 1))
        tail -n 4 "$RESULTS/$name.log" | sed 's/^/   | /'
    fi
    echo "== $name: $status"
    "$PY" - "$RESULTS" "$name" "$status" "$rc" "$seconds" "$limit" "$result" "$@" <<'EOF'
import datetime, json, os, sys
results, name, status, rc, seconds, limit, result, *command = sys.argv[1:]
env = json.load(open(os.path.join(results, "environment.json")))
finished = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
record = {"stage": name, "status": status, "rc": int(rc), "seconds": int(seconds),
          "timeout_s": int(limit), "command": command, **env, "finished": finished, "result": None}
if result and os.path.isfile(result):
    try:
        record["result"] = json.load(open(result))
    except ValueError as e:
        record["result"] = f"unreadable: {e}"
json.dump(record, open(os.path.join(results, f"{name}.json"), "w"), indent=1)
EOF
    SUMMARY+=("$(printf '%-22s %-45s %5ss' "$name" "$status" "$seconds")")
}

unset TRITON_INTERPRET  # the GPU-marked tests compile for the device, not the interpreter

stage tests "$T_TESTS" "pytest" "" -- \
    "$PY" -m pytest -q -m "gpu and not interpret and not slow" -p no:cacheprovider \
    --junitxml="$RESULTS/tests.xml" tests
stage kernels "$T_KERNELS" "triton" "$RESULTS/kernels.raw.json" -- \
    "$PY" bench/kernels.py --device cuda --json "$RESULTS/kernels.raw.json"
stage train_step "$T_TRAIN_STEP" "" "$RESULTS/train_step.raw.json" -- \
    "$PY" bench/train_step.py "${STEP_ARGS[@]}" --no-compile --json "$RESULTS/train_step.raw.json" \
    "${STEP_OVERRIDES[@]}"
for loader in "${LOADERS[@]}"; do
    case $loader in
        torch) needs="cv2 simplejpeg pycocotools" ;;
        gpu) needs="torchvision pycocotools" ;;
        dali) needs="nvidia.dali nvidia.dali.plugin.pytorch pycocotools" ;;
    esac
    # shellcheck disable=SC2046  # the overrides are words
    stage "demo_$loader" "$T_DEMO" "$needs" "$SCRATCH/demo-$loader/metrics.json" -- \
        "$PY" launch/demo.py "${DEMO_ARGS[@]}" --out "$SCRATCH/demo-$loader" --data "$SCRATCH/data" \
        $(demo_overrides "$loader")
    if [ "$DRY_RUN" = 0 ] && [ -f "$SCRATCH/demo-$loader/train.log" ]; then
        cp "$SCRATCH/demo-$loader/train.log" "$RESULTS/demo_$loader.train.log"
    fi
done
stage train_step_compiled "$T_TRAIN_STEP_COMPILED" "" "$RESULTS/train_step_compiled.raw.json" -- \
    "$PY" bench/train_step.py "${STEP_ARGS[@]}" --json "$RESULTS/train_step_compiled.raw.json" \
    "${STEP_OVERRIDES[@]}"

if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: scripts, flags and config overrides checked; results would go to $RESULTS"
    exit 0
fi
{
    echo "GPU acceptance, $(date -u +%FT%TZ), $(($(date +%s) - STARTED)) s, results in $RESULTS"
    printf '%s\n' "${SUMMARY[@]}"
} | tee "$RESULTS/summary.txt"
"$PY" - "$RESULTS" <<'EOF'
import glob, json, os, sys
stages = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")))
          if not p.endswith(("environment.json", "summary.json", ".raw.json"))]
summary = {"environment": json.load(open(os.path.join(sys.argv[1], "environment.json"))),
           "stages": {s["stage"]: {k: s[k] for k in ("status", "seconds", "timeout_s")} for s in stages}}
json.dump(summary, open(os.path.join(sys.argv[1], "summary.json"), "w"), indent=1)
EOF
[ "$FAILED" = 0 ]
