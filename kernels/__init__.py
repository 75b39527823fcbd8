"""Triton kernels of moce_fast, installed as ``moce_fast.kernels``.

Only ``@triton.jit`` functions and their launchers live here, one file per kernel family; no
autograd and no modules (those are in ``moce_fast.ops`` and ``moce_fast.nn``).
"""
