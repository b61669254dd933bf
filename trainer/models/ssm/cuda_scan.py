"""mamba-ssm's fused CUDA selective scan, behind an import guard tried once.

``mamba_ssm`` cannot be imported at all without its compiled CUDA extension
(and triton), so the import is attempted exactly once, here; any failure
leaves ``AVAILABLE`` False and keeps the reason for the error raised when a
caller forces ``backend="cuda"``.
"""

from __future__ import annotations

from torch import Tensor

try:
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_selective_scan_fn
except Exception as exc:  # ImportError, OSError (missing .so), RuntimeError (CUDA/triton), ...
    _mamba_selective_scan_fn = None
    AVAILABLE = False
    UNAVAILABLE_REASON = f"mamba-ssm could not be imported ({type(exc).__name__}: {exc})"
else:
    AVAILABLE = True
    UNAVAILABLE_REASON = ""


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
):
    """mamba-ssm's ``selective_scan_fn`` unchanged (CUDA tensors; shapes as in ``trainer.models.ssm``)."""
    if _mamba_selective_scan_fn is None:
        raise RuntimeError(UNAVAILABLE_REASON)
    return _mamba_selective_scan_fn(
        u.contiguous(), delta.contiguous(), A.contiguous(), B.contiguous(), C.contiguous(),
        D=D, z=None if z is None else z.contiguous(), delta_bias=delta_bias,
        delta_softplus=delta_softplus, return_last_state=return_last_state,
    )
