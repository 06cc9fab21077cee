#!/usr/bin/env bash
# The GPU suite, as run through the device tool (see docs/benchmarks.md for results):
#   bash tests/gpu/run_gpu_suite.sh [pytest args...]
# Installs the server-side wheels carried in .whl/ (see ../shared/tools/device-wheels.sh)
# when present, then runs every GPU test and the CPU-equivalent kernel tests on CUDA.
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -p no:cacheprovider --noconftest tests/gpu tests/test_triton_kernels.py tests/test_triton_kernels_gemv.py \
  tests/test_triton_kernels_qk_norm_rotary.py tests/test_triton_kernels_kv_write.py tests/test_triton_kernels_masked_argmax.py tests/test_sampler.py tests/test_cascade_attention.py tests/test_quant_kernels.py \
  tests/test_triton_kernels_moe_routing.py tests/test_triton_kernels_moe_small_batch.py "$@"
