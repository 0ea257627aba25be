"""Triton kernels of the varlen flash-attention (``speedasr.kernels.flash_varlen`` launches them).

Layout and semantics are documented in ``flash_varlen.py`` and docs/kernels.md. Every kernel runs
``(num_programs, H)`` programs; the per-sequence kernels read the ``(seq, tile)`` of their program
from ``Sched`` (a ``(2, num_programs)`` int32 schedule, ``seq = -1`` for spare programs), so the
grid is sized by the real number of tiles, not by ``B * max_seqlen``.

Each inner loop runs in two stages: blocks where every score is visible run without any score
masking (``MASKED=False``), and only the few boundary blocks (the causal diagonal, the ragged end of
a sequence) pay for the compare-and-select over the whole tile.

Constexpr choices: HEAD_DIM/BLOCK_* size register tiles (``tl.arange`` needs compile-time powers of
two); CAUSAL and MASKED remove mask arithmetic from the code paths that do not need it;
REL_POS compiles the relative-position term in or out (without it the kernels are exactly the
plain ones: no extra loads, matmuls or registers);
DOT_PRECISION picks the matmul instruction (3xTF32 or IEEE keep fp32 inputs fp32-accurate where
plain TF32 would not; see ``_dot_precision`` in flash_varlen.py).
Sequence lengths and offsets are runtime values, so one compiled kernel serves every length mix
and a new batch never triggers recompilation.
"""

from speedasr.extras import missing_extra

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the core install has no triton: say which extra adds it
    raise missing_extra("triton", "the Triton attention kernels (speedasr.kernels)") from e

LOG2E = tl.constexpr(1.4426950408889634)  # scores are kept in log2 units so exp2 can be used
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_ptrs(base, start, offs, stride_t, BLOCK_D: tl.constexpr):
    # The tile's first row is a 64-bit scalar offset (total_tokens * row_stride can exceed 2**31
    # on long packed batches); offsets inside the tile stay 32-bit, which keeps the per-element
    # pointer math, and so register pressure, low.
    offs_d = tl.arange(0, BLOCK_D)
    return base + tl.cast(start, tl.int64) * stride_t + (offs[:, None] * stride_t + offs_d[None, :])


