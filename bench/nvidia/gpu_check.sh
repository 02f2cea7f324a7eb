#!/usr/bin/env bash
# Correctness checks of the NVIDIA backend on a real GPU, in one command. Run from the repository root on a
# machine with an NVIDIA GPU, CUDA torch and Triton:
#
#     bash bench/nvidia/gpu_check.sh OUTDIR [STEP...]
#
# Steps (default: all, in this order):
#   env          nvidia-smi, torch / triton / CUDA versions                          -> OUTDIR/env.txt
#   info         hal info --json                                                       -> OUTDIR/hal-info.json
#   conformance  the conformance kit against the nvidia backend, as a third party runs it
#                (pytest -p hal.testing.plugin), once with the Triton quantizer and once more for
#                quantize_fp8 with the CUDA C one (HAL_NVIDIA_QUANT_IMPL=cuda)        -> OUTDIR/conformance*.xml
#   run          hal run --json on nvidia and on cpu (fp32), greedy tokens compared;
#                nvidia in bfloat16 and with --quantize fp8                            -> OUTDIR/run-*.json
#
# HAL must be importable with its entry points (pip install -e . or a wheel on PYTHONPATH). HAL_PYTHON picks
# the interpreter (default python3). The script stops at nothing: each step's status is printed at the end,
# and the exit status is 1 when any step failed.
set -u
OUT=${1:?usage: bash bench/nvidia/gpu_check.sh OUTDIR [STEP...]}
shift
STEPS=${*:-env info conformance run}
PY=${HAL_PYTHON:-python3}
mkdir -p "$OUT"
unset TRITON_INTERPRET HAL_BACKEND HAL_DISABLE_PLUGINS
export PYTHONUNBUFFERED=1
declare -A STATUS
hal() { "$PY" -c 'import sys; from hal.cli import main; sys.exit(main())' "$@"; }

step_env() {
    { date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
      "$PY" -c 'import torch, triton, platform; p = torch.cuda.get_device_properties(0)
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("device", p.name, "sm_%d%d" % (p.major, p.minor), "SMs", p.multi_processor_count, "GiB", round(p.total_memory / 2**30, 1))'
      command -v nvcc >/dev/null && nvcc --version | tail -2; } 2>&1 | tee "$OUT/env.txt"
}

step_info() { hal info --json >"$OUT/hal-info.json" && hal info --backend nvidia; }

step_conformance() {
    local dir rc=0
    dir=$(mktemp -d)
    printf 'from hal.testing.suite import *  # noqa: F403\n' >"$dir/test_kit.py"
    # -c /dev/null: no project conftest (it turns Triton's interpreter on); the kit's plugin only.
    (cd "$dir" && "$PY" -m pytest -c /dev/null -p hal.testing.plugin -p no:cacheprovider --hal-backend nvidia \
        -q -rfE --junitxml="$OUT/conformance.xml" test_kit.py) 2>&1 | tee "$OUT/conformance.log" | tail -40
    rc=${PIPESTATUS[0]}
    (cd "$dir" && HAL_NVIDIA_QUANT_IMPL=cuda "$PY" -m pytest -c /dev/null -p hal.testing.plugin -p no:cacheprovider \
        --hal-backend nvidia -q -rfE -k "quantize_fp8 or runtime" --junitxml="$OUT/conformance-cuda-quant.xml" \
        test_kit.py) 2>&1 | tee "$OUT/conformance-cuda-quant.log" | tail -15
    [ "${PIPESTATUS[0]}" -eq 0 ] && [ "$rc" -eq 0 ]
}

step_run() {
    local common=(run --batch 4 --max-new-tokens 32 --seed 0 --json -q)
    hal "${common[@]}" --backend cpu --dtype float32 >"$OUT/run-cpu-fp32.json" || return 1
    hal "${common[@]}" --backend nvidia --dtype float32 >"$OUT/run-nvidia-fp32.json" || return 1
    hal "${common[@]}" --backend nvidia --dtype bfloat16 >"$OUT/run-nvidia-bf16.json" || return 1
    hal "${common[@]}" --backend nvidia --dtype bfloat16 --quantize fp8 >"$OUT/run-nvidia-fp8.json" || return 1
    "$PY" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
runs = {k: json.load(open(f"{out}/run-{k}.json")) for k in ("cpu-fp32", "nvidia-fp32", "nvidia-bf16", "nvidia-fp8")}
ref = runs["cpu-fp32"]["tokens"]
for k, r in runs.items():
    same = sum(a == b for x, y in zip(r["tokens"], ref) for a, b in zip(x, y))
    total = sum(len(x) for x in ref)
    print(f"{k:12s} backend={r['backend']:7s} tokens equal to cpu fp32: {same}/{total}  "
          f"decode {r['decode_tokens_per_s']:.1f} tok/s  first: {r['tokens'][0][:8]}")
sys.exit(0 if runs["nvidia-fp32"]["tokens"] == ref else 1)
EOF
}

for s in $STEPS; do
    echo "=== $s"
    if "step_$s"; then STATUS[$s]=ok; else STATUS[$s]=FAILED; fi
done
echo "=== summary"
rc=0
for s in $STEPS; do echo "$s: ${STATUS[$s]}"; [ "${STATUS[$s]}" = ok ] || rc=1; done
exit $rc
