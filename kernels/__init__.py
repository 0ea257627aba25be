"""Triton varlen flash-attention kernels and pure-PyTorch references (``speedasr.kernels``)."""
