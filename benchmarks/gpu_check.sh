#!/usr/bin/env bash
# The GPU checks (issue 23, item 6) for a lent device machine (the `device` tool's `run`); tests never
# need a GPU. The device image has a CUDA torch but no diffusers: carry its wheel. Prepare here once:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl diffusers==<the version here>
# then: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Writes benchmarks/results/gpu_check_*.{txt,log} and sd15_gpu.{json,md} (under $OUT on the device).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  | tee "$RESULTS/gpu_check_env.txt"
# 1. the suite's device-parametrised tests: the `device` fixture adds cuda when a GPU is present
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests -k cuda 2>&1 | tee "$RESULTS/gpu_check_tests.log" | tail -5
# 2. a short calibration of a UNet with SD-1.5's exact channels (859.5 M parameters at 64x64 latents;
#    here 32x32) on CUDA: capture, naive W8A8/W4A8 and a few-iteration Q-Diffusion W4A8
timeout 240 python3 benchmarks/bench_sd_pipeline.py --device cuda --channels 320,640,1280,1280 --prompts 16 \
  --steps 4 --eval-prompts 2 --rows naive:W8A8 naive:W4A8 qdiffusion:W4A8 --name sd15_gpu --out "$RESULTS" 2>&1 \
  | tee "$RESULTS/gpu_check_sd.log" | tail -12
