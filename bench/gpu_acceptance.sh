#!/usr/bin/env bash
# One-shot GPU acceptance run for a bare GPU machine (its own python3 with torch and triton, no
# .venv, no pnfs install, no network), in one call of at most 9 minutes (bench/README.md,
# "GPU acceptance").
#
#   bash bench/gpu_acceptance.sh             # the run (needs CUDA)
#   bash bench/gpu_acceptance.sh --rehearse  # the same on a CPU: install, imports, checks and
#                                            # stage commands run; CUDA stages fail fast, reported
#   bash bench/gpu_acceptance.sh --dry-run   # checks (scripts, flags, overrides, imports) and the
#                                            # stage list; installs and writes nothing
#
# 1. install: the carried wheels in .whl/ (if any) and pnfs itself (a wheel built from this tree:
#    pnfs.kernels comes from kernels/ through setup.py's package_dir) into runs/gpu-acceptance/site,
#    with --no-index --no-deps; then PYTHONPATH=that folder and PYTHONSAFEPATH=1 (a script's folder
#    or the working directory never shadows the installed pnfs).
# 2. preflight (bench/acceptance_preflight.py, one Python start): every import, the device, every
#    called script's flags, the config overrides. A wrong flag or override stops the run (exit 2).
# 3. stages, in order of value, each in its own time box (seconds, env T_<STAGE>), each recorded
#    the moment it ends (bench/acceptance_report.py):
#      kernel_check  bench/kernel_check.py: every kernel x fp32/bf16 x layouts x ragged sizes, fwd and
#                    bwd, against float64
#      gpu_tests     pytest -m "gpu and not interpret and not slow" (Triton compiled for the GPU)
#      kernels       bench/kernels.py --device cuda --no-compiled: Triton vs eager, fp32 and bf16
#      train_step    bench/train_step.py --cases ...: eager (torch, Triton), compiled; host vs wall
#      demo_torch    launch/demo.py on CUDA, data.loader=torch, train.amp=auto (the default)
#      demo_gpu, demo_dali   launch/train.py on the demo's shards with data.loader=gpu / dali
#      ddp_nccl      torchrun, 2 ranks with NCCL on the one GPU; the ranks' weights must be equal
#      deepspeed_zero1   the same with --deepspeed launch/deepspeed_zero1.json (ZeRO-1, bf16)
#    A stage whose modules do not import is skipped with a line naming them (one that needs CUDA
#    where there is none fails at once: --rehearse). The budget (RUN_BUDGET_S, 500 s) counts from
#    this script's start: a stage starts only with >= 15 s left and is cut to what is left.
# Results: $OUT (else bench/results/gpu-acceptance-<date>) receives three files, rewritten after
# every stage: summary.json, summary.txt and stages.tar.gz (every stage's log and JSON).
# Environment: PYTHON (default python3: the machine's), OUT, PNFS_COMMIT (the tree is no git
# checkout there), RUN_BUDGET_S, T_KERNEL_CHECK, T_GPU_TESTS, T_KERNELS, T_TRAIN_STEP, T_DEMO, T_RANKS.
set -u -o pipefail
STARTED=$(date +%s)

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2

MODE=run
case "${1:-}" in
    "") ;;
    --dry-run) MODE=dry-run ;;
    --rehearse) MODE=rehearse ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_acceptance.sh: unknown option '$1' (expected --dry-run, --rehearse or nothing)" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
DATE=$(date -u +%F)
DEST=${OUT:-bench/results/gpu-acceptance-$DATE}
SCRATCH=runs/gpu-acceptance    # site-packages, stage files, demo data and runs (not returned)
SITE=$SCRATCH/site
RESULTS=$SCRATCH/stages        # packed into $DEST/stages.tar.gz after every stage
RUN_BUDGET_S=${RUN_BUDGET_S:-500}
T_KERNEL_CHECK=${T_KERNEL_CHECK:-30}
T_GPU_TESTS=${T_GPU_TESTS:-50}
T_KERNELS=${T_KERNELS:-60}
T_TRAIN_STEP=${T_TRAIN_STEP:-140}
T_DEMO=${T_DEMO:-50}
T_RANKS=${T_RANKS:-45}
if [ -z "${PNFS_COMMIT:-}" ]; then
    PNFS_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [ "$PNFS_COMMIT" != unknown ] && [ -n "$(git status --porcelain -- pnfs kernels bench launch 2>/dev/null)" ]; then
        PNFS_COMMIT="$PNFS_COMMIT+changes"
    fi
