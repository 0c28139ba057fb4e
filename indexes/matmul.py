"""The engine's float32 matrix products: full float32, in torch's one thread pool.

Two reasons every product of the search paths goes through here instead of numpy's `@`:

- Full float32. torch may run float32 products as TF32 on NVIDIA GPUs (or bf16 in oneDNN on the CPU) when a
  caller has lowered `torch.set_float32_matmul_precision`; that moves scores by ~1e-3 and breaks the error
  bounds, which assume float32 products. `float32_matmul` holds the precision at "highest" meanwhile.
- One thread pool. numpy's BLAS keeps its own threads, which spin for a while after each call; the bf16
  scans and top-k's run in torch's OpenMP threads. On a 2-core CPU the two pools then fight over the cores:
  one numpy matrix-vector product of 2,048 rows before a bf16 scan made the next scans 2-5x slower
  (24 ms against 50-120 ms for 150 queries x 10^5 rows, AMX Xeon), and the product itself 5x slower.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def float32_matmul() -> Iterator[None]:
    """Full float32 matrix products for the duration; the previous settings are restored afterwards."""
    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for numpy arrays (float32 or float64, batched like np.matmul), computed by torch on the CPU in
    numpy's result precision of the two (module docstring). Any summation order: the bounds that use it
    allow any."""
    dtype = np.result_type(a, b)
    a, b = np.asarray(a, dtype), np.asarray(b, dtype)
    with float32_matmul(), warnings.catch_warnings():
        # torch warns that a read-only array (a memmapped index file) could be written through; matmul only reads
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()
