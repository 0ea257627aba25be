"""Triton varlen flash-attention kernels and their pure-PyTorch references (``speedasr.kernels``)."""
