"""The magnitude-key format shared by the ops, their checks, the reference and the radix
selection: which dtypes the compiled core takes (and their codes), how |x| maps to an integer
key, the radix passes, and key -> float.

A key is the float's bit pattern with the sign bit cleared: ordered like |x| for every
non-NaN value (±0 and ±inf included); every key above the dtype's +inf key is a NaN. Nothing
in the package sits below this module (it imports only torch).
"""

from __future__ import annotations

import struct

import torch

# dtype -> code understood by csrc/include/lottery/macros.h (lottery::DType)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

# dtype -> (integer view dtype, magnitude bits, key of +inf)
KEY_FORMAT = {
    torch.float32: (torch.int32, 31, 0x7F800000),
    torch.float64: (torch.int64, 63, 0x7FF0000000000000),
    torch.float16: (torch.int16, 15, 0x7C00),
    torch.bfloat16: (torch.int16, 15, 0x7F80),
}

# (shift, bits) of each radix pass, most significant digit first. The CPU takes 16-bit digits
# (per-thread histograms of 64K bins, L2-resident); the GPU keeps its histograms in shared
# memory, so digits of at most 11 bits.
PASSES = {
    torch.float32: ((15, 16), (0, 15)),
    torch.float64: ((47, 16), (31, 16), (15, 16), (0, 15)),
    torch.float16: ((0, 15),),
    torch.bfloat16: ((0, 15),),
}
GPU_PASSES = {
    torch.float32: ((20, 11), (10, 10), (0, 10)),
    torch.float64: ((52, 11), (41, 11), (30, 11), (20, 10), (10, 10), (0, 10)),
    torch.float16: ((4, 11), (0, 4)),
    torch.bfloat16: ((4, 11), (0, 4)),
}


def passes(dtype: torch.dtype, device: torch.device) -> tuple[tuple[int, int], ...]:
    """(shift, bits) of each radix pass on `device`, most significant digit first."""
    return GPU_PASSES[dtype] if device.type == "cuda" else PASSES[dtype]


def max_key(dtype: torch.dtype) -> int:
    """Largest magnitude key of `dtype`: its bit pattern with the sign bit cleared."""
    return (1 << KEY_FORMAT[dtype][1]) - 1


def key_to_float(key: int, dtype: torch.dtype) -> float:
    """The magnitude whose bit pattern (sign cleared) is `key`."""
    if dtype == torch.float32:
        return struct.unpack("<f", struct.pack("<I", key))[0]
    if dtype == torch.float64:
        return struct.unpack("<d", struct.pack("<Q", key))[0]
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<H", key))[0]
    return struct.unpack("<f", struct.pack("<I", key << 16))[0]  # bfloat16
