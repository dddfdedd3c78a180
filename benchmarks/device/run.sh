#!/usr/bin/env bash
# Runs on the GPU machine (see README.md beside this file): installs the carried wheels, then
# benchmarks/gpu_check.py and the GPU tests, logging into $OUT. Step 2 runs whatever step 1 did.
# Caps (seconds; the whole job fits in 10 minutes): GPU_CHECK_TIMEOUT=430, PYTEST_TIMEOUT=120.
cd "$(dirname "$0")/../.." || exit 1
ROOT=$PWD PY=${PY:-python3} SITE=${SITE:-/tmp/site} OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
  || { echo "run.sh: wheel install failed"; exit 1; }
export PYTHONPATH="$SITE:$ROOT" PIPELINE_CACHE_DIR="$ROOT/.device/cache" PYTHONUNBUFFERED=1 \
  HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" - <<'EOF'
import sys, torch, importlib.metadata as md
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print(" ".join(f"{n}={v(n)}" for n in ("transformers", "peft", "bitsandbytes", "accelerate", "huggingface-hub",
      "tokenizers", "safetensors", "datasets", "pyarrow", "fsspec", "numpy", "pandas", "typing-extensions")))
from bitsandbytes.cextension import lib
print("bitsandbytes library:", type(lib).__name__, getattr(getattr(lib, "_lib", None), "_name", ""))
EOF
} 2>&1 | grep -v "kernels-community" | tee "$OUT/env.txt"

timeout -k 15 -s INT "${GPU_CHECK_TIMEOUT:-430}" "$PY" benchmarks/gpu_check.py --budget-min 5.5 \
  --models synthetic_llama_8b synthetic_llama_1b 2>&1 | tee "$OUT/gpu_check.log"
rc1=${PIPESTATUS[0]}
grep '^{"device"' "$OUT/gpu_check.log" > "$OUT/gpu_check.json"
timeout -k 15 -s INT "${PYTEST_TIMEOUT:-120}" "$PY" -m pytest -m gpu -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest_gpu.log"
rc2=${PIPESTATUS[0]}
echo "run.sh: gpu_check exit $rc1, pytest -m gpu exit $rc2 (124: over its cap)"
[ "$rc1" = 0 ] && [ "$rc2" = 0 ]