fi
export PNFS_COMMIT
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the Triton kernels compile for the device, not the interpreter

elapsed() { echo $(($(date +%s) - STARTED)); }

# ----------------------------------------------------------------------------- the stages
# Each: NAME BOX "NEEDS" -- COMMAND...; NEEDS are modules (as the preflight names them) and `cuda`.
DATA=$SCRATCH/data
SHARDS=$DATA/shards-seed0
DEMO_SIZE=(--seed 0 --nproc 1 --train 400 --val 100)
TRAIN_ON_SHARDS=(--config pnfs/configs/demo.yaml
    "data.train_shards=$SHARDS/train" "data.val_shards=$SHARDS/val"
    "data.val_annotations=$DATA/raw-seed0/annotations/person_keypoints_val.json"
    train.device=cuda train.seed=0)
# Two ranks on one GPU: NCCL refuses two ranks on one device of one host, so each rank gets its
# own NCCL_HOSTID (as if on two hosts) and talks over sockets (no P2P, no shared memory).
NCCL_ENV=(env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_IB_DISABLE=1 NCCL_SOCKET_IFNAME=lo NCCL_DEBUG=WARN)
TWO_RANKS=("${NCCL_ENV[@]}" "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 --no-python
    bash -c 'export NCCL_HOSTID=pnfs-rank-$LOCAL_RANK; exec "$0" "$@"' "$PY")
# lean-auto equals lean under bf16 (the default on CUDA) until bf16 kernels are measured
# (kernels/auto_table.py): the captured and compiled torch paths come before it
STEP_CASES=lean,lean-graphed,lean-compiled,lean-per-part,baseline,lean-auto,lean-auto-graphed,lean-compiled-model,lean-auto-compiled

# the test files holding gpu-marked tests (collecting only those keeps a rehearsal short)
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' "pytest.mark.gpu" tests | sort)

STAGE_NAMES=()
declare -A BOX NEEDS CMD RESULT EXTRA
add_stage() {  # NAME BOX NEEDS RESULT EXTRA -- COMMAND...
    local name=$1
    STAGE_NAMES+=("$name")
    BOX[$name]=$2 NEEDS[$name]=$3 RESULT[$name]=$4 EXTRA[$name]=$5
    shift 6
    local shown
    printf -v shown '%q ' "$@"
    CMD[$name]=$shown
}
add_stage kernel_check "$T_KERNEL_CHECK" "triton pnfs.kernels" "$RESULTS/kernel_check.raw.json" "" -- \
    "$PY" bench/kernel_check.py --device cuda --json "$RESULTS/kernel_check.raw.json"
add_stage gpu_tests "$T_GPU_TESTS" "pytest triton pnfs.kernels" "" "--junit $RESULTS/gpu_tests.xml" -- \
    "$PY" -m pytest -q -m "gpu and not interpret and not slow" -p no:cacheprovider \
    --junitxml="$RESULTS/gpu_tests.xml" "${GPU_TESTS[@]}"
add_stage kernels "$T_KERNELS" "triton pnfs.kernels" "$RESULTS/kernels.raw.json" "" -- \
    "$PY" bench/kernels.py --device cuda --no-compiled --reps 10 --json "$RESULTS/kernels.raw.json"
add_stage train_step "$T_TRAIN_STEP" "pnfs.kernels" "$RESULTS/train_step.raw.json" "" -- \
    "$PY" bench/train_step.py --config mpii_mobilenetv2_p3_256 --batch 32 --device cuda --steps 20 \
    --block 5 --cases "$STEP_CASES" --json "$RESULTS/train_step.raw.json"
