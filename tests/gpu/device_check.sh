#!/usr/bin/env bash
# Run tests/gpu on a machine with an NVIDIA GPU and CUDA's nvcc but no network (the device tool's machines):
# install carried wheels, build pycuda from its source archive with that nvcc, run the GPU tests.
#   tests/gpu/device_check.sh WHEEL_DIR [OUT_DIR]
# WHEEL_DIR holds pycuda-*.tar.gz and wheels for pytools, platformdirs, mako, siphash24, pydicom
# (see README.md, "GPU checks").
set -euo pipefail
whl=${1:-.whl}
out=${2:-${OUT:-/tmp}}
export PYTHONUNBUFFERED=1
site=/tmp/edged-site
mkdir -p "$site" "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl
export PYTHONPATH="$site:$PWD"

nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
cuda_root=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
echo "nvcc: $("$nvcc" --version | tail -1); CUDA root: $cuda_root"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

src=/tmp/pycuda-src
rm -rf "$src" /tmp/pycuda-wheel && mkdir -p "$src"
tar xzf "$whl"/pycuda-*.tar.gz -C "$src" --strip-components=1
t0=$(date +%s)
if ! (cd "$src" \
      && python3 configure.py --cuda-root="$cuda_root" \
           --cudadrv-lib-dir="$cuda_root/lib64/stubs,$cuda_root/lib64,$cuda_root/targets/x86_64-linux/lib/stubs" \
      && python3 -m pip wheel --no-build-isolation --no-deps --no-index -w /tmp/pycuda-wheel .) \
      > "$out/pycuda-build.log" 2>&1; then
    tail -40 "$out/pycuda-build.log"
    exit 1
fi
echo "pycuda built from source in $(( $(date +%s) - t0 )) s"
python3 -m pip install -q --no-index --no-deps --target "$site" /tmp/pycuda-wheel/pycuda-*.whl
python3 -c "import pycuda.driver as c; c.init(); d=c.Device(0); print('pycuda sees', d.name(), 'sm', d.compute_capability())"
python3 -m pytest -p no:cacheprovider tests/gpu -v -rs 2>&1 | tee "$out/gpu-tests.log"
