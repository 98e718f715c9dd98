#!/usr/bin/env bash
# The prepared GPU benchmark at the GPU targets' points: MemVP vs input-space + LoRA vs text-only + LoRA on one
# CUDA GPU, bf16, random bases of the LLaMA-7B / Qwen2.5-7B / LLaMA-13B shapes at 1 and 2 layers (per-layer times,
# full depth as a labelled extrapolation), N = 256 and 2,304 visual tokens, T = 64, B = 4 and 16. Budgeted to finish
# in under 8 minutes on one H200 (420 s for the runs; each run has its own limit; see memvp_peft/bench/gpu_plan.py).
#
#   bash memvp_peft/bench/gpu.sh [OUTPUT_DIR]        # default outputs/memvp-bench-gpu
#
# Writes OUTPUT_DIR/<run>/benchmark.{json,md,png}, OUTPUT_DIR/summary.{md,json} and OUTPUT_DIR.tar.gz (everything
# in one file, for machines that hand back few files). PYTHON picks the interpreter (default python3); the
# repository root goes on PYTHONPATH, so an image's own torch/transformers/peft work without installing the package.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${1:-outputs/memvp-bench-gpu}"
python="${PYTHON:-python3}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "nvidia-smi: not available"; } \
    | tee "$out/gpu.txt"
"$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), '| transformers', transformers.__version__, '| peft', peft.__version__)" \
    | tee -a "$out/gpu.txt"
status=0
"$python" -m memvp_peft.bench.gpu_plan --output_dir "$out" "${@:2}" || status=$?
tar -czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"
echo "wrote $out/summary.md and $out.tar.gz"
exit "$status"
