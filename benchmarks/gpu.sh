#!/usr/bin/env bash
# The GPU path, proved or disproved in one run on a machine with one CUDA GPU:
#
#     bash benchmarks/gpu.sh [WHEEL_FOLDER]
#
# 1. installs the Python packages the image lacks (deepspeed, datasets, wandb, ...): from
#    WHEEL_FOLDER when given (pip --no-index), else from the package registry; then this project
#    (editable, without dependencies, so the image's CUDA build of torch stays);
# 2. runs tests/test_cuda.py and tests/test_kernels.py on the GPU;
# 3. benchmarks/attention.py in bfloat16, 8 heads x 64 and 12 x 64, from 32K tokens doubling
#    until memory or time runs out: dilated against dense flash attention, forward and
#    forward+backward, TFLOP/s, peak memory; and the plot of both (with the CPU run's
#    benchmarks/attention-cpu.json when it exists);
# 4. benchmarks/lm_throughput.py: the 125M LongNet LM's training tokens/s at 32K against dense
#    attention, and the longest context it trains with activation checkpointing;
# 5. with the time left, the same attention benchmark on backend="triton" (the Triton kernels,
#    not yet measured on a GPU), 8 x 64 and 12 x 64 heads: forward and forward+backward TFLOP/s
#    on computed pairs, beside dense flash attention at the lengths where that still runs, and a
#    plot with the default backend's 8 x 64 run; these rows do not change the exit status;
# 6. prints one table (benchmarks/gpu_report.py) and writes everything to
#    benchmarks/results/gpu-<time>/, report.json included.
# Everything, installs included, takes at most 10 minutes (each step has a time limit); a step
# that fails or runs out of time leaves a row saying so. Exit status: 0 when the tests passed and every result was written,
# 1 otherwise, 2 (at once, nothing installed) without a CUDA GPU. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${1:-}
START=$SECONDS  # the installs count too: the whole run fits one 10-minute device call

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "benchmarks/gpu.sh: $PYTHON cannot import torch; install torch's CUDA build first" >&2
    exit 2
fi
if ! "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "benchmarks/gpu.sh: no CUDA GPU (torch.cuda.is_available() is False in $PYTHON," \
        "torch $("$PYTHON" -c 'import torch; print(torch.__version__)')); nothing was run" >&2
    exit 2
fi

missing=$("$PYTHON" - <<'EOF'
import importlib.util

needed = {  # setup.cfg's install_requires and train and test extras
    "einops": "einops", "deepspeed": "deepspeed", "datasets": "datasets",
    "pyarrow": "pyarrow", "numpy": "numpy", "wandb": "wandb", "tokenizers": "tokenizers",
    "tqdm": "tqdm", "yaml": "pyyaml", "pydantic": "pydantic", "matplotlib": "matplotlib",
    "safetensors": "safetensors", "huggingface_hub": "huggingface_hub", "pytest": "pytest",
    "pytest_timeout": "pytest-timeout", "psutil": "psutil", "tiktoken": "tiktoken",
}
print(" ".join(p for m, p in needed.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "installing: $missing"
    # DeepSpeed ships as a source archive whose build imports torch: without build isolation
    # it builds against the installed CUDA torch instead of downloading another one.
    if [ -n "$WHEELS" ]; then
        "$PYTHON" -m pip install -q --no-build-isolation --no-index --find-links "$WHEELS" $missing
    else
        "$PYTHON" -m pip install -q --no-build-isolation $missing
    fi || echo "benchmarks/gpu.sh: could not install all of: $missing (continuing)" >&2
fi
if ! "$PYTHON" -c "import longnet.distributed, longnet.launch" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
        || { echo "benchmarks/gpu.sh: could not install this project" >&2; exit 1; }
fi

RESULTS=benchmarks/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"
# Runs a step for at most $1 seconds, less when the 10 minutes would be overrun.
step() {
    local limit=$1 left=$((570 - (SECONDS - START)))
    shift
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -lt 10 ] && { echo "skipped (out of time): $*"; return 124; }
    echo "== $* (at most ${limit} s)"
    timeout --kill-after=10 "$limit" "$@"
}

step 210 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py \
    2>&1 | tee "$RESULTS/tests.log"
tests_status=${PIPESTATUS[0]}

SEQ_LENS=$("$PYTHON" -c "print(','.join(str(1 << k) for k in range(15, 27)))")  # 32K .. 64M
attention=()
# heads, seconds before no new length starts, hard limit. Dense stops after the first length
# whose forward+backward took over 4 s (about 1M tokens at 8 heads).
for run in "8 70 110" "12 60 100"; do
    read -r heads budget limit <<<"$run"
    json=$RESULTS/attention-cuda-${heads}x64.json
    attention+=("$json")
    step "$limit" "$PYTHON" benchmarks/attention.py --device cuda --dtype bfloat16 \
        --heads "$heads" --head-dim 64 --seq-lens "$SEQ_LENS" --repeats 2 --time-budget 10 \
        --dense-time-limit 4 --total-budget "$budget" --json "$json"
done
plotted=()
for json in "${attention[@]}" benchmarks/attention-cpu.json; do
    [ -f "$json" ] && plotted+=("$json")
done
[ ${#plotted[@]} -gt 0 ] \
    && "$PYTHON" benchmarks/plot_attention.py "${plotted[@]}" --out "$RESULTS/attention.png"

step 120 "$PYTHON" benchmarks/lm_throughput.py --device cuda --dtype bfloat16 \
    --preset longnet-125m --seq-len 32768 --time-budget 60 --json "$RESULTS/lm_throughput.json"

# backend="triton" (each kernel variant compiles on the first length, cached after).
triton_runs=()
for run in "8 40 80" "12 30 70"; do
    read -r heads budget limit <<<"$run"
    json=$RESULTS/attention-triton-cuda-${heads}x64.json
    plot=()
    [ "$heads" = 8 ] && [ -f "${attention[0]}" ] \
        && plot=(--plot "$RESULTS/attention-triton.png" --plot-with "${attention[0]}")
    step "$limit" "$PYTHON" benchmarks/attention.py --backend triton --device cuda \
        --dtype bfloat16 --heads "$heads" --head-dim 64 --seq-lens "$SEQ_LENS" --repeats 2 \
        --time-budget 10 --dense-time-limit 4 --total-budget "$budget" --json "$json" "${plot[@]}"
    [ -f "$json" ] && triton_runs+=("$json")
done

"$PYTHON" benchmarks/gpu_report.py --tests-log "$RESULTS/tests.log" --tests-status "$tests_status" \
    --attention "${attention[@]}" "${triton_runs[@]}" --lm "$RESULTS/lm_throughput.json" \
    --json "$RESULTS/report.json"
echo "results in $RESULTS ($((SECONDS - START)) s)"
[ "$tests_status" -eq 0 ] && [ -f "$RESULTS/lm_throughput.json" ] \
    && [ -f "${attention[0]}" ] && [ -f "${attention[1]}" ]
