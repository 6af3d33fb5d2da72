"""Triton kernels of smsd (installed as ``smsd.kernels``).

Kernels only: no autograd and no dispatch; those live in ``smsd.ops``.
Import this package after ``TRITON_INTERPRET`` is set if the kernels are to run
on CPU tensors through Triton's interpreter.
"""
