#!/usr/bin/env bash
# GPU benchmark: one NVIDIA GPU, JAX (and PyTorch) installed, TensorFlow not.
#
# Measures, side by side in one run: bf16 + jit + large fixed batches (the classifier's GPU path)
# against fp32 model.predict at batch 32, and DICOM folder to result for a 300-slice 512x512
# series. Writes bench/results/<machine>.json (BENCH_MACHINE, default gpu-<GPU name>).
# Goals on one H100: >= 3,000 slices/s steady state; folder to result < 1.5 s.
#
# The GPU machine has no package index. Missing pure-Python packages (keras and its helpers,
# pydicom, highdicom, typer, ...) are installed from a local wheel folder, bench/wheels/ or
# $WHEELS_DIR. Fill it on a machine with internet access, for the GPU machine's Python version:
#
#   pip download --dest bench/wheels --only-binary=:all: \
#       --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       keras namex optree rich absl-py ml-dtypes h5py packaging pydicom highdicom pillow \
#       pillow-jpls pyjpegls pylibjpeg pylibjpeg-libjpeg pylibjpeg-rle typer
#
# (h5py, pillow, ml-dtypes, optree and the codecs are binary wheels: --python-version and
# --platform must match the GPU machine.) Nothing else is downloaded; the run takes < 5 minutes.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS_DIR=${WHEELS_DIR:-bench/wheels}
export KERAS_BACKEND=jax
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # ctcovid from this tree; no TensorFlow pulled in
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL=2

# module to import -> distribution to install when it is missing
modules=(keras:keras namex:namex optree:optree rich:rich absl:absl-py ml_dtypes:ml-dtypes
         h5py:h5py pydicom:pydicom highdicom:highdicom PIL:pillow scipy:scipy typer:typer
         pylibjpeg:pylibjpeg)
missing=()
for pair in "${modules[@]}"; do
  "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair##*:}")
done
if ((${#missing[@]})); then
  if [[ ! -d $WHEELS_DIR ]]; then
    echo "missing packages: ${missing[*]}; put their wheels in $WHEELS_DIR (see the top of $0)" >&2
    exit 1
  fi
  echo "installing from $WHEELS_DIR: ${missing[*]}"
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS_DIR" "${missing[@]}"
fi

"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' || true)
export BENCH_MACHINE=${BENCH_MACHINE:-gpu-${gpu_name:-unknown}}
# Large fixed batches on the GPU; decode threads feed it from the CPU cores.
export BENCH_GPU_BATCH=${BENCH_GPU_BATCH:-256}
export BENCH_GPU_SLICES=${BENCH_GPU_SLICES:-4096}
export BENCH_REPEATS=${BENCH_REPEATS:-3}

exec timeout "${BENCH_TIMEOUT_S:-290}" "$PYTHON" bench/run.py --sections gpu "$@"
