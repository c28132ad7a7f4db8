#!/usr/bin/env bash
# The GPU checks in one short script (under 5 minutes on an H100/H200), for a machine lent by the
# device tool: the tests that run only on CUDA, the engines' equality tests on CUDA, and the
# cross-device benchmark (sequential vs vmap vs centralized, seconds per round and ratios).
# Writes its logs to $OUT (the device tool's folder) or ./gpu_check.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check}"
mkdir -p "$OUT"
[ -x .venv/bin/python ] || ./setup.sh > "$OUT/setup.log" 2>&1
PY=.venv/bin/python
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name())" \
  | tee "$OUT/device.txt" || exit 1
status=0
# mixed precision (CUDA only) and the vmap engine's equality with the sequential one, on CUDA
timeout 150 $PY -m pytest -q -x -k cuda tests/test_client_trainer.py tests/test_engine_vmap.py 2>&1 | tee "$OUT/tests.log" || status=1
timeout 150 $PY benchmarks/cross_device.py --device cuda --rounds 3 --repeats 3 2>&1 | tee "$OUT/cross_device.txt" || status=1
exit $status
