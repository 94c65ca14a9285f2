"""Triton kernels, installed as `lingshu_fast.kernels`.

Each op lives in one file holding its Triton kernel(s), its plain-PyTorch reference and the autograd
wrapper. This file only re-exports; importing it must have no side effects (transformers probes for a
package named `kernels`, see DESIGN.md).
"""
