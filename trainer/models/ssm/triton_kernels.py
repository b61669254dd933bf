"""Triton kernels of the selective scan; the contract and the launch are in ``triton_scan``.

One program per (batch row b, channel d) walks the sequence in chunks of BLOCK_T
tokens, carrying the (d_state,) float32 state between chunks. Inside a chunk the
recurrence h_t = a_t ⊙ h_{t−1} + x_t is an associative scan over (a, x) pairs on a
(BLOCK_T, BLOCK_N) tile — BLOCK_N is d_state padded to a power of two; padded
states have A = 0, B = C = 0 and stay 0.

Layouts (all contiguous): u, delta, z, out: (batch, d_inner, L); B, C: (batch, d_state, L);
A: (d_inner, d_state); D, delta_bias: (d_inner,); seq_idx: (batch, L) int32;
chunk states: (batch, d_inner, n_chunks, d_state) float32, the state before each chunk.

Padded tokens of the last chunk (t ≥ L) get dt = 0, so a = 1 and x = 0: the state
passes through them unchanged and the tile's last row holds the state after token L − 1.

The backward kernel walks the chunks in reverse. It recomputes the chunk's states
from the saved state before it (natural token order), then loads the chunk again in
reverse token order (row i ↔ token s + BLOCK_T − 1 − i), where the adjoint recurrence
g_t = a_{t+1} ⊙ g_{t+1} + C_t·gy_t is a forward scan; only the states are flipped
into that order (``tl.flip``). A reverse ``tl.associative_scan`` is avoided on purpose:
its combine order for non-commutative operators differs between Triton versions.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _compose(a1, x1, a2, x2):
    """(a1, x1) followed by (a2, x2): h ↦ a2·(a1·h + x1) + x2."""
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20) as max(x, 0) + log1p(exp(−|x|)), log1p(e) = log(w)·e/(w − 1), w = 1 + e."""
    e = tl.exp(-tl.abs(x))
    w = 1.0 + e
    log1p = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p)


@triton.jit
def _row_constants(A_ptr, D_ptr, bias_ptr, d_inner, d_state, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """What the program of row (b, d) keeps for the whole sequence: b, row = b·d_inner + d (int64), the
    state lanes n and their mask (BLOCK_N,), A[d] (BLOCK_N,) float32 (0 on padded lanes), D[d] and
    delta_bias[d] as float32 scalars (0.0 when absent)."""
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < d_state
    A = tl.load(A_ptr + d * d_state + n, mask=n_ok, other=0.0).to(tl.float32)
    D = 0.0
    if HAS_D:
        D = tl.load(D_ptr + d).to(tl.float32)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)
    return b, b * d_inner + d, n, n_ok, A, D, bias


