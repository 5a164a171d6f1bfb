#!/usr/bin/env bash
# Issue #10's accelerator figures on one CUDA GPU, one part per call (each fits the device tool's
# 10-minute limit; docs/PERFORMANCE.md "Taking the accelerator figures"):
#
#   bench/accelerator.sh check           versions, devices, the cuDNN-vs-XLA attention test on
#                                        the GPU, and a demo-size training step and sample
#   bench/accelerator.sh train [BATCH]   stage 2b of configs/coco.py at 512 px, bf16 + cuDNN
#                                        (default batch 8; REMAT=1 adds block remat)
#   bench/accelerator.sh sampling        50-step DDIM + CFG of one 512 image, bf16 + cuDNN
#   bench/accelerator.sh torch_sampling  the same UNet's 50-step loop: ours vs PyTorch fp16
#
# Run from the repository root. Wheels under .whl/ (if any) are installed to /tmp/site first;
# each part's output goes to $OUT/<part>.log (OUT: the device tool's folder, else bench_out/),
# its JSON line(s) to $OUT/<part>.jsonl.
set -euo pipefail

part=${1:?usage: bench/accelerator.sh check|train|sampling|torch_sampling [BATCH]}
out=${OUT:-bench_out}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}"
fi
# shellcheck source=launch/gpu/xla_flags.sh
source launch/gpu/xla_flags.sh
export XLA_FLAGS="${XLA_FLAGS:-} $GPU_XLA_FLAGS" XLA_PYTHON_CLIENT_MEM_FRACTION=$GPU_MEM_FRACTION
export PYTHONUNBUFFERED=1

fast=()  # every part in bf16 with cuDNN attention (the VAE's 512-wide one falls back to xla)
for p in clip_text clip_vision vae unet inpainter; do
  fast+=("--config.model.$p.dtype=bfloat16" "--config.model.$p.attention=cudnn")
done
if [ "${REMAT:-0}" = 1 ]; then
  fast+=(--config.model.unet.remat=True --config.model.inpainter.remat=True)
fi

failed=()
run() {  # run COMMAND...: its output to the console and $out/$part.log; a failure is noted
  echo "+ $*" | tee -a "$out/$part.log"
  "$@" 2>&1 | tee -a "$out/$part.log" || failed+=("$*")
}

case "$part" in
  check)
    run python3 -c "import sys, jax, flax, optax, transformers, diffusers, torch
print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax',
      optax.__version__, 'transformers', transformers.__version__, 'diffusers',
      diffusers.__version__, 'torch', torch.__version__)
print(jax.devices(), jax.devices()[0].device_kind)"
    # tests/conftest.py sets JAX_PLATFORMS=cpu unless it is set: here it is the GPU.
    run env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider tests/test_attention.py \
      -k on_gpu
    run python3 bench/train_step.py --config=configs/demo.py --stages=2b --steps=5 "${fast[@]}"
    run python3 bench/sampling.py --config=configs/demo.py --batch_sizes=1 --num_steps=50 \
      "${fast[@]}"
    ;;
  train)
    run python3 bench/train_step.py --config=configs/coco.py --stages=2b \
      --batch_size="${2:-8}" --steps=10 "${fast[@]}"
    ;;
  sampling)
    run python3 bench/sampling.py --config=configs/coco.py --batch_sizes=1,4 --num_steps=50 \
      "${fast[@]}"
    ;;
  torch_sampling)
    run python3 bench/sampling_vs_pytorch.py --config=configs/coco.py --batch_sizes=1 \
      --num_steps=50 "${fast[@]}"
    ;;
  *)
    echo "bench/accelerator.sh: unknown part '$part' (check, train, sampling, torch_sampling)" >&2
    exit 2
    ;;
esac
grep '^{' "$out/$part.log" > "$out/$part.jsonl" || true
if [ ${#failed[@]} -gt 0 ]; then
  for command in "${failed[@]}"; do
    echo "bench/accelerator.sh $part: failed: $command" >&2
  done
  exit 1
fi
