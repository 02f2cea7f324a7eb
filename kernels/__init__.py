"""Triton kernels shared by the NVIDIA and ROCm backends, each beside its pure-torch reference.

Empty until the Triton kernels issue lands; kernels never import backends.
"""