@triton.jit
def _load_rows(
    base, start, offs, num_rows, stride_t, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    """Rows ``start + offs`` (valid below num_rows) of a (tokens, D) slice; padding reads as 0."""
    ptrs = _tile_ptrs(base, start, offs, stride_t, BLOCK_D)
    in_rows = (start + offs < num_rows)[:, None]
    if HEAD_DIM == BLOCK_D:
        x = tl.load(ptrs, mask=in_rows, other=0.0)
    else:
        x = tl.load(ptrs, mask=in_rows & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_rows(
    base, start, offs, num_rows, stride_t, x, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr
):
    ptrs = _tile_ptrs(base, start, offs, stride_t, BLOCK_D)
    mask = (start + offs < num_rows)[:, None] & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _sequence(CuQ, CuK, seq):
    q_start = tl.load(CuQ + seq)
    k_start = tl.load(CuK + seq)
    return q_start, tl.load(CuQ + seq + 1) - q_start, k_start, tl.load(CuK + seq + 1) - k_start


@triton.jit
def _full_key_blocks_end(first_row, len_k, diag, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """End of the key blocks that every query row ``>= first_row`` sees entirely (bottom-right
    causal: query i sees keys n <= i + diag), rounded down to whole ``BLOCK_N`` blocks."""
    end = len_k
    if CAUSAL:
        end = tl.maximum(tl.minimum(len_k, first_row + diag + 1), 0)
    return (end // BLOCK_N) * BLOCK_N


# ---------------------------------------------------------------------------------------------
# Relative positions (Transformer-XL, NeMo's rel_pos): score(i, j) += qp_i . T[R - 1 - (i - j)]
#
# For a (BLOCK_M query rows from row0) x (BLOCK_N keys from col0) tile, entry (a, b) reads table
# row R - 1 - (row0 + a) + (col0 + b) = wbase + (BLOCK_M - 1 - a + b), wbase = R - BLOCK_M - row0
# + col0: a window of BLOCK_M + BLOCK_N - 1 consecutive rows. One matmul of the query tile against
# the window gives every (row, distance) product; a gather along the distance axis then picks each
# entry's diagonal (the Transformer-XL "shift", here inside registers). The backward runs the same
# map in reverse: dS is skewed into (row, distance) space, whose matmuls give dQP and dT.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rel_window(Tab, wbase, num_rows, stride_tt, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_W: tl.constexpr):  # fmt: skip
    """Table rows ``wbase + [0, BLOCK_W)``; rows outside ``[0, num_rows)`` (which no real
    query-key pair reads) load as 0."""
    offs_w = tl.arange(0, BLOCK_W)
    rows = wbase + offs_w
    ptrs = _tile_ptrs(Tab, wbase, offs_w, stride_tt, BLOCK_D)
    in_rows = ((rows >= 0) & (rows < num_rows))[:, None]
    return tl.load(ptrs, mask=in_rows & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :], other=0.0)


@triton.jit
def _rel_scores(qp, t_win, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr):  # fmt: skip
    """``(BLOCK_M, BLOCK_N)`` fp32: entry ``(a, b)`` is ``qp[a] . t_win[BLOCK_M - 1 - a + b]``."""
    by_distance = tl.dot(qp, tl.trans(t_win), input_precision=DOT_PRECISION)  # (BM, BLOCK_W)
    a = tl.arange(0, BLOCK_M)[:, None]
    b = tl.arange(0, BLOCK_N)[None, :]
    return tl.gather(by_distance, BLOCK_M - 1 - a + b, axis=1)


@triton.jit
def _rel_skew(ds, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """The inverse map of ``_rel_scores``: ``(BLOCK_M, BLOCK_W)`` with entry ``(a, w)`` =
    ``ds[a, w - (BLOCK_M - 1 - a)]`` where that key is in the tile, else 0."""
    a = tl.arange(0, BLOCK_M)[:, None]
    b = tl.arange(0, BLOCK_W)[None, :] - (BLOCK_M - 1) + a
    picked = tl.gather(ds, tl.minimum(tl.maximum(b, 0), BLOCK_N - 1), axis=1)
    return tl.where((b >= 0) & (b < BLOCK_N), picked, 0.0)


@triton.jit
def _fwd_steps(
    acc, l_i, m_i, q, K, V, len_k, rows, diag, start, end, stride_kt, stride_vt, qk_scale_log2,
    qp, Tab, rel_r, stride_tt, row0,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, REL_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Online-softmax steps over key blocks ``[start, end)``."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, start_n, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D)
        v = _load_rows(V, start_n, offs_n, len_k, stride_vt, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if REL_POS:
            t_win = _rel_window(Tab, rel_r - BLOCK_M - row0 + start_n, 2 * rel_r - 1, stride_tt,
                                HEAD_DIM, BLOCK_D, BLOCK_W)  # fmt: skip
            s += _rel_scores(qp, t_win, BLOCK_M, BLOCK_N, DOT_PRECISION)
        s = s * qk_scale_log2
        if MASKED:
            valid = (cols < len_k)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no key yet still has m = -inf; subtracting 0 instead keeps
        # exp2(-inf - m) at 0 rather than NaN, so such rows accumulate nothing.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, Sched, QP, Tab,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    stride_pt, stride_ph, stride_tt, stride_th,
    total_q, num_programs, qk_scale_log2, rel_r,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REL_POS: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """One program: one query tile of one sequence, one head. Online softmax over key tiles.

    With ``REL_POS``, ``QP`` (like Q) and ``Tab`` (``(2 rel_r - 1, H, D)``) add the
    relative-position term; ``BLOCK_W`` = next power of two >= BLOCK_M + BLOCK_N - 1 (the window).
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(Sched + pid)
    if seq < 0:  # the grid is an upper bound on the number of tiles; spare programs exit here
        return
    tile = tl.load(Sched + num_programs + pid)
    q_start, len_q, k_start, len_k = _sequence(CuQ, CuK, seq)
    K = K + k_start.to(tl.int64) * stride_kt + head * stride_kh
    V = V + k_start.to(tl.int64) * stride_vt + head * stride_vh

    row0 = tile * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m
    q = _load_rows(Q + q_start.to(tl.int64) * stride_qt + head * stride_qh, row0, offs_m, len_q,
                   stride_qt, HEAD_DIM, BLOCK_D)  # fmt: skip
    qp = q  # unused without REL_POS (the constexpr branch below is compiled out)
    if REL_POS:
        qp = _load_rows(QP + q_start.to(tl.int64) * stride_pt + head * stride_ph, row0, offs_m,
                        len_q, stride_pt, HEAD_DIM, BLOCK_D)  # fmt: skip
    Tab = Tab + head * stride_th

    # Bottom-right causal alignment: query i sees keys n <= i + diag. Key blocks past the last
    # key the tile's bottom row can see are skipped (loop bound), not just masked.
    diag = len_k - len_q
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (tile + 1) * BLOCK_M + diag)
    full_end = _full_key_blocks_end(tile * BLOCK_M, len_k, diag, CAUSAL, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, K, V, len_k, rows, diag, 0, full_end, stride_kt, stride_vt,
        qk_scale_log2, qp, Tab, rel_r, stride_tt, row0,
        False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, REL_POS, BLOCK_M, BLOCK_W,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_steps(
        acc, l_i, m_i, q, K, V, len_k, rows, diag, full_end, hi, stride_kt, stride_vt,
        qk_scale_log2, qp, Tab, rel_r, stride_tt, row0,
        True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, REL_POS, BLOCK_M, BLOCK_W,
    )  # fmt: skip

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows without keys: acc is 0, so out is 0
    _store_rows(Out + q_start.to(tl.int64) * stride_ot + head * stride_oh, row0, offs_m, len_q,
                stride_ot, out, HEAD_DIM, BLOCK_D)  # fmt: skip
    # +inf for rows without keys: in the backward exp2(s - inf) = 0 for every finite score.
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("inf"))
    tl.store(Lse + head.to(tl.int64) * total_q + q_start + rows, lse, mask=rows < len_q)


@triton.jit
def bwd_preprocess_kernel(
    Out, dOut, Delta, stride_ot, stride_oh, stride_dot, stride_doh, total_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Delta = rowsum(dO * O), fp32, (H, total_q). Independent of sequences: rows are rows."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    row0 = pid * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m
    o = _load_rows(Out + head * stride_oh, row0, offs_m, total_q, stride_ot, HEAD_DIM, BLOCK_D)
    do = _load_rows(dOut + head * stride_doh, row0, offs_m, total_q, stride_dot, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + head.to(tl.int64) * total_q + rows, delta, mask=rows < total_q)


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, Q, dOut, Lse, Delta, len_q, cols, len_k, diag, start, end,
    stride_qt, stride_dot, qk_scale_log2, QP, Tab, rel_r, stride_pt, stride_tt, key0,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr, REL_POS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """dK/dV contributions of query blocks ``[start, end)``, on transposed (key x query) scores."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        in_range = rows < len_q
        q = _load_rows(Q, start_m, offs_m, len_q, stride_qt, HEAD_DIM, BLOCK_D)
        do = _load_rows(dOut, start_m, offs_m, len_q, stride_dot, HEAD_DIM, BLOCK_D)
        # Padding rows read lse = +inf, so their probabilities are exactly 0 even unmasked.
        lse = tl.load(Lse + rows, mask=in_range, other=float("inf")) * LOG2E
        delta = tl.load(Delta + rows, mask=in_range, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if REL_POS:
            qp = _load_rows(QP, start_m, offs_m, len_q, stride_pt, HEAD_DIM, BLOCK_D)
            t_win = _rel_window(Tab, rel_r - BLOCK_M - start_m + key0, 2 * rel_r - 1, stride_tt,
                                HEAD_DIM, BLOCK_D, BLOCK_W)  # fmt: skip
            s_t += tl.trans(_rel_scores(qp, t_win, BLOCK_M, BLOCK_N, DOT_PRECISION))
        s_t = s_t * qk_scale_log2 - lse[None, :]
        if MASKED:
            valid = (cols < len_k)[:, None] & in_range[None, :]
            if CAUSAL:
                valid = valid & (cols[:, None] <= rows[None, :] + diag)
            s_t = tl.where(valid, s_t, float("-inf"))  # before exp2: nothing masked can overflow
        p_t = tl.math.exp2(s_t)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, dOut, Lse, Delta, dK, dV, CuQ, CuK, Sched, QP, Tab,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    stride_pt, stride_ph, stride_tt, stride_th,
    total_q, num_programs, qk_scale_log2, softmax_scale, rel_r,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REL_POS: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """One program: one key tile of one sequence, one head; loops over the queries that see it.

    Works on transposed scores (keys x queries) so dV = P^T dO and dK = dS^T Q are plain dots.
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(Sched + pid)
    if seq < 0:
        return
    tile = tl.load(Sched + num_programs + pid)
    q_start, len_q, k_start, len_k = _sequence(CuQ, CuK, seq)
    q_row0 = q_start.to(tl.int64)
    k_row0 = k_start.to(tl.int64)
    Q = Q + q_row0 * stride_qt + head * stride_qh
    dOut = dOut + q_row0 * stride_dot + head * stride_doh
    Lse = Lse + head.to(tl.int64) * total_q + q_start
    Delta = Delta + head.to(tl.int64) * total_q + q_start
    QP = QP + q_row0 * stride_pt + head * stride_ph
    Tab = Tab + head * stride_th

    key0 = tile * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    cols = key0 + offs_n
    k = _load_rows(K + k_row0 * stride_kt + head * stride_kh, key0, offs_n, len_k, stride_kt,
                   HEAD_DIM, BLOCK_D)  # fmt: skip
    v = _load_rows(V + k_row0 * stride_vt + head * stride_vh, key0, offs_n, len_k, stride_vt,
                   HEAD_DIM, BLOCK_D)  # fmt: skip

    # Query i sees key n iff i >= n - diag. Causal: queries before the first one that sees this
    # tile's first key contribute nothing (the loop starts after them), and queries from the
    # first one that sees the tile's last key on see every key (no masking needed there).
    diag = len_k - len_q
    lo = 0
    unmasked_from = 0
    if CAUSAL:
        lo = (tl.maximum(key0 - diag, 0) // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(key0 + BLOCK_N - 1 - diag - lo, 0)
        unmasked_from = lo + ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    # The ragged last key tile of a sequence is masked throughout.
    unmasked_from = tl.where(
        key0 + BLOCK_N > len_k, tl.maximum(unmasked_from, len_q), unmasked_from
    )

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dk, dv = _dkdv_steps(
        dk, dv, k, v, Q, dOut, Lse, Delta, len_q, cols, len_k, diag,
        lo, tl.minimum(unmasked_from, len_q), stride_qt, stride_dot, qk_scale_log2,
        QP, Tab, rel_r, stride_pt, stride_tt, key0,
        True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, REL_POS, BLOCK_N, BLOCK_W,
    )  # fmt: skip
    dk, dv = _dkdv_steps(
        dk, dv, k, v, Q, dOut, Lse, Delta, len_q, cols, len_k, diag,
        unmasked_from, len_q, stride_qt, stride_dot, qk_scale_log2,
        QP, Tab, rel_r, stride_pt, stride_tt, key0,
        False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, DOT_PRECISION, REL_POS, BLOCK_N, BLOCK_W,
    )  # fmt: skip

    _store_rows(dK + k_row0 * stride_dkt + head * stride_dkh, key0, offs_n, len_k, stride_dkt,
                dk * softmax_scale, HEAD_DIM, BLOCK_D)  # fmt: skip
    _store_rows(dV + k_row0 * stride_dvt + head * stride_dvh, key0, offs_n, len_k, stride_dvt,
                dv, HEAD_DIM, BLOCK_D)  # fmt: skip


@triton.jit
def _dq_steps(
    dq, dqp, q, do, lse, delta, K, V, len_k, rows, diag, start, end, stride_kt, stride_vt,
    qk_scale_log2, qp, Tab, dTab, rel_r, stride_tt, stride_dtt, row0, softmax_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REL_POS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """dQ (and with REL_POS dQP and dT) contributions of key blocks ``[start, end)``."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(K, start_n, offs_n, len_k, stride_kt, HEAD_DIM, BLOCK_D)
        v = _load_rows(V, start_n, offs_n, len_k, stride_vt, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if REL_POS:
            wbase = rel_r - BLOCK_M - row0 + start_n
            t_win = _rel_window(Tab, wbase, 2 * rel_r - 1, stride_tt, HEAD_DIM, BLOCK_D, BLOCK_W)
            s += _rel_scores(qp, t_win, BLOCK_M, BLOCK_N, DOT_PRECISION)
        s = s * qk_scale_log2 - lse[:, None]
        if MASKED:
            valid = (cols < len_k)[None, :]
            if CAUSAL:
                valid = valid & (cols[None, :] <= rows[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        p = tl.math.exp2(s)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        if REL_POS:
            ds_skew = _rel_skew(ds, BLOCK_M, BLOCK_N, BLOCK_W).to(qp.dtype)  # (BM, BLOCK_W)
            dqp += tl.dot(ds_skew, t_win, input_precision=DOT_PRECISION)
            # Every query tile of every sequence adds into overlapping table rows: atomics (fp32
            # buffer), the one non-deterministic sum of the backward.
            d_win = tl.dot(tl.trans(ds_skew), qp, input_precision=DOT_PRECISION) * softmax_scale
            offs_w = tl.arange(0, BLOCK_W)
            t_rows = wbase + offs_w
            in_rows = ((t_rows >= 0) & (t_rows < 2 * rel_r - 1))[:, None]
            ptrs = _tile_ptrs(dTab, wbase, offs_w, stride_dtt, BLOCK_D)
            mask = in_rows & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
            tl.atomic_add(ptrs, d_win, mask=mask, sem="relaxed")
    return dq, dqp


@triton.jit
def bwd_dq_kernel(
    Q, K, V, dOut, Lse, Delta, dQ, CuQ, CuK, Sched, QP, Tab, dQP, dTab,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_dqt, stride_dqh,
    stride_pt, stride_ph, stride_tt, stride_th, stride_dpt, stride_dph, stride_dtt, stride_dth,
    total_q, num_programs, qk_scale_log2, softmax_scale, rel_r,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    REL_POS: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """One program: one query tile of one sequence, one head; dQ = dS K over the keys it sees.

    With ``REL_POS`` also dQP (stored like dQ) and dT (added atomically into the fp32 ``dTab``).
    """
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(Sched + pid)
    if seq < 0:
        return
    tile = tl.load(Sched + num_programs + pid)
    q_start, len_q, k_start, len_k = _sequence(CuQ, CuK, seq)
    q_row0 = q_start.to(tl.int64)
    K = K + k_start.to(tl.int64) * stride_kt + head * stride_kh
    V = V + k_start.to(tl.int64) * stride_vt + head * stride_vh

    row0 = tile * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    rows = row0 + offs_m
    in_range = rows < len_q
    q = _load_rows(Q + q_row0 * stride_qt + head * stride_qh, row0, offs_m, len_q, stride_qt,
                   HEAD_DIM, BLOCK_D)  # fmt: skip
    do = _load_rows(dOut + q_row0 * stride_dot + head * stride_doh, row0, offs_m, len_q,
                    stride_dot, HEAD_DIM, BLOCK_D)  # fmt: skip
    row_base = head.to(tl.int64) * total_q + q_start
    # Padding rows read lse = +inf: their probabilities are exactly 0 in the unmasked stage too.
    lse = tl.load(Lse + row_base + rows, mask=in_range, other=float("inf")) * LOG2E
    delta = tl.load(Delta + row_base + rows, mask=in_range, other=0.0)
    qp = q  # unused without REL_POS (the constexpr branches are compiled out)
    if REL_POS:
        qp = _load_rows(QP + q_row0 * stride_pt + head * stride_ph, row0, offs_m, len_q,
                        stride_pt, HEAD_DIM, BLOCK_D)  # fmt: skip
    Tab = Tab + head * stride_th
    dTab = dTab + head * stride_dth

    diag = len_k - len_q
    hi = len_k
    if CAUSAL:
        hi = tl.minimum(len_k, (tile + 1) * BLOCK_M + diag)
    full_end = _full_key_blocks_end(tile * BLOCK_M, len_k, diag, CAUSAL, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dqp = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq, dqp = _dq_steps(
        dq, dqp, q, do, lse, delta, K, V, len_k, rows, diag, 0, full_end, stride_kt, stride_vt,
        qk_scale_log2, qp, Tab, dTab, rel_r, stride_tt, stride_dtt, row0, softmax_scale,
        False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, REL_POS, BLOCK_M, BLOCK_W,
    )  # fmt: skip
    dq, dqp = _dq_steps(
        dq, dqp, q, do, lse, delta, K, V, len_k, rows, diag, full_end, hi, stride_kt, stride_vt,
        qk_scale_log2, qp, Tab, dTab, rel_r, stride_tt, stride_dtt, row0, softmax_scale,
        True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION, REL_POS, BLOCK_M, BLOCK_W,
    )  # fmt: skip
    _store_rows(dQ + q_row0 * stride_dqt + head * stride_dqh, row0, offs_m, len_q, stride_dqt,
                dq * softmax_scale, HEAD_DIM, BLOCK_D)  # fmt: skip
    if REL_POS:
        _store_rows(dQP + q_row0 * stride_dpt + head * stride_dph, row0, offs_m, len_q,
                    stride_dpt, dqp * softmax_scale, HEAD_DIM, BLOCK_D)  # fmt: skip
