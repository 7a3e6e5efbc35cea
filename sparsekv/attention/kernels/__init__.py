"""Triton kernels (CUDA path). They import only torch and triton; the PyTorch paths beside each
backend are the reference they are tested against (under TRITON_INTERPRET=1 on CPU)."""
