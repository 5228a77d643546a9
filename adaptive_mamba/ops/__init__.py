"""Fused operators: the selective scan (CUDA via mamba-ssm, CPU via our C++ kernel, pure-torch fallback) and the
causal conv + SiLU in front of it (CPU kernel)."""
from adaptive_mamba.ops.selective_scan import (
    causal_conv1d_silu,
    cuda_kernel_available,
    selective_scan,
    selective_scan_ref,
    selective_scan_torch,
    selective_state_update,
    state_decay,
)

__all__ = ["causal_conv1d_silu", "selective_scan", "selective_scan_ref", "selective_scan_torch",
           "selective_state_update", "state_decay", "cuda_kernel_available"]
