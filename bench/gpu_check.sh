#!/usr/bin/env bash
# GPU verification of moe-cluster (`make gpu-check`): install, every CUDA test, then one measuring run (JSON).
# On a Linux machine with one NVIDIA GPU, from the project root:
#
#     make gpu-check                # or: bash bench/gpu_check.sh; OUT=dir for the results (default tmp/gpu-check)
#
# 1. Installs tmp/gpu-venv (gitignored, reused on reruns): torch==2.13.0 from the default index (the CUDA
#    build on a GPU machine; for another CUDA add --index-url https://download.pytorch.org/whl/cuXYZ), then
#    the project with its test and gpu extras.
# 2. Runs every test that needs CUDA; a skip counts as a failure here. Failed tests are rerun alone.
# 3. bench/gpu_measure.py: engine vs transformers generate (bf16, ~1B qwen3_moe, 32 x 128 tokens), CUDA graphs
#    on vs off, served (bench/serve_bench.py --device cuda: router + 2 workers on this GPU) vs in-process,
#    greedy parity GPU bf16 vs CPU fp32 on the demo model. JSON on stdout and in $OUT/results.json.
# Exit status 0 only if every test passed, no part raised and every check held. Budget: under 9 minutes on an
# H100-class machine with a warm pip cache.
set -euo pipefail
OUT=${OUT:-tmp/gpu-check}
VENV=${VENV:-tmp/gpu-venv}
PY=$VENV/bin/python
[ -f pyproject.toml ] && [ -d cluster ] || { echo "run this from the moe-cluster project root" >&2; exit 2; }
mkdir -p "$OUT"
nvidia-smi -L
t0=$SECONDS
trap 'echo "== gpu_check.sh: $((SECONDS - t0)) s in all"' EXIT

if [ ! -f "$VENV/.installed" ]; then
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --progress-bar off torch==2.13.0
  "$PY" -m pip install -q --progress-bar off -e '.[test]'
  "$PY" -m pip install -q --progress-bar off -e '.[gpu]' || echo "== the gpu extra did not install: SDPA attention only"
  touch "$VENV/.installed"
fi
"$PY" -c 'import torch; assert torch.cuda.is_available(), f"torch {torch.__version__} sees no GPU (a CPU wheel, or a driver older than its CUDA {torch.version.cuda}?)"
print("torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'
echo "== installed in $((SECONDS - t0)) s"
export PYTHONPATH=$PWD

# Every file with a CUDA test; none of them skips anything on a GPU, so a skip is a failure.
CUDA_TESTS=(tests/cluster/test_cuda.py tests/deployments/test_transports.py tests/cluster/test_attention_backends.py)
tests_rc=0
timeout 360 "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$OUT/pytest.xml" "${CUDA_TESTS[@]}" \
  2>&1 | tee "$OUT/pytest.txt" || tests_rc=$?
: > "$OUT/isolated.txt"
while read -r t; do
  if timeout 60 "$PY" -m pytest -q -p no:cacheprovider "$t" > /dev/null 2>&1; then r=PASS; else r=FAIL; fi
  echo "$r $t" | tee -a "$OUT/isolated.txt"
done < <( (grep -oE '^(FAILED|ERROR) [^ ]+' "$OUT/pytest.txt" || true) | cut -d' ' -f2 | sort -u | head -4)
echo "== tests done at $((SECONDS - t0)) s (pytest exit $tests_rc)"

timeout 420 "$PY" bench/gpu_measure.py --out "$OUT" --tests-rc "$tests_rc"
