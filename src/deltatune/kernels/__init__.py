"""Compute kernels below the contract: the fused low-rank linear and the adapter compute precision."""
