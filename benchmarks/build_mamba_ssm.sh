#!/usr/bin/env bash
# Builds wheels of mamba-ssm and causal-conv1d (their PyPI releases are source archives only) for one
# GPU architecture, so that `bench --peers mamba-ssm` can time mamba-ssm's own
# `MambaLMHeadModel.generate(cg=True)` beside our engine. The wheels are tied to the exact torch and
# CPython they are built against: build them for the GPU machine's torch, either on that machine or on
# any machine with nvcc of the same CUDA major (a CPU machine needs no GPU to compile).
#   bash benchmarks/build_mamba_ssm.sh OUTDIR
# Env:
#   PYTHON   interpreter of the target's Python version (default python3)
#   TORCH    pip requirement installed into a fresh build venv first, e.g. torch==2.11.0 (a CUDA build
#            from PyPI, several GB with its CUDA libraries); empty: build with PYTHON's own torch
#   ARCH     compute capability to build for, without the dot (default 90: H100 / H200)
#   MAX_JOBS parallel nvcc jobs (default: the CPU count)
#   MAMBA, CONV  versions (default 2.3.2.post1, 1.7.0)
#   CUDA_HOME the CUDA toolkit (default: found from nvcc)
# Timings seen: on the 16-core H200 box ~7 min and ~3 min; on a 2-core CPU machine with CUDA 13.0,
# see benchmarks/NOTES.md.
set -euo pipefail
OUTDIR=$(mkdir -p "${1:?usage: build_mamba_ssm.sh OUTDIR}" && cd "$1" && pwd)
PY=${PYTHON:-python3}
ARCH=${ARCH:-90}
MAMBA=${MAMBA:-2.3.2.post1}
CONV=${CONV:-1.7.0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if [ -n "${TORCH:-}" ]; then
  "$PY" -m venv "$WORK/venv"
  PY="$WORK/venv/bin/python"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$TORCH" ninja packaging setuptools wheel
fi
"$PY" -c 'import torch; print("building against torch", torch.__version__, "CUDA", torch.version.cuda)'
# torch finds the toolkit from CUDA_HOME, else from `which nvcc`: a wrapper script on the PATH
# (as on some machines) then points it at a folder without CUDA's headers.
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(ls -d /usr/local/cuda/bin/nvcc 2>/dev/null || command -v nvcc)")")")}
echo "CUDA_HOME=$CUDA_HOME"
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
for spec in "causal-conv1d==$CONV" "mamba-ssm==$MAMBA"; do
  name=${spec%%==*}
  mkdir -p "$WORK/src"
  # The source archive straight from the index (pip's own download would run setup.py to read
  # metadata, which already wants torch and nvcc).
  archive=$("$PY" - "$name" "${spec##*==}" "$WORK/src" <<'EOF'
import json, sys, urllib.request
name, version, dest = sys.argv[1:]
files = json.load(urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json"))["releases"][version]
sdist = next(f for f in files if f["packagetype"] == "sdist")
urllib.request.urlretrieve(sdist["url"], f"{dest}/{sdist['filename']}")
print(f"{dest}/{sdist['filename']}")
EOF
)
  tar xzf "$archive" -C "$WORK/src"
  dir=${archive%.tar.gz}
  # The setup scripts compile for eight architectures; one is what a benchmark machine runs, and it
  # cuts the build time by that factor. The list is replaced just before the build flags are made.
  "$PY" - "$dir/setup.py" "$ARCH" <<'EOF'
import re, sys
path, arch = sys.argv[1], sys.argv[2]
text = open(path).read()
anchor = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
assert anchor in text, "setup.py changed: the architecture list cannot be cut"
line = f'    cc_flag = [f for f in cc_flag if "arch=" not in f and f != "-gencode"] + ["-gencode", "arch=compute_{arch},code=sm_{arch}"]\n'
open(path, "w").write(text.replace(anchor, line + anchor, 1))
EOF
  start=$(date +%s)
  (cd "$dir" && "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$OUTDIR")
  echo "$name built in $(( $(date +%s) - start )) s"
done
# Debug information is most of each extension (causal-conv1d: 40 MB of .so, 29 MB without): strip
# it, so that the wheels fit what a call to the GPU machine can carry.
for whl in "$OUTDIR"/*.whl; do
  rm -rf "$WORK/unpack" && mkdir -p "$WORK/unpack"
  "$PY" -m wheel unpack -d "$WORK/unpack" "$whl" > /dev/null
  find "$WORK/unpack" -name '*.so' -exec strip --strip-debug {} +
  "$PY" -m wheel pack -d "$OUTDIR" "$WORK/unpack"/* > /dev/null
done
ls -la "$OUTDIR"