@triton.jit
def _load_delta(delta_ptr, off, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """(raw, dt) of the tokens at ``off``, float32: raw = delta + delta_bias, dt = softplus(raw) when
    SOFTPLUS else raw. Masked-off tokens load delta = 0 (their dt is not 0 under softplus: callers mask it)."""
    raw = tl.load(delta_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    return raw, dt


@triton.jit
def _load_B_tile(B_ptr, t, ok, b, n, n_ok, d_state, L):
    """Offsets and mask of a chunk's (BLOCK_T, BLOCK_N) tiles of B and C (token t, state n), and B's tile in float32."""
    bc_off = (b * d_state + n[None, :]) * L + t[:, None]
    bc_ok = ok[:, None] & n_ok[None, :]
    Bt = tl.load(B_ptr + bc_off, mask=bc_ok, other=0.0).to(tl.float32)
    return bc_off, bc_ok, Bt


@triton.jit
def _decay(dt, A, seq_ptr, b, t, ok, L, HAS_SEQ: tl.constexpr):
    """a_t = exp(dt_t · A), (BLOCK_T, BLOCK_N); 0 at a token whose seq_idx differs from its predecessor's
    (a packed sequence starts there), so the state restarts from zero."""
    a = tl.exp(dt[:, None] * A[None, :])
    if HAS_SEQ:
        cur = tl.load(seq_ptr + b * L + t, mask=ok, other=0)
        prev = tl.load(seq_ptr + b * L + t - 1, mask=ok & (t > 0), other=0)
        a = tl.where((ok & (t > 0) & (cur != prev))[:, None], 0.0, a)
    return a


@triton.jit
def _chunk_terms(u_ptr, delta_ptr, B_ptr, seq_ptr, t, row, b, n, n_ok, A, bias, L, d_state,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The recurrence's terms at tokens t (BLOCK_T,) of row (b, d), natural order: the token mask ok,
    offsets off into (batch, d_inner, L), u and dt (float32, 0 past L), the B/C tile offsets and mask,
    B's tile and the decays a = exp(dt·A) (BLOCK_T, BLOCK_N), 0 where a packed sequence starts."""
    ok = t < L
    off = row * L + t
    u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
    _, dt = _load_delta(delta_ptr, off, ok, bias, HAS_BIAS, SOFTPLUS)
    dt = tl.where(ok, dt, 0.0)
    bc_off, bc_ok, Bt = _load_B_tile(B_ptr, t, ok, b, n, n_ok, d_state, L)
    a = _decay(dt, A, seq_ptr, b, t, ok, L, HAS_SEQ)
    return ok, off, u, dt, bc_off, bc_ok, Bt, a


@triton.jit
def scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr,
    out_ptr, last_ptr, states_ptr,
    L, d_inner, d_state, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
    SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b, row, n, n_ok, A, D, bias = _row_constants(A_ptr, D_ptr, bias_ptr, d_inner, d_state, HAS_D, HAS_BIAS, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c in range(n_chunks):
        t = c * BLOCK_T + rows
        ok, off, u, dt, bc_off, bc_ok, Bt, a = _chunk_terms(
            u_ptr, delta_ptr, B_ptr, seq_ptr, t, row, b, n, n_ok, A, bias, L, d_state, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        Ct = tl.load(C_ptr + bc_off, mask=bc_ok, other=0.0).to(tl.float32)
        x = (dt * u)[:, None] * Bt
        a_cum, x_cum = tl.associative_scan((a, x), 0, _compose)
        hs = a_cum * h[None, :] + x_cum
        if SAVE_STATES:
            tl.store(states_ptr + (row * n_chunks + c) * d_state + n, h, mask=n_ok)
        y = tl.sum(hs * Ct, 1)
        if HAS_D:
            y = y + D * u
        if HAS_Z:
            zt = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
            y = y * (zt * tl.sigmoid(zt))
        tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=ok)
        h = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, hs, 0.0), 0)
    tl.store(last_ptr + row * d_state + n, h, mask=n_ok)


@triton.jit
def scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr, states_ptr,
    gout_ptr, glast_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    L, d_inner, d_state, n_chunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_GLAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Gradients of one (b, d) row. du, ddelta, dz: (batch, d_inner, L) in the inputs' dtypes;
    dB, dC: (batch, d_state, L) float32, accumulated over channels with atomic adds;
    dA: (batch, d_inner, d_state), dD, dbias: (batch, d_inner) float32 per-row partial sums."""
    b, row, n, n_ok, A, D, bias = _row_constants(A_ptr, D_ptr, bias_ptr, d_inner, d_state, HAS_D, HAS_BIAS, BLOCK_N)
    rows = tl.arange(0, BLOCK_T)
    if HAS_GLAST:
        carry = tl.load(glast_ptr + row * d_state + n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_N], dtype=tl.float32)
    dA_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i in range(n_chunks):
        c = n_chunks - 1 - i
        # --- the chunk's states, natural token order
        t = c * BLOCK_T + rows
        _, _, u, dt, _, _, Bt, a = _chunk_terms(
            u_ptr, delta_ptr, B_ptr, seq_ptr, t, row, b, n, n_ok, A, bias, L, d_state, HAS_BIAS, SOFTPLUS, HAS_SEQ)
        a_cum, x_cum = tl.associative_scan((a, (dt * u)[:, None] * Bt), 0, _compose)
        h_in = tl.load(states_ptr + (row * n_chunks + c) * d_state + n, mask=n_ok, other=0.0)
        hs = tl.flip(a_cum * h_in[None, :] + x_cum, 0)  # reverse token order from here on

        # --- the same chunk, reverse token order: row i is token c·BLOCK_T + BLOCK_T − 1 − i
        t = c * BLOCK_T + (BLOCK_T - 1 - rows)
        ok = t < L
        off = row * L + t
        u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
        raw, dt = _load_delta(delta_ptr, off, ok, bias, HAS_BIAS, SOFTPLUS)
        dt = tl.where(ok, dt, 0.0)
        bc_off, bc_ok, Bt = _load_B_tile(B_ptr, t, ok, b, n, n_ok, d_state, L)
        Ct = tl.load(C_ptr + bc_off, mask=bc_ok, other=0.0).to(tl.float32)
        gout = tl.load(gout_ptr + off, mask=ok, other=0.0).to(tl.float32)
        # decay a_{t+1} linking token t + 1 back to token t (1 past the end: the carry enters unscaled)
        nxt_ok = (t + 1) < L
        _, dt_next = _load_delta(delta_ptr, off + 1, nxt_ok, bias, HAS_BIAS, SOFTPLUS)
        a_next = _decay(dt_next, A, seq_ptr, b, t + 1, nxt_ok, L, HAS_SEQ)
        a_next = tl.where(nxt_ok[:, None], a_next, 1.0)
        if HAS_Z:
            zt = tl.load(z_ptr + off, mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zt)
            gy = gout * (zt * sig)
        else:
            gy = gout
        # adjoint states g_t = dLoss/dh_t, the carry being g at the first token of the next chunk
        g_cum_a, g_cum_x = tl.associative_scan((a_next, Ct * gy[:, None]), 0, _compose)
        g = tl.where(ok[:, None], g_cum_a * carry[None, :] + g_cum_x, 0.0)
        carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, g, 0.0), 0)
        x = (dt * u)[:, None] * Bt
        q = g * (hs - x)  # g_t ⊙ a_t ⊙ h_{t−1}: what reaches dt_t and A through the decay
        dA_acc += tl.sum(q * dt[:, None], 0)
        gB = tl.sum(g * Bt, 1)
        ddt = tl.sum(q * A[None, :], 1) + gB * u
        du = gB * dt
        if HAS_D:
            du = du + D * gy
            dD_acc += gy * u
        tl.atomic_add(dB_ptr + bc_off, g * (dt * u)[:, None], mask=bc_ok)
        tl.atomic_add(dC_ptr + bc_off, hs * gy[:, None], mask=bc_ok)
        if HAS_Z:
            y = tl.sum(hs * Ct, 1)
            if HAS_D:
                y = y + D * u
            dz = gout * y * (sig * (1.0 + zt * (1.0 - sig)))
            tl.store(dz_ptr + off, dz.to(dz_ptr.dtype.element_ty), mask=ok)
        if SOFTPLUS:
            ddt = tl.where(raw > 20.0, ddt, ddt * tl.sigmoid(raw))
        ddt = tl.where(ok, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += ddt
        tl.store(du_ptr + off, du.to(du_ptr.dtype.element_ty), mask=ok)
        tl.store(ddelta_ptr + off, ddt.to(ddelta_ptr.dtype.element_ty), mask=ok)
    tl.store(dA_ptr + row * d_state + n, dA_acc, mask=n_ok)
    if HAS_D:
        tl.store(dD_ptr + row, tl.sum(dD_acc, 0))
    if HAS_BIAS:
        tl.store(dbias_ptr + row, tl.sum(dbias_acc, 0))
