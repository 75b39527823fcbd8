"""Triton kernels of moce_fast, installed as ``moce_fast.kernels``.

Only ``@triton.jit`` functions and their launchers live here, one file per kernel family; no
autograd and no modules (those are in ``moce_fast.ops`` and ``moce_fast.nn``).
"""


def pow2(n: int, floor: int = 16) -> int:
    """The least power of two >= n, and at least ``floor``: a block size, on the host. (Plain
    integer arithmetic: triton.next_power_of_2 and triton.cdiv go through Triton's constexpr
    wrappers, a few microseconds a call on launch paths that are host-bound at these shapes.)"""
    return max(floor, 1 << max(int(n) - 1, 0).bit_length())


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers: a grid size, on the host."""
    return -(-a // b)