add_stage demo_torch "$T_DEMO" "cuda cv2 simplejpeg pycocotools webdataset" "$SCRATCH/demo-torch/metrics.json" "" -- \
    "$PY" launch/demo.py "${DEMO_SIZE[@]}" --out "$SCRATCH/demo-torch" --data "$DATA" \
    train.device=cuda data.loader=torch train.epochs=1
add_stage demo_gpu "$T_DEMO" "cuda torchvision pycocotools webdataset" "$SCRATCH/demo-gpu/result.json" "" -- \
    "$PY" launch/train.py "${TRAIN_ON_SHARDS[@]}" --out "$SCRATCH/demo-gpu" data.loader=gpu train.epochs=1
add_stage demo_dali "$T_DEMO" "cuda nvidia.dali pycocotools webdataset" "$SCRATCH/demo-dali/result.json" "" -- \
    "$PY" launch/train.py "${TRAIN_ON_SHARDS[@]}" --out "$SCRATCH/demo-dali" data.loader=dali train.epochs=1
add_stage ddp_nccl "$T_RANKS" "cuda pycocotools webdataset" "$SCRATCH/ddp-nccl/result.json" "--ranks 2" -- \
    "${TWO_RANKS[@]}" launch/train.py "${TRAIN_ON_SHARDS[@]}" --out "$SCRATCH/ddp-nccl" \
    train.epochs=1 train.max_steps_per_epoch=4 train.eval_every=0
add_stage deepspeed_zero1 "$T_RANKS" "cuda deepspeed pycocotools webdataset" "$SCRATCH/deepspeed/result.json" "--ranks 2" -- \
    "${TWO_RANKS[@]}" launch/train.py "${TRAIN_ON_SHARDS[@]}" --out "$SCRATCH/deepspeed" \
    train.epochs=1 train.max_steps_per_epoch=4 train.eval_every=0 train.amp=bf16 \
    --deepspeed launch/deepspeed_zero1.json

if [ "$MODE" = dry-run ]; then
    # the checks against this checkout and the Python found now (no install): flags, overrides, imports
    "$PY" bench/acceptance_preflight.py >/dev/null || {
        echo "gpu_acceptance.sh: the checks above failed; nothing would run" >&2
        exit 2
    }
    for name in "${STAGE_NAMES[@]}"; do
        printf '[dry-run] %-16s box %4ss  needs: %-44s %s\n' "$name" "${BOX[$name]}" "${NEEDS[$name]}" "${CMD[$name]}"
    done
    echo "dry run: scripts, flags, config overrides and imports checked; results would go to $DEST"
    exit 0
fi

