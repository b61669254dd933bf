"""Exact k×k area means of 8-bit RGB pixels, written straight into the caller's buffer.

`mean_into(src, k, dst)`: dst[y, x, c] = (Σ src[y·k + i, x·k + j, c] + ⌊k²/2⌋) // k² over
0 ≤ i, j < k — the block mean rounded half up, in integers (the same numbers as PIL's
`Image.reduce` for k = 2, 4, 8, 16 and `pipeline.extract`'s numpy sum for other k).

A numba kernel does it in one pass per output row (vertical sums of k rows in a uint16 row
buffer, then the horizontal k-sums), ~6× faster than PIL at k = 2, whose RGB → RGBX → RGB
conversions cost more than the mean itself. It is compiled on first use (cached on disk by
numba, so a later process only loads it); without numba the numpy fallback gives the same
numbers, slower.
"""

from __future__ import annotations

import functools

import numpy as np

# uint16 sums hold k² · 255 for k ≤ 16; larger factors sum in uint32.
_UINT16_MAX_FACTOR = 16


@functools.cache
def _kernel():
    """The compiled kernel, or None when numba cannot be imported (the numpy fallback runs)."""
    try:
        from numba import njit
    except Exception:  # noqa: BLE001 — any numba/llvmlite import failure means: no kernel
        return None

    @njit(cache=True, nogil=True, boundscheck=False)
    def mean_rows(src, sy, sx, dst, dy, dx, h, w, k, tmp):  # pragma: no cover — compiled
        # src, dst: C-contiguous (rows, 3·width) uint8; the window of src at row sy, pixel sx
        # (h·k rows, w·k pixels) averages into the window of dst at row dy, pixel dx (h × w).
        count = k * k
        half = count // 2
        n = w * k * 3
        for y in range(h):
            row = src[sy + y * k, sx * 3 : sx * 3 + n]
            for i in range(n):
                tmp[i] = row[i]
            for d in range(1, k):
                row = src[sy + y * k + d, sx * 3 : sx * 3 + n]
                for i in range(n):
                    tmp[i] += row[i]
            out = dst[dy + y, dx * 3 : dx * 3 + w * 3]
            if k == 2:
                for j in range(w):
                    b = j * 6
                    out[3 * j] = (tmp[b] + tmp[b + 3] + 2) >> 2
                    out[3 * j + 1] = (tmp[b + 1] + tmp[b + 4] + 2) >> 2
                    out[3 * j + 2] = (tmp[b + 2] + tmp[b + 5] + 2) >> 2
            else:
                for j in range(w):
                    b = j * 3 * k
                    for c in range(3):
                        s = half
                        for e in range(k):
                            s += tmp[b + e * 3 + c]
                        out[3 * j + c] = s // count

    return mean_rows


def kernel_available() -> bool:
    """True when the numba kernel compiled (False: the numpy fallback runs)."""
    return _kernel() is not None


def _window(view: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(base, row, pixel): a C-contiguous (H, W, 3) uint8 array holding `view` at that offset.

    view: (h, w, 3) uint8 whose pixels are whole (strides (·, 3, 1)), e.g. a slice of a tile or
    of a block. Raises ValueError when it is not a window of such an array.
    """
    if view.dtype != np.uint8 or view.ndim != 3 or view.shape[2] != 3 or view.strides[1:] != (3, 1):
        raise ValueError("not a window of whole RGB pixels")
    base = view
    while not base.flags.c_contiguous:
        base = base.base
        if not isinstance(base, np.ndarray):
            raise ValueError("no C-contiguous array owns this window")
    if base.ndim != 3 or base.shape[2] != 3 or base.strides[0] != view.strides[0]:
        raise ValueError("the owning array has another row layout")
    offset = view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    row, within = divmod(offset, base.strides[0])
    return base, row, within // 3


def _mean_numpy(src: np.ndarray, factor: int, dst: np.ndarray) -> None:
    count = factor * factor
    h, w = dst.shape[:2]
    total = np.zeros((h, w, 3), np.uint16 if factor <= _UINT16_MAX_FACTOR else np.uint32)
    for dy in range(factor):
        for dx in range(factor):
            total += src[dy : h * factor : factor, dx : w * factor : factor]
    total += count // 2
    total //= count
    dst[...] = total


def mean_into(src: np.ndarray, factor: int, dst: np.ndarray) -> np.ndarray:
    """Write the exact `factor`×`factor` mean of `src` into `dst` (see the module docstring).

    src: (h·k, w·k, 3) uint8 (extra rows/columns beyond a multiple of k are ignored);
    dst: (h, w, 3) uint8, written in place. Either may be a window (slice) of a larger
    C-contiguous array; other layouts are copied first. Returns dst.
    """
    h, w = dst.shape[:2]
    if src.shape[0] < h * factor or src.shape[1] < w * factor or src.shape[2:] != (3,) or dst.shape[2:] != (3,):
        raise ValueError(f"cannot average {src.shape} by {factor} into {dst.shape}")
    kernel = _kernel()
    if kernel is None or h == 0 or w == 0:
        _mean_numpy(src, factor, dst)
        return dst
    try:
        sbase, sy, sx = _window(src)
    except ValueError:
        sbase, sy, sx = np.ascontiguousarray(src[: h * factor, : w * factor]), 0, 0
    try:
        dbase, dy, dx = _window(dst)
    except ValueError:
        out = np.empty((h, w, 3), np.uint8)
        mean_into(sbase[sy : sy + h * factor, sx : sx + w * factor], factor, out)
        dst[...] = out
        return dst
    mean_window_into(sbase, sy, sx, factor, dbase, dy, dx, h, w)
    return dst


def mean_window_into(
    src: np.ndarray, sy: int, sx: int, factor: int, dst: np.ndarray, dy: int, dx: int, h: int, w: int
) -> None:
    """`mean_into` between windows of two C-contiguous (H, W, 3) uint8 arrays, for callers that
    know them (no layout checks): dst[dy : dy + h, dx : dx + w] = the k×k mean of
    src[sy : sy + h·k, sx : sx + w·k]. The caller guarantees both windows lie inside."""
    kernel = _kernel()
    if kernel is None:
        _mean_numpy(src[sy : sy + h * factor, sx : sx + w * factor], factor, dst[dy : dy + h, dx : dx + w])
        return
    tmp = np.empty(w * factor * 3, np.uint16 if factor <= _UINT16_MAX_FACTOR else np.uint32)
    kernel(src.reshape(src.shape[0], -1), sy, sx, dst.reshape(dst.shape[0], -1), dy, dx, h, w, factor, tmp)
