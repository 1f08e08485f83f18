#!/usr/bin/env bash
# The prepared GPU check (docs/benchmarks.md, "GPU"): run from a copy of the repository on a CUDA machine,
#
#     bash benchmarks/gpu.sh
#
# 1. setup: uses a Python where vlmo, pytest and transformers import and torch sees CUDA; otherwise makes a venv
#    outside the tree ($VLMO_GPU_VENV, with the system's packages visible) and `pip install -e ".[test]"` with the
#    torch wheel pip finds by default (the CUDA build on Linux); prints nvidia-smi, torch and CUDA;
# 2. the CUDA tests: `pytest -q -m cuda` (tests/test_cuda.py: CPU parity, 16-bit answers, batches, boxes);
# 3. the CUDA benchmark: benchmarks/bench.py --device cuda on PaliGemma-3B shapes (checkpoint written bfloat16,
#    drawn on the GPU), vlmo-bfloat16 against hf-bfloat16;
# 4. a summary. Results and logs go to $OUT when it is set (the device tool returns what is written there), else
#    the JSON to benchmarks/results/paligemma-3b-cuda.json and the logs to a temporary folder.
#
# Everything fits $GPU_CHECK_BUDGET seconds (default 470): each step has its own `timeout`, cut to what is left.
# Exit status: 0 when every step passed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
BUDGET=${GPU_CHECK_BUDGET:-470}
VENV=${VLMO_GPU_VENV:-/tmp/vlmo-gpu-venv}
PY=${PYTHON:-$(command -v python3 || command -v python || echo python3)}
if [ -n "${OUT:-}" ]; then
    RESULTS=$OUT
    JSON=$OUT/paligemma-3b-cuda.json
else
    RESULTS=$(mktemp -d /tmp/vlmo-gpu-check.XXXXXX)
    JSON=benchmarks/results/paligemma-3b-cuda.json
fi
mkdir -p "$RESULTS"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
declare -A STATUS=([setup]="not run" [tests]="not run" [bench]="not run")
declare -A TOOK=([setup]=0 [tests]=0 [bench]=0)
FAILED=0

left() { echo $((BUDGET - SECONDS)); }

# within CAP CMD...: run CMD with `timeout`, CAP seconds at most and never past the budget.
within() {
    local cap=$1 t
    shift
    t=$(left)
    ((t < cap)) || t=$cap
    if ((t < 5)); then
        echo "gpu.sh: no time left for: $*" >&2
        return 124
    fi
    timeout -k 10 "$t" "$@"
}

summary() {
    echo
    echo "== summary ($SECONDS s of $BUDGET s) =="
    for step in setup tests bench; do
        printf '%-6s %-40s %4s s\n' "$step" "${STATUS[$step]}" "${TOOK[$step]}"
    done
    [ -f "$JSON" ] && echo "results: $JSON"
    echo "logs:    $RESULTS"
}
trap summary EXIT

ready() {  # vlmo and the test tools import, and torch sees a GPU
    "$1" - <<'EOF' 2>/dev/null
import pytest, torch, transformers, vlmo  # noqa: F401
assert torch.cuda.is_available()
EOF
}

# -- 1. setup ---------------------------------------------------------------------------------------------------
echo "== 1. setup =="
t0=$SECONDS
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu --format=csv ||
    echo "nvidia-smi failed"
if ready "$PY"; then
    STATUS[setup]="ok ($PY as it is)"
elif [ -x "$VENV/bin/python" ] && ready "$VENV/bin/python"; then
    PY=$VENV/bin/python
    STATUS[setup]="ok ($VENV, reused)"
else
    echo "installing vlmo[test] into $VENV (torch: pip's default wheel, the CUDA build) …"
    if { [ -x "$VENV/bin/python" ] || within 60 "$PY" -m venv --system-site-packages "$VENV"; } &&
        within 240 "$VENV/bin/python" -m pip install -q -e ".[test]" >"$RESULTS/setup.log" 2>&1; then
        PY=$VENV/bin/python
        # A CPU-only torch from the system's packages satisfied the requirement: install pip's own build over it.
        if ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then
            echo "torch here is a CPU build: installing pip's default torch into the venv …"
            within 240 "$PY" -m pip install -q --ignore-installed torch >>"$RESULTS/setup.log" 2>&1 || true
        fi
        STATUS[setup]="installed ($VENV)"
    else
        echo "venv install failed (see $RESULTS/setup.log); trying $PY's own site-packages …"
        if PIP_BREAK_SYSTEM_PACKAGES=1 within 240 "$PY" -m pip install -q -e ".[test]" >>"$RESULTS/setup.log" 2>&1
        then
            STATUS[setup]="installed (into $PY)"
        else
            STATUS[setup]="FAILED: pip install (setup.log)"
        fi
    fi
    tail -n 5 "$RESULTS/setup.log" || true
fi
TOOK[setup]=$((SECONDS - t0))
"$PY" - <<'EOF' || echo "(torch does not import, or its CUDA query failed)"
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.device_count()} × {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, "
          f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
if ! ready "$PY"; then
    [[ ${STATUS[setup]} == FAILED* ]] || STATUS[setup]="FAILED: no CUDA in torch or vlmo missing"
    exit 1
fi

# -- 2. the CUDA tests ----------------------------------------------------------------------------------------
echo "== 2. pytest -m cuda =="
t0=$SECONDS
if within 150 "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs 2>&1 | tee "$RESULTS/pytest-cuda.log"; then
    STATUS[tests]="ok: $(tail -n 1 "$RESULTS/pytest-cuda.log")"
    if grep -q "skipped" <(tail -n 1 "$RESULTS/pytest-cuda.log"); then
        STATUS[tests]="FAILED (skips on a GPU): $(tail -n 1 "$RESULTS/pytest-cuda.log")"
        FAILED=1
    fi
else
    rc=${PIPESTATUS[0]}
    STATUS[tests]="FAILED (rc $rc): $(tail -n 1 "$RESULTS/pytest-cuda.log")"
    FAILED=1
fi
TOOK[tests]=$((SECONDS - t0))

# -- 3. the CUDA benchmark ------------------------------------------------------------------------------------
echo "== 3. bench.py --device cuda =="
t0=$SECONDS
RUNS=3
(($(left) >= 240)) || RUNS=1  # a slow setup: one round rather than none
mkdir -p "$(dirname "$JSON")"
if within 320 "$PY" benchmarks/bench.py --size paligemma-3b --checkpoint-dtype bfloat16 --device cuda \
    --modes vlmo-bfloat16,hf-bfloat16 --runs "$RUNS" --new-tokens 32 --out "$JSON" \
    2> >(tee "$RESULTS/bench-cuda.log" >&2) | tee "$RESULTS/bench-cuda.md"; then
    STATUS[bench]="ok ($RUNS rounds)"
else
    rc=${PIPESTATUS[0]}
    STATUS[bench]="FAILED (rc $rc; bench-cuda.log)"
    FAILED=1
fi
TOOK[bench]=$((SECONDS - t0))
exit "$FAILED"
