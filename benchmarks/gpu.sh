#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU (<= 8 minutes): GPU tests, then the benchmark at 10^5 and
# 10^6 names x 21 templates on the GPU, then the text encoder on CUDA. Fails soft: every step has its own
# timeout, its exit status is recorded in steps.tsv, and later steps run regardless.
# Output: $OUT if set (the device runner's folder), else benchmarks/results/gpu-<host>.
set -u
cd "$(dirname "$0")/.."
export DEST="${OUT:-benchmarks/results/gpu-$(hostname)}"
mkdir -p "$DEST"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
STEPS="$DEST/steps.tsv"
printf 'step\texit\tseconds\n' > "$STEPS"

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS"
    echo "[$name] exit $rc after $((SECONDS - start)) s"
}

# Install only if the package is not importable (nothing beyond the project itself).
"$PY" -c "import idia_engine.benchmarks" 2>/dev/null || step install 120 "$PY" -m pip install -q -e .
step nvidia-smi 10 nvidia-smi
step gpu-tests 90 "$PY" -m pytest -q -m gpu --junitxml="$DEST/gpu-tests.xml"
# 10^5: every method; 10^6: rows are generated on the CPU (~5-10 s per template), so GPU and exact methods only.
step bench-1e5 150 "$PY" -m idia_engine.cli.app bench --device cuda --size 100000 --persons 10 \
    --out "$DEST/bench-1e5" --quiet
step bench-1e6 240 "$PY" -m idia_engine.cli.app bench --device cuda --size 1000000 --persons 10 \
    --methods dense,flat,flat-gpu,dense-gpu --out "$DEST/bench-1e6" --quiet
step text-encoder 60 "$PY" - <<'EOF'
import json, os
from idia_engine.benchmarks.run import text_encoder_bench
res = text_encoder_bench(2048, "cuda")
print(json.dumps({k: v["prompts_per_s"] for k, v in res["results"].items()}, indent=1))
open(os.path.join(os.environ["DEST"], "text_encoder_cuda.json"), "w").write(json.dumps(res, indent=2))
EOF
cat "$STEPS"
