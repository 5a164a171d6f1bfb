# shellcheck shell=bash disable=SC2034  # SC2034: run_local.sh and slurm.sbatch use these
# XLA and runtime settings for CUDA GPUs, sourced by run_local.sh and slurm.sbatch.
# Every --xla_gpu_* flag named in this file, in the form written here, is fed to the pinned jaxlib
# by tests/test_launch.py, which fails on a flag XLA does not know ("Unknown flag in XLA_FLAGS").
#
# Set by default (GPU_XLA_FLAGS, GPU_MEM_FRACTION below):
#   --xla_gpu_enable_latency_hiding_scheduler=true
#       schedules the collectives (FSDP all-gathers of parameters, reduce-scatters/all-reduces of
#       gradients) to run under compute instead of stalling it. Matters as soon as parameters or
#       the batch are sharded over more than one GPU.
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.90
#       share of each GPU's memory that JAX takes up front (JAX's own default is 0.75). The rest
#       is for cuDNN/cuBLAS/NCCL workspaces: go down to 0.8 on out-of-memory errors that XLA's
#       own memory report does not explain.
#
# Worth trying, one at a time, measuring step time (run_local.sh/slurm.sbatch --xla-flags "..."):
#   --xla_gpu_enable_command_buffer=
#       (empty value) turns command buffers (CUDA graphs) off. They cut kernel-launch overhead
#       and are on by default for some kinds of ops; turn them off when a run hangs or fails with
#       CUDA-graph errors. --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL captures only
#       fusions and library calls.
#   --xla_gpu_enable_triton_gemm=false
#       matmuls go to cuBLAS rather than Triton-generated kernels: less autotuning at compile
#       time; try it if compilation is slow or a Triton GEMM shows up as slow in a profile.
#   --xla_gpu_triton_gemm_any=true
#       the other way: Triton for every GEMM it supports (may fuse more around matmuls).
#   --xla_gpu_all_gather_combine_threshold_bytes=134217728
#   --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
#   --xla_gpu_all_reduce_combine_threshold_bytes=134217728
#       merge small collectives into fewer large ones (sizes in bytes); helps most across hosts,
#       where each collective pays network latency.
#   --xla_gpu_enable_pipelined_all_gather=true
#   --xla_gpu_enable_pipelined_reduce_scatter=true
#   --xla_gpu_enable_pipelined_all_reduce=true
#       overlap one loop iteration's collectives with the next's compute; they help scanned
#       layers, and catflax does not scan its layers, so expect little from them here.
#   --xla_gpu_autotune_level=0
#       no GEMM/convolution autotuning: much faster compiles, slower steps; for debugging only.
#
# NCCL (environment variables, not XLA flags): NCCL_DEBUG=WARN (INFO while chasing a hang); on a
# cluster, the site's NCCL_SOCKET_IFNAME / NCCL_IB_HCA settings for its network.

GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true"
GPU_MEM_FRACTION=0.90
