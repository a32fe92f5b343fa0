"""The dtypes every regularizer test runs in and the tolerance each allows, defined once for the suite.

``@DTYPES`` parametrizes a test over float32 and float64 (never a loop inside one test); ``TOL[dtype]`` holds the
``rtol`` / ``atol`` keyword arguments for ``torch.testing.assert_close`` and ``np.testing.assert_allclose``.
``TOL[torch.bfloat16]`` is for a term on bfloat16 inputs under autocast against the same values in float32 (the
terms compute in float32 inside; the inputs' 8-bit mantissa sets the gap).
"""

from __future__ import annotations

import pytest
import torch

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.float64: {"rtol": 1e-10, "atol": 1e-12},
    torch.bfloat16: {"rtol": 1e-2, "atol": 1e-3},
}
