#!/usr/bin/env bash
# Everything this project measures on a lent GPU, in one call that fits one device session (about 6 minutes on one
# H100/H200): the Triton dropout's checks on real CUDA tensors, its ns/element against torch's CUDA kernel, the
# throughput profile (loader, steps, the recommended placement's cost with each kernel, and under torch.compile) and
# the placement's step-time cost in 100 interleaved rounds.
#
# Prepare here (the device machine sees only the checkout), then run through the device tool with carry=["local"]:
#   mkdir -p local/shared/data && cp -r ../shared/data/pets370 local/shared/data/   # 37 MB, git-ignored
#   bash benchmarks/gpu_session.sh            # results under $OUT (default out/gpu), one log per step
# Copy the result files from $OUT into benchmarks/results/ to commit them; each records its command and machine.
set -uo pipefail
# it takes no arguments: any (say --help) prints the header above instead of starting the session's pip install
if [ $# -gt 0 ]; then
    usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }
    case $1 in
        -h|--help) usage; exit 0 ;;
        *) { echo "gpu_session.sh: unknown argument '$1' (it takes none; settings come from OUT and TIMM_DROPFIX_SHARED)"
             usage; } >&2; exit 2 ;;
    esac
fi
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export TIMM_DROPFIX_SHARED=${TIMM_DROPFIX_SHARED:-local/shared}
export TIMM_DROPFIX_CACHE_DIR=${TIMM_DROPFIX_CACHE_DIR:-$OUT/cache}
export HF_HUB_OFFLINE=1 MPLBACKEND=Agg
status=0
step() {  # step NAME COMMAND...: run it, keep its log, go on after a failure (the later steps are independent)
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"; tail -n 25 "$OUT/$name.log"
    [ $rc -eq 0 ] || status=1
}
# --no-deps: keep the machine's own torch; the scripts and pytest also find the package from the checkout
pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "install failed (see install.log)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
step triton_checks python -m pytest -q -p no:cacheprovider tests/triton_checks.py
step dropout_speed python benchmarks/dropout_speed.py --device cuda --repeats 10 --out "$OUT/dropout_speed_gpu"
step throughput python benchmarks/throughput.py --gpu --out-dir "$OUT"
# the 3 % step-time target alone, at the GPU profile's size: seconds (two arms, one step each per round)
step dropout_overhead python benchmarks/dropout_overhead.py --device cuda --size 224 --batch 128 --rounds 100 \
    --out-dir "$OUT"
exit $status
