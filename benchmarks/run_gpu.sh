#!/usr/bin/env bash
# Every GPU figure of issue 10, on a machine with an NVIDIA GPU (compute capability >= 8.0) and the CUDA build of
# torch (the project pins 2.13.0; another version runs with a warning), from the repository root or anywhere:
#
#     bash benchmarks/run_gpu.sh                # every stage below, in order (about 15-20 minutes if the targets hold)
#     bash benchmarks/run_gpu.sh STAGE [ARGS]   # one stage; ARGS go to its script (e.g. layers --shapes 4096x11008)
#
# Stages (each one command, each meant to end well inside 10 minutes; durations are estimates, nothing has been
# measured on a GPU yet):
#   tests       the CUDA tests (~3 min): tests/test_backends.py, test_discrete_kernel.py (the fused walk compiled,
#               against the loop and the reference), test_armor_linear.py (2:4 core, decode graphs),
#               test_compress.py, test_cli.py, test_hf.py -> results/gpu_tests.json
#   tests-all   the whole suite on the GPU machine (~4 min) -> results/gpu_tests.json
#   layers      gpu_factorize.py layers: 4096x4096 (+ one sweep with the loop walk), 11008x4096, 4096x11008
#               (~4-6 min) -> results/gpu_factorize.json
#   block-attn  gpu_factorize.py block-attn: q, k, v, o of a Llama-2-7B block (~2 min) -> same JSON
#   block-mlp   gpu_factorize.py block-mlp: gate, up, down (~2-3 min) -> same JSON
#   inference   gpu_inference.py (~2 min) -> results/gpu_inference.json
#   counts      discrete_step_counts.py with the real kernel on the GPU (~1 min) -> results/discrete_step_counts_gpu.json
#   memory      the memory model against tracemalloc (CPU, ~10 s) -> results/memory_model_cpu.json
#   smoke       on a CPU: the fused-walk tests under Triton's interpreter and every script in --smoke mode (~2 min)
#
# The stages of gpu_factorize.py add to one JSON (a shape or layer run again replaces its row). Each Python run is
# stopped after STAGE_TIMEOUT seconds (default 560) so that what it wrote is kept; if $OUT is set (the device tool),
# every results file this script wrote is copied there at the end. Nothing is installed: a missing package is named
# with the command that installs it (pip install -e '.[hf,test,gpu]' where a network is reachable).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET ARMOR_FUSED_WALK  # the kernel compiled for the GPU, chosen by the device
PY="${PYTHON:-python3}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-560}"
RESULTS=benchmarks/results
stage="${1:-all}"
[ $# -gt 0 ] && shift

copy_out() {
    if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
        cp "$RESULTS"/gpu_*.json "$RESULTS"/discrete_step_counts_gpu.json "$RESULTS"/memory_model_cpu.json "$OUT"/ \
            2>/dev/null || true
    fi
}
trap copy_out EXIT

need() {  # need MODULE... : fail with the install command unless every module imports
    if ! "$PY" -c "import $(IFS=,; echo "$*")" 2>/dev/null; then
        echo "run_gpu.sh: missing one of: $* (pip install -e '.[hf,test,gpu]' with the CUDA build of torch)" >&2
        exit 2
    fi
}

check_gpu() {
    need torch triton numpy scipy safetensors click threadpoolctl
    "$PY" - <<'EOF' || exit 2
import sys
import torch
import triton
if not torch.cuda.is_available():
    sys.exit(f"run_gpu.sh: torch {torch.__version__} sees no CUDA GPU; install the CUDA build of torch 2.13.0 first")
if not torch.__version__.startswith("2.13.0"):
    print(f"run_gpu.sh: warning, torch {torch.__version__} (the project pins 2.13.0)", file=sys.stderr)
print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"triton {triton.__version__}")
EOF
}

py() {  # a Python run under the stage time limit
    timeout --signal=INT --kill-after=20 "$STAGE_TIMEOUT" "$PY" "$@"
}

run_tests() {  # arguments: pytest selection
    need pytest hypothesis transformers tokenizers
    py -m pytest -q -rs -p no:cacheprovider --junitxml="$RESULTS/gpu_tests.xml" "$@"
    local status=$?
    "$PY" - "$RESULTS/gpu_tests.xml" "$RESULTS/gpu_tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
import torch, triton
suite = ET.parse(sys.argv[1]).getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
cases = []
for case in suite.iter("testcase"):
    outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                  "message": next((c.get("message", "")[:300] for c in case if c.tag != "system-out"), "")})
summary = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")}
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
report = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
          "summary": summary, "seconds": float(suite.get("time", 0)),
          "not_passed": [c for c in cases if c["outcome"] != "passed"]}
json.dump(report, open(sys.argv[2], "w"), indent=1)
print(json.dumps(summary))
EOF
    rm -f "$RESULTS/gpu_tests.xml"
    return $status
}

CUDA_TESTS=(tests/test_backends.py tests/test_discrete_kernel.py tests/test_armor_linear.py tests/test_compress.py
            tests/test_cli.py tests/test_hf.py)

run_stage() {
    local name="$1"
    shift
    echo "== $name =="
    case "$name" in
        tests) check_gpu && run_tests "${CUDA_TESTS[@]}" "$@" ;;
        tests-all) check_gpu && run_tests "$@" ;;
        layers | block-attn | block-mlp) check_gpu && py benchmarks/gpu_factorize.py "$name" "$@" ;;
        inference) check_gpu && py benchmarks/gpu_inference.py "$@" ;;
        counts) check_gpu && py benchmarks/discrete_step_counts.py --device cuda --real-kernel \
            --shapes 1024x1024,512x2048 --out "$RESULTS/discrete_step_counts_gpu.json" "$@" ;;
        memory) py benchmarks/gpu_factorize.py memory "$@" ;;
        smoke)
            local tmp="${TMPDIR:-/tmp}/armor_gpu_smoke"
            mkdir -p "$tmp"
            py -m pytest -q -p no:cacheprovider tests/test_discrete_kernel.py tests/test_armor_linear.py &&
                TRITON_INTERPRET=1 ARMOR_FUSED_WALK=1 py benchmarks/gpu_factorize.py layers --smoke \
                    --out "$tmp/gpu_factorize.json" &&
                TRITON_INTERPRET=1 ARMOR_FUSED_WALK=1 py benchmarks/gpu_factorize.py block-mlp --smoke \
                    --out "$tmp/gpu_factorize.json" &&
                py benchmarks/gpu_inference.py --smoke --out "$tmp/gpu_inference.json" &&
                echo "smoke results in $tmp/"
            ;;
        *)
            echo "usage: bash benchmarks/run_gpu.sh [all|tests|tests-all|layers|block-attn|block-mlp|inference|counts|memory|smoke] [script arguments]" >&2
            return 2
            ;;
    esac
}

if [ "$stage" = all ]; then
    status=0
    for s in tests layers block-attn block-mlp inference; do
        run_stage "$s" || status=$?
    done
    exit $status
fi
run_stage "$stage" "$@"