# ----------------------------------------------------------------------------- install
rm -rf "$SCRATCH"
mkdir -p "$RESULTS" "$SITE"
echo "== install into $SITE ($(elapsed) s)"
shopt -s nullglob
WHEELS=(.whl/*.whl)
shopt -u nullglob
{
    echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])' 2>&1)"
    if [ ${#WHEELS[@]} -eq 0 ]; then
        echo "carried wheels: none (.whl/ is absent or empty): only what this python already has"
    elif "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${WHEELS[@]}" \
        >"$RESULTS/install.log" 2>&1; then
        echo "carried wheels: ${#WHEELS[@]} installed: $(basename -a "${WHEELS[@]}" | tr '\n' ' ')"
    else
        echo "carried wheels: pip install failed (stages/install.log): $(tail -n 1 "$RESULTS/install.log")"
    fi
    # pnfs itself, not editable: pnfs.kernels exists only in an installed pnfs (package_dir)
    if "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
        --target "$SITE" . >>"$RESULTS/install.log" 2>&1; then
        echo "pnfs: installed from this tree"
    else
        echo "pnfs: pip install failed (stages/install.log): $(tail -n 1 "$RESULTS/install.log")"
    fi
} | tee "$RESULTS/install.txt"
export PYTHONPATH="$REPO/$SITE"
export PYTHONSAFEPATH=1  # python 3.11+: neither the script's folder nor the working directory first

echo "== preflight ($(elapsed) s)"
# started through -c, as `python -m pytest` starts: it must see the pnfs the stages will see
"$PY" -c 'import runpy, sys; sys.argv[0] = "bench/acceptance_preflight.py"; runpy.run_path(sys.argv[0], run_name="__main__")' \
    --out "$RESULTS/preflight.json" --missing "$RESULTS/missing.txt" --site "$SITE" 2>&1 | tee "$RESULTS/preflight.log"
PREFLIGHT=${PIPESTATUS[0]}
report() { "$PY" bench/acceptance_report.py --results "$RESULTS" --dest "$DEST" "$@"; }
if [ "$PREFLIGHT" = 2 ]; then
    report final >/dev/null
    echo "gpu_acceptance.sh: the preflight found the problems above; no stage run ($DEST/summary.json)" >&2
    exit 2
elif [ "$PREFLIGHT" != 0 ] || [ ! -f "$RESULTS/missing.txt" ]; then
    report final >/dev/null
    echo "gpu_acceptance.sh: the preflight did not run (exit $PREFLIGHT; see stages/preflight.log)" >&2
    exit 2
fi
if grep -qx cuda "$RESULTS/missing.txt" && [ "$MODE" = run ]; then
    report final >/dev/null
    echo "gpu_acceptance.sh: no CUDA device visible to $PY (torch.cuda.is_available() is False)" >&2
    echo "  (--rehearse runs it anyway: the CUDA stages then fail fast and are reported)" >&2
    exit 1
fi

# ----------------------------------------------------------------------------- stages
run_stage() {
    local name=$1 limit=${BOX[$1]} status rc=0 seconds=0 missing=() m left
    for m in ${NEEDS[$name]}; do
        grep -qx "$m" "$RESULTS/missing.txt" && missing+=("$m")
    done
    left=$((RUN_BUDGET_S - $(elapsed)))
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "${missing[*]}" = cuda ]; then
            status="failed: no CUDA device"
        else
            status="skipped: does not import: ${missing[*]}"
        fi
    elif [ "$left" -lt 15 ]; then
        status="skipped: run budget of ${RUN_BUDGET_S}s spent"
    else
        [ "$left" -lt "$limit" ] && limit=$left
        echo "== $name (box ${limit}s, at $(elapsed) s): ${CMD[$name]}"
        local t0
        t0=$(date +%s)
        eval "timeout --kill-after=5 $limit ${CMD[$name]}" >"$RESULTS/$name.log" 2>&1
        rc=$?
        seconds=$(($(date +%s) - t0))
        case $rc in
            0) status=ok ;;
            124 | 137) status="timeout after ${limit}s" ;;
            *) status="failed (exit $rc)" ;;
        esac
        tail -n 3 "$RESULTS/$name.log" | cut -c1-200 | sed 's/^/   | /'
    fi
    local result=()
    [ -n "${RESULT[$name]}" ] && result=(--result "${RESULT[$name]}")
    # shellcheck disable=SC2086  # EXTRA holds flags
    report stage "$name" "$status" "$rc" "$seconds" "$limit" "${result[@]}" ${EXTRA[$name]} --command "${CMD[$name]}"
}

for name in "${STAGE_NAMES[@]}"; do
    run_stage "$name"
done
for run in demo-torch demo-gpu demo-dali ddp-nccl deepspeed; do  # the training logs, into the archive
    [ -f "$SCRATCH/$run/train.log" ] && cp "$SCRATCH/$run/train.log" "$RESULTS/$run.train.log"
done
echo "== GPU acceptance ($MODE), $(elapsed) s, commit $PNFS_COMMIT: $DEST/{summary.json,summary.txt,stages.tar.gz}"
report final
RC=$?
if [ "$MODE" = rehearse ]; then
    exit 0  # the CUDA stages' failures are the expected outcome on a CPU; install/preflight exit above
fi
exit $RC
