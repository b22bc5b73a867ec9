"""Triton kernels of srum (see kernels/README.md)."""
