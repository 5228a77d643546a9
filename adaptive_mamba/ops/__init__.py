"""Fused operators: the selective scan (CUDA via mamba-ssm, CPU via our C++ kernel, pure-torch fallback)."""
from adaptive_mamba.ops.selective_scan import (
    cuda_kernel_available,
    selective_scan,
    selective_scan_ref,
    selective_scan_torch,
    selective_state_update,
)

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_torch", "selective_state_update",
           "cuda_kernel_available"]
