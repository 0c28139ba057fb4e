#!/usr/bin/env bash
# One prepared run for a machine with a CUDA GPU (about 6 minutes): GPU tests, then the benchmark at 10^5 and
# 10^6 names x 21 templates with the GPU methods beside the CPU dense baseline, then the text encoder on
# CUDA. Fails soft: every step has its own timeout, its exit status goes to steps.tsv, later steps run
# regardless.
#
# Packages: if a folder .whl/ holds wheels (for a machine with no package index: faiss-cpu, open_clip_torch,
# ftfy, wcwidth, lmdb, names), they are installed into /tmp/site without their dependencies, and the project
# itself beside them; otherwise the project must already be importable.
# Output: benchmarks/results/gpu-<host>/; with $OUT set (the device runner), everything also goes into
# $OUT/gpu-results.tar.gz (that runner brings back only a few files).
set -u
cd "$(dirname "$0")/.."
export DEST="benchmarks/results/gpu-$(hostname)"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
# A step that runs out of time gets SIGABRT first, and faulthandler prints where every thread was.
export PYTHONFAULTHANDLER=1
STEPS="$DEST/steps.tsv"
printf 'step\texit\tseconds\n' > "$STEPS"

step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi  # ONLY="step step ..." runs those
    local start=$SECONDS
    timeout -s ABRT --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STEPS"
    echo "[$name] exit $rc after $((SECONDS - start)) s"
}

if ls .whl/*.whl > /dev/null 2>&1; then
    step install 60 bash -c "'$PY' -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && '$PY' -m pip install -q --no-index --no-deps \
        --no-build-isolation --no-compile --target /tmp/site ."
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
step versions 30 "$PY" -c "import torch, faiss, open_clip, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); print('faiss', faiss.__version__, 'GPUs seen by faiss', faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0); print('open_clip', open_clip.__version__, 'numpy', numpy.__version__)"
step nvidia-smi 10 nvidia-smi
step gpu-tests 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$DEST/gpu-tests.xml"
step bench-1e5 150 "$PY" -m idia_engine.cli.app bench --device cuda --size 100000 --persons 10 \
    --methods dense,flat,ensemble,cells,dense-gpu,flat-gpu --member-fraction 0.5 --out "$DEST/bench-1e5" --quiet
step bench-1e6 180 "$PY" -m idia_engine.cli.app bench --device cuda --size 1000000 --persons 10 \
    --methods dense,flat,dense-gpu,flat-gpu --out "$DEST/bench-1e6" --quiet
step text-encoder 60 "$PY" - <<'PYEOF'
import json, os
from idia_engine.benchmarks.run import text_encoder_bench
res = text_encoder_bench(2048, "cuda")
print(json.dumps({k: v["prompts_per_s"] for k, v in res["results"].items()}, indent=1))
open(os.path.join(os.environ["DEST"], "text_encoder_cuda.json"), "w").write(json.dumps(res, indent=2))
PYEOF
cat "$STEPS"
if [ -n "${OUT:-}" ]; then
    tar czf "$OUT/gpu-results.tar.gz" -C "$(dirname "$DEST")" "$(basename "$DEST")"
    cp "$STEPS" "$OUT/"
fi
