"""Flash-style CPU attention kernels (forward and backward) for the Numba CPU backend.

Public API (plain numpy in, numpy out; nothing here imports the rest of attngraph):

    attention_forward(q, k, v, *, scale=None, causal=False, bias=None, mask=None,
                      return_lse=False) -> out  |  (out, lse)
    attention_backward(q, k, v, out, lse, dout, *, scale=None, causal=False,
                       bias=None, mask=None) -> (dq, dk, dv)

Shapes: q (B,H,Tq,D), k (B,H,Tk,D), v (B,H,Tk,Dv), out/dout (B,H,Tq,Dv), lse (B,H,Tq).
All of q, k, v (and out, lse, dout, bias) share one dtype, float32 or float64.

Semantics (the numpy oracle)::

    s = (q @ k^T) * scale + bias;  s[mask] = -inf;  causal: s[..., i, j > i] = -inf
    m = s.max(-1); m = where(m == -inf, 0, m); e = exp(s - m); z = e.sum(-1)
    p = e / where(z == 0, 1, z);  out = p @ v;  lse = log(sum(exp(s))) (-inf if fully masked)

A query row whose scores are all -inf produces an output row of zeros, lse = -inf and zero
(finite) gradients.  Invalid inputs raise ``ValueError``.

Implementation
--------------
* Layout: scores are computed transposed, ``St[j, i] = s(query i0+i, key j0+j)`` for a
  ``block_k x block_q`` tile (``St = K_blk (scale Q_blk)^T``), so K and V rows are read in place
  and every softmax step (running max, exp, running sum) is a vertical vector operation over
  queries: no horizontal reductions, no per-row function calls.
* Forward: work items are (batch*head, query block), handed to the ``nthreads`` workers of one
  ``prange`` through an atomic counter (dynamic schedule; most expensive items first when
  causal), so per-thread scratch is allocated once and uneven/causal work stays balanced.  Each
  item walks the key blocks with an online softmax (running max ``m``, running sum ``l``,
  ``exp`` evaluated exactly once per score) and never holds more than one ``block_k x block_q``
  score tile.  Causal: key blocks entirely above the diagonal are skipped, and in diagonal
  blocks the two GEMMs skip the 4-row x vector tiles that are entirely masked.
* Backward (FlashAttention-2): pass 1 packs ``scale*Q^T``, ``dO^T``, ``Di = rowsum(dO*O)`` and
  lse per query block; pass 2 loops, per key block, over the query blocks recomputing
  ``P^T = exp(S^T - lse)`` (never the full Tq x Tk matrix), accumulates ``dV += P^T dO``,
  ``dP^T = V dO^T``, ``dS^T = P^T (dP^T - Di)``, ``dK += dS^T Q`` and ``dQ += dS K``; pass 3
  scales/sums dQ.  Pass 2 is split over whole heads when that balances over the threads (dQ
  rows owned by one thread, race free), otherwise over (head, key block) with one dQ
  accumulator per thread (summed in pass 3).  Rows with lse = -inf contribute nothing.
* GEMM engine: a register-blocked micro-kernel emitted directly as LLVM IR (numba
  ``@intrinsic``): a 4-row x (4 x 16 floats) accumulator tile kept in zmm registers (4 x 2 x 8
  with AVX2), one broadcast-FMA per element, arbitrary row / k strides for the A operand so
  P^T / dS^T are consumed without transposing.  ~115 GFLOP/s per core in float32 on this
  machine (AMD EPYC Zen 4), i.e. the FMA peak; ``np.dot`` (scipy BLAS) per block reaches the
  same at 64^3 but 80-97 GFLOP/s at the other block shapes and needs ``threadpool_limits``
  around every call, so it is not used (see bench/attention_kernel_bench.py --only gemm).
* ``exp`` is a branch-free Cody-Waite + polynomial evaluation (cephes coefficients for float32,
  ~1 ulp; degree-13 Taylor for float64) that LLVM vectorizes; there is no SVML here.  Inputs
  below the underflow threshold (including -inf) give exactly 0.
* fastmath is restricted to {'contract', 'reassoc', 'arcp', 'nsz'}: no 'nnan'/'ninf', so -inf
  scores and fully masked rows are handled exactly (fully masked rows are tested).

Block sizes (``_fwd_blocks`` / ``_bwd_blocks`` / ``_block``): full blocks plus one remainder
block; a sequence no longer than ``max_block + granularity`` is a single block.  Granularity:
query blocks are score columns (one vector: 16 float32 / 8 float64), key blocks are score rows
(the 4-row micro-tile).  Forward ``block_q = 64`` (128 when Tq >= 1024 and D, Dv <= 128, to
halve the per-item Q packing and key-side reloads), ``block_k = 256`` (64 when causal, so that
diagonal blocks waste less); backward 64 x 64.  The score tile (<= 128 KiB float32) then lives
in L2, and GEMM B panels (K^T / V blocks) in L1/L2.  Measured on Zen 4 the forward time is
within +-3% over block_q in {32..256} x block_k in {64..256} for non-causal T=2048.

Memory: per thread O(block_q*block_k + (block_q + block_k) * (D + Dv)) scratch (~200 KiB for
D=64 float32), independent of T.  V (and in the backward Q, K, dO) are copied only when their
head dim is not a multiple of the vector width.  The backward packs Q^T and dO^T per query
block (size(Q) + size(dO)) and keeps a padded dQ accumulator (one per thread when split over
key blocks).

Compilation: kernels are compiled lazily per dtype with explicit signatures (exactly one
specialisation per kernel and dtype) and cached on disk (``cache=True``).
"""

from __future__ import annotations

import math

import numpy as np
import numba
from numba import njit, prange, types
from numba.core import cgutils, config
from numba.extending import intrinsic, overload
from llvmlite import ir

__all__ = ["attention_forward", "attention_backward"]

_FASTMATH = {"contract", "reassoc", "arcp", "nsz"}  # keeps inf/nan semantics


def _vector_bytes() -> int:
    """Register width the micro-kernel is written for (64 = AVX-512, else 32)."""
    try:
        if config.CPU_NAME:
            feats = config.CPU_FEATURES or ""
            return 64 if "+avx512f" in feats else 32
        import llvmlite.binding as llvm

        return 64 if llvm.get_host_cpu_features().get("avx512f", False) else 32
    except Exception:  # pragma: no cover - very unusual platforms
        return 32


_VB = _vector_bytes()
# vectors per micro-tile row: 4x4 tiles = 16 accumulators + 4 B vectors fit in 32 zmm;
# with 16 registers (AVX2) use 4x2.
_NV_BIG = 4 if _VB == 64 else 2
_NV_MID = 2 if _VB == 64 else 1
_ROWS = 4  # rows per micro-tile (query-block granularity)


# ----------------------------------------------------------------------------------------
# LLVM-level building blocks
# ----------------------------------------------------------------------------------------


def _make_tile(R: int, NV: int):
    """C[c_off + r*ldc + j] (+)= sum_k A[a_off + r*lda + k*ak] * B[b_off + k*ldb + j]
    for r < R, j < NV*Lanes.  Accumulators live in vector registers; C is only loaded (unless
    ``zero``) and stored once.  ``ap``/``bp``/``cp`` are data addresses (see ``_ptr``) of
    arrays of the dtype of ``marker``; offsets/strides are in elements and must stay inside
    the buffers (the caller keeps the arrays alive)."""

    @intrinsic
    def tile(typingctx, marker, ap_, a_off, lda, ak, bp_, b_off, ldb, cp_, c_off, ldc, K, zero,
             mxp_, mx_off):
        ip = types.intp
        sig = types.void(marker, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip, ip)

        def codegen(context, builder, signature, args):
            (_, ap_i, aoff, lda_v, ak_v, bp_i, boff, ldb_v, cp_i, coff, ldc_v, K_v, z_v,
             mxp_i, mxoff) = args
            fty = context.get_value_type(signature.args[0])
            isz = context.get_abi_sizeof(fty)
            L = _VB // isz
            vty = ir.VectorType(fty, L)
            vptr = vty.as_pointer()
            ap = builder.inttoptr(ap_i, fty.as_pointer())
            bp = builder.inttoptr(bp_i, fty.as_pointer())
            cp = builder.inttoptr(cp_i, fty.as_pointer())
            intp = context.get_value_type(types.intp)

            def c(x):
                return ir.Constant(intp, x)

            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vty, [vty] * 3),
                "llvm.fma.v%d%s" % (L, "f32" if isz == 4 else "f64"))
            accs = [[cgutils.alloca_once(builder, vty) for _ in range(NV)] for _ in range(R)]
            zero = ir.Constant(vty, None)
            is_zero = builder.icmp_signed("!=", z_v, c(0))
            cptrs = []
            for r in range(R):
                row = []
                for v in range(NV):
                    off = builder.add(coff, builder.add(builder.mul(c(r), ldc_v), c(v * L)))
                    p = builder.bitcast(builder.gep(cp, [off]), vptr)
                    row.append(p)
                cptrs.append(row)
            with builder.if_else(is_zero) as (then, otherwise):
                with then:
                    for r in range(R):
                        for v in range(NV):
                            builder.store(zero, accs[r][v])
                with otherwise:
                    for r in range(R):
                        for v in range(NV):
                            builder.store(builder.load(cptrs[r][v], align=isz), accs[r][v])
            undef = ir.Constant(vty, ir.Undefined)
            mask0 = ir.Constant(ir.VectorType(ir.IntType(32), L), [0] * L)
            i32_0 = ir.Constant(ir.IntType(32), 0)
            with cgutils.for_range(builder, K_v) as loop:
                kk = loop.index
                brow = builder.add(boff, builder.mul(kk, ldb_v))
                bvs = []
                for v in range(NV):
                    p = builder.bitcast(builder.gep(bp, [builder.add(brow, c(v * L))]), vptr)
                    bvs.append(builder.load(p, align=isz))
                acol = builder.add(aoff, builder.mul(kk, ak_v))
                for r in range(R):
                    a = builder.load(builder.gep(ap, [builder.add(acol, builder.mul(c(r), lda_v))]))
                    av = builder.shuffle_vector(builder.insert_element(undef, a, i32_0), undef, mask0)
                    for v in range(NV):
                        builder.store(builder.call(fma, [av, bvs[v], builder.load(accs[r][v])]),
                                      accs[r][v])
            vals = [[builder.load(accs[r][v]) for v in range(NV)] for r in range(R)]
            for r in range(R):
                for v in range(NV):
                    builder.store(vals[r][v], cptrs[r][v], align=isz)
            # optional epilogue: running column max  mx[mx_off + j] = max(mx[..], C[0..R-1, j])
            # (NaNs are ignored, like the scalar max pass it replaces)
            with builder.if_then(builder.icmp_signed("!=", mxp_i, c(0))):
                mxp = builder.inttoptr(mxp_i, fty.as_pointer())
                for v in range(NV):
                    m = vals[0][v]
                    for r in range(1, R):
                        x = vals[r][v]
                        m = builder.select(builder.fcmp_ordered(">", x, m), x, m)
                    p = builder.bitcast(builder.gep(mxp, [builder.add(mxoff, c(v * L))]), vptr)
                    old = builder.load(p, align=isz)
                    builder.store(builder.select(builder.fcmp_ordered(">", m, old), m, old), p,
                                  align=isz)
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile_big = _make_tile(_ROWS, _NV_BIG)
_tile_mid = _make_tile(_ROWS, _NV_MID)
_tile_one = _make_tile(_ROWS, 1)


@intrinsic
def _lanes(typingctx, marker):
    """Vector lanes for the dtype of the scalar ``marker`` (a compile-time constant)."""
    sig = types.intp(marker)

    def codegen(context, builder, signature, args):
        isz = context.get_abi_sizeof(context.get_value_type(signature.args[0]))
        return ir.Constant(context.get_value_type(types.intp), _VB // isz)

    return sig, codegen


@intrinsic
def _ptr(typingctx, arr):
    """Address of an array's data as an integer (for the micro-kernel)."""
    sig = types.intp(arr)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, context.get_value_type(types.intp))

    return sig, codegen


@intrinsic
def _pow2n(typingctx, nf):
    """2.0**n for an integral float n in the normal exponent range (bit construction)."""
    sig = nf(nf)

    def codegen(context, builder, signature, args):
        (x,) = args
        if signature.args[0] == types.float32:
            it, bias, sh = ir.IntType(32), 127, 23
        else:
            it, bias, sh = ir.IntType(64), 1023, 52
        n = builder.fptosi(x, it)
        e = builder.shl(builder.add(n, ir.Constant(it, bias)), ir.Constant(it, sh))
        return builder.bitcast(e, context.get_value_type(signature.args[0]))

    return sig, codegen


def _exp32(x):
    lo = np.float32(-87.0)
    xc = lo if x < lo else x
    n = np.floor(xc * np.float32(1.4426950408889634) + np.float32(0.5))
    r = xc - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * (r * r) + r + np.float32(1.0)
    e = p * _pow2n(n)
    return np.float32(0.0) if x < lo else e


def _exp64(x):
    lo = -708.0
    xc = lo if x < lo else x
    n = np.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - n * 6.93147180369123816490e-01 - n * 1.90821492927058770002e-10
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * (r * r) + r + 1.0
    e = p * _pow2n(n)
    return 0.0 if x < lo else e


def _expn(x):  # pragma: no cover - replaced by the overload inside jitted code
    return math.exp(x)


@overload(_expn, jit_options={"fastmath": _FASTMATH})
def _ol_expn(x):
    """exp(x) for x <= 0 (or NaN / -inf); vectorizable.  Underflow -> exactly 0."""
    if x == types.float32:
        return _exp32
    if x == types.float64:
        return _exp64
    return None


@intrinsic
def _fetch_add(typingctx, counter, idx):
    """Atomically ``old = counter[idx]; counter[idx] += 1; return old`` (int64 array): the
    dynamic work queue shared by the threads of one parallel region."""
    sig = types.intp(counter, types.intp)

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        one = ir.Constant(context.get_value_type(types.intp), 1)
        return builder.atomic_rmw("add", ptr, one, "monotonic")

    return sig, codegen


# ----------------------------------------------------------------------------------------
# numba helpers (inlined into the parallel kernels)
# ----------------------------------------------------------------------------------------


@njit(fastmath=_FASTMATH)
def _gemm(mk, A, a_off, lda, ak, B, b_off, ldb, C, c_off, ldc, M, N, K, zero, mxp, mx_off):
    """C[i, j] (+)= sum_k A[i, k] B[k, j] on flat element offsets of the data addresses A, B,
    C (dtype of the scalar ``mk``); M % 4 == 0, N % lanes == 0.  If ``mxp`` (an address) is
    not 0, also mx[mx_off + j] = max(mx[mx_off + j], max_i C[i, j]) for the computed C."""
    L = _lanes(mk)
    WB = _NV_BIG * L
    WM = _NV_MID * L
    for i in range(0, M, _ROWS):
        ao = a_off + i * lda
        co = c_off + i * ldc
        j = 0
        while j + WB <= N:
            _tile_big(mk, A, ao, lda, ak, B, b_off + j, ldb, C, co + j, ldc, K, zero,
                      mxp, mx_off + j)
            j += WB
        if j + WM <= N:
            _tile_mid(mk, A, ao, lda, ak, B, b_off + j, ldb, C, co + j, ldc, K, zero,
                      mxp, mx_off + j)
            j += WM
        while j < N:
            _tile_one(mk, A, ao, lda, ak, B, b_off + j, ldb, C, co + j, ldc, K, zero,
                      mxp, mx_off + j)
            j += L


@njit(fastmath=_FASTMATH, inline="always")
def _round_up(x, m):
    return (x + m - 1) // m * m


_NO_DIAG = -(1 << 40)


@njit(inline="always")
def _int_consts():
    return np.intp(0), np.intp(1), np.intp(_ROWS)


@njit(fastmath=_FASTMATH)
def _rows_times_T(X, row0, nr, Kd, BT, ldbt, nc, C, ldc, tail, diag, mx, use_mx):
    """C[j, i] = sum_d X[row0 + j, d] * BT[d, i] for j < round_up(nr, 4), i < nc (zero init).
    X rows are read in place (leading dim X.shape[1]); the last partial 4-row tile goes
    through the zero padded ``tail`` scratch so nothing is read past the end of X.
    Causal diagonal tiles (``diag`` = key offset - query offset, else _NO_DIAG): columns
    i < j + diag are causally masked for row j, so each 4-row tile starts at the vector
    containing column j + diag (the skipped entries are overwritten with -inf by the mask).
    ``use_mx`` (not with ``diag``): also mx[i] = max(mx[i], max_{j < nr} C[j, i]), fused into
    the micro-kernel epilogue."""
    # non-literal ints: literal arguments would make numba compile one copy of the helpers
    # (and of the inlined micro-kernels) per distinct constant
    I0, I1, I4 = _int_consts()
    ldx = X.shape[1]
    L = _lanes(C[0, 0])
    n_main = nr // _ROWS * _ROWS
    mxp = _ptr(mx) if use_mx else 0
    if diag == _NO_DIAG:
        if n_main > 0:
            _gemm(C[0, 0], _ptr(X), row0 * ldx, ldx, I1, _ptr(BT), I0, ldbt, _ptr(C), I0, ldc,
                  n_main, nc, Kd, I1, mxp, I0)
    else:
        for j in range(0, n_main, _ROWS):
            cs = max(0, j + diag) // L * L
            if cs < nc:
                _gemm(C[0, 0], _ptr(X), (row0 + j) * ldx, ldx, I1, _ptr(BT), cs, ldbt, _ptr(C),
                      j * ldc + cs, ldc, I4, nc - cs, Kd, I1, I0, I0)
    rem = nr - n_main
    if rem > 0:
        cs = 0
        if diag != _NO_DIAG:
            cs = max(0, n_main + diag) // L * L
        if cs < nc:
            for r in range(_ROWS):
                if r < rem:
                    xrow = X[row0 + n_main + r]
                    for d in range(Kd):
                        tail[r, d] = xrow[d]
                else:
                    for d in range(Kd):
                        tail[r, d] = 0
            _gemm(C[0, 0], _ptr(tail), I0, tail.shape[1], I1, _ptr(BT), cs, ldbt, _ptr(C),
                  n_main * ldc + cs, ldc, I4, nc - cs, Kd, I1, I0, I0)
            if use_mx:  # the zero padding rows must not enter the max
                for r in range(rem):
                    crow = C[n_main + r]
                    for i in range(nc):
                        x = crow[i]
                        mx[i] = x if x > mx[i] else mx[i]


@njit(fastmath=_FASTMATH)
def _mask_scores_T(St, bias, mask, has_bias, has_mask, causal, b, h, i0, nq, nc, j0, nk):
    """Add bias, apply the boolean mask and the causal rule to the transposed score tile
    St[j, i] (key j0+j, query i0+i).  Causal rows whose key comes after every query of the
    block are set to -inf over all ``nc`` (padded) columns: they may not have been computed."""
    ninf = -np.inf
    for j in range(nk):
        row = St[j]
        gj = j0 + j
        if has_bias:
            if bias.strides[2] == 0:
                bv = bias[b, h, 0, gj]
                for i in range(nq):
                    row[i] += bv
            else:
                bcol = bias[b, h, i0:i0 + nq, gj]
                for i in range(nq):
                    row[i] += bcol[i]
        if has_mask:
            if mask.strides[2] == 0:
                if mask[b, h, 0, gj]:
                    for i in range(nq):
                        row[i] = ninf
            else:
                mcol = mask[b, h, i0:i0 + nq, gj]
                for i in range(nq):
                    if mcol[i]:
                        row[i] = ninf
        if causal:
            lim = max(gj - i0, 0)
            if lim >= nq:
                lim = nc
            for i in range(lim):
                row[i] = ninf


# ----------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------


@njit(fastmath=_FASTMATH)
def _fwd_worker(counter, q, krows, vrows, bias, mask, has_bias, has_mask, causal, scale, bq, bk,
                Tk, Dv, out, lse):
    """One thread of the forward: takes (bh, query block) items from the shared ``counter``
    (most expensive first when causal) until none are left."""
    B, H, Tq, D = q.shape
    L = _VB // q.itemsize
    BH = B * H
    nqb = (Tq + bq - 1) // bq
    nkb = (Tk + bk - 1) // bk
    bqp = _round_up(bq, L)
    bkp = _round_up(bk, _ROWS)
    Dvp = _round_up(Dv, L)
    ldv = vrows.shape[1]
    ninf = -np.inf
    zero = scale - scale
    # non-literal ints: literal arguments would make numba compile one copy of the helpers
    # (and of the inlined micro-kernels) per distinct constant
    I0, I1, I4 = _int_consts()

    nitems = BH * nqb
    # per-thread scratch: O(bq*bk + (bq + bk)*(D + Dv))
    QT = np.empty((D, bqp), dtype=q.dtype)
    St = np.empty((bkp, bqp), dtype=q.dtype)
    Ktail = np.empty((_ROWS, D), dtype=q.dtype)
    O = np.empty((bqp, Dvp), dtype=q.dtype)
    m = np.empty(bqp, dtype=q.dtype)
    ms = np.empty(bqp, dtype=q.dtype)
    mx = np.empty(bqp, dtype=q.dtype)
    l = np.empty(bqp, dtype=q.dtype)
    ls = np.empty(bqp, dtype=q.dtype)
    al = np.empty(bqp, dtype=q.dtype)
    while True:
        it = _fetch_add(counter, 0)
        if it >= nitems:
            break
        qb = it // BH
        bh = it - qb * BH
        if causal:
            qb = nqb - 1 - qb
        b = bh // H
        h = bh - b * H
        i0 = qb * bq
        nq = min(bq, Tq - i0)
        nc = _round_up(nq, L)       # score columns (queries) computed
        nq4 = _round_up(nq, _ROWS)  # output rows computed
        # QT = scale * Q^T, zero padded columns
        for i in range(nq):
            qrow = q[b, h, i0 + i]
            for d in range(D):
                QT[d, i] = qrow[d] * scale
        for d in range(D):
            for i in range(nq, nc):
                QT[d, i] = 0
        for i in range(nc):
            m[i] = ninf
            l[i] = 0
        O[:nq4, :] = 0
        kb_end = nkb
        if causal:
            kb_end = min(nkb, (i0 + nq - 1) // bk + 1)
        for kb in range(kb_end):
            j0 = kb * bk
            nk = min(bk, Tk - j0)
            # St[j, i] = s(query i0+i, key j0+j)
            diag = causal and j0 + nk - 1 > i0
            doff = j0 - i0 if diag else _NO_DIAG
            # column max fused into the GEMM unless bias / mask / causal edit the scores
            fuse = not (has_bias or has_mask or diag)
            for i in range(nc):
                mx[i] = ninf
                ls[i] = 0
            _rows_times_T(krows, bh * Tk + j0, nk, D, QT, bqp, nc, St, bqp, Ktail, doff, mx,
                          fuse)
            if not fuse:
                _mask_scores_T(St, bias, mask, has_bias, has_mask, diag,
                               b, h, i0, nq, nc, j0, nk)
                for j in range(nk):
                    row = St[j]
                    for i in range(nc):
                        x = row[i]
                        mx[i] = x if x > mx[i] else mx[i]
            # ---- online softmax, column-wise (vectorized over queries) -------------
            for i in range(nc):
                mo = m[i]
                mn = mx[i] if mx[i] > mo else mo
                msafe = zero if mn == ninf else mn
                al[i] = _expn(mo - msafe)
                m[i] = mn
                ms[i] = msafe
            for j in range(nk):
                row = St[j]
                for i in range(nc):
                    e_ = _expn(row[i] - ms[i])
                    row[i] = e_
                    ls[i] += e_
            for i in range(nc):
                l[i] = l[i] * al[i] + ls[i]
            for i in range(nq):
                a_ = al[i]
                if a_ != 1:
                    orow = O[i]
                    for e in range(Dvp):
                        orow[e] *= a_
            # ---- O += P V  (A = P^T read column-wise) ------------------------------
            if diag:  # query rows i..i+3 only see keys < i0 + i + 4
                for i in range(0, nq4, _ROWS):
                    kn = min(nk, i0 + i + _ROWS - j0)
                    if kn > 0:
                        _gemm(zero, _ptr(St), i, I1, bqp, _ptr(vrows), (bh * Tk + j0) * ldv, ldv,
                              _ptr(O), i * Dvp, Dvp, I4, Dvp, kn, I0, I0, I0)
            else:
                _gemm(zero, _ptr(St), I0, I1, bqp, _ptr(vrows), (bh * Tk + j0) * ldv, ldv,
                      _ptr(O), I0, Dvp, nq4, Dvp, nk, I0, I0, I0)
        for i in range(nq):
            li = l[i]
            orow = out[b, h, i0 + i]
            src = O[i]
            if li > 0:
                inv = 1 / li
                for e in range(Dv):
                    orow[e] = src[e] * inv
                lse[b, h, i0 + i] = m[i] + np.log(li)
            else:
                for e in range(Dv):
                    orow[e] = 0
                lse[b, h, i0 + i] = ninf


def _fwd_impl(q, krows, vrows, bias, mask, has_bias, has_mask, causal, scale, bq, bk,
              Tk, Dv, out, lse, nthreads):
    """q (B,H,Tq,D); krows (B*H*Tk, >=D) and vrows (B*H*Tk, round_up(Dv, lanes)) hold K and V
    row-major (V zero padded to whole vectors); out (B,H,Tq,Dv), lse (B,H,Tq)."""
    B, H, Tq, D = q.shape
    nitems = B * H * ((Tq + bq - 1) // bq)
    nt = max(1, min(nthreads, nitems))
    counter = np.zeros(1, dtype=np.int64)
    for t in prange(nt):
        _fwd_worker(counter, q, krows, vrows, bias, mask, has_bias, has_mask, causal, scale,
                    bq, bk, Tk, Dv, out, lse)



# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------


@njit(fastmath=_FASTMATH)
def _bwd_pack_worker(counter, q, out, lse, dout, scale, bq, nbuf, QTp, dOTp, Dvec, Lvec, dQacc):
    """Backward pass 1, items (bh, query block): QTp = scale*Q^T, dOTp = dO^T (zero padded
    columns), Dvec = rowsum(dO*O), Lvec = lse with -inf -> +inf (so that exp(s - lse) = 0 on
    fully masked rows and padding), and zero the dQ accumulators."""
    B, H, Tq, D = q.shape
    Dv = dout.shape[3]
    nqb = (Tq + bq - 1) // bq
    bqp = QTp.shape[2]
    bq4 = _round_up(bq, _ROWS)
    nitems = B * H * nqb
    pinf = np.inf
    while True:
        it = _fetch_add(counter, 0)
        if it >= nitems:
            break
        bh = it // nqb
        qb = it - bh * nqb
        b = bh // H
        h = bh - b * H
        i0 = qb * bq
        nq = min(bq, Tq - i0)
        QT = QTp[it]
        dOT = dOTp[it]
        Di = Dvec[it]
        Li = Lvec[it]
        for i in range(nq):
            qrow = q[b, h, i0 + i]
            for d in range(D):
                QT[d, i] = qrow[d] * scale
            dorow = dout[b, h, i0 + i]
            orow = out[b, h, i0 + i]
            acc = scale - scale
            for e in range(Dv):
                x = dorow[e]
                dOT[e, i] = x
                acc += x * orow[e]
            Di[i] = acc
            lv = lse[b, h, i0 + i]
            Li[i] = pinf if lv == -pinf else lv
        for i in range(nq, bqp):
            Di[i] = 0
            Li[i] = pinf
        for d in range(D):
            for i in range(nq, bqp):
                QT[d, i] = 0
        for e in range(Dv):
            for i in range(nq, bqp):
                dOT[e, i] = 0
        for r in range(nbuf):
            dQacc[r, it * bq4:(it + 1) * bq4, :] = 0


@njit(fastmath=_FASTMATH)
def _bwd_main_worker(t, counter, q, qrows, krows, vrows, dorows, bias, mask, has_bias,
                     has_mask, causal, scale, bq, bk, Tk, Dv, nbuf, QTp, dOTp, Dvec, Lvec,
                     dQacc, dk, dv):
    """Backward pass 2.  nbuf == 1: items are whole heads (bh), so the dQ rows of a head are
    owned by one thread; nbuf > 1: items are (bh, key block) and thread ``t`` accumulates dQ
    into its own dQacc[t].  Per key block: loop over the query blocks recomputing P^T from
    lse, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - Di), dK += dS^T Q, dQ += dS K."""
    B, H, Tq, D = q.shape
    L = _VB // q.itemsize
    BH = B * H
    nqb = (Tq + bq - 1) // bq
    nkb = (Tk + bk - 1) // bk
    bqp = _round_up(bq, L)
    bq4 = _round_up(bq, _ROWS)
    bkp = _round_up(bk, _ROWS)
    Dp = _round_up(D, L)
    Dvp = _round_up(Dv, L)
    ldq = qrows.shape[1]
    ldk = krows.shape[1]
    ldv = vrows.shape[1]
    lddo = dorows.shape[1]
    zero = scale - scale
    # non-literal ints: literal arguments would make numba compile one copy of the helpers
    # (and of the inlined micro-kernels) per distinct constant
    I0, I1, I4 = _int_consts()
    no_mx = np.bool_(False)
    if nbuf == 1:
        n2 = BH
        per = nkb
    else:
        n2 = BH * nkb
        per = 1
    buf = np.intp(0)
    if nbuf > 1:
        buf = t
    St = np.empty((bkp, bqp), dtype=q.dtype)
    dPt = np.empty((bkp, bqp), dtype=q.dtype)
    dKa = np.empty((bkp, Dp), dtype=q.dtype)
    dVa = np.empty((bkp, Dvp), dtype=q.dtype)
    Ktail = np.empty((_ROWS, D), dtype=q.dtype)
    Vtail = np.empty((_ROWS, Dv), dtype=q.dtype)
    dQb = dQacc[buf]
    while True:
        it2 = _fetch_add(counter, 0)
        if it2 >= n2:
            break
        for sub in range(per):
            if nbuf == 1:
                bh = it2
                kb = sub
            else:
                kb = it2 // BH  # key block ascending: most expensive first when causal
                bh = it2 - kb * BH
            b = bh // H
            h = bh - b * H
            j0 = kb * bk
            nk = min(bk, Tk - j0)
            nk4 = _round_up(nk, _ROWS)
            dKa[:nk4, :] = 0
            dVa[:nk4, :] = 0
            qb0 = 0
            if causal:
                qb0 = j0 // bq
            for qb in range(qb0, nqb):
                i0 = qb * bq
                nq = min(bq, Tq - i0)
                nc = _round_up(nq, L)
                nq4 = _round_up(nq, _ROWS)
                pk = bh * nqb + qb
                Di = Dvec[pk]
                Li = Lvec[pk]
                # S^T, then P^T = exp(S^T - lse)
                diag = causal and j0 + nk - 1 > i0
                doff = j0 - i0 if diag else _NO_DIAG
                _rows_times_T(krows, bh * Tk + j0, nk, D, QTp[pk], bqp, nc, St, bqp, Ktail,
                              doff, Li, no_mx)
                if has_bias or has_mask or diag:
                    _mask_scores_T(St, bias, mask, has_bias, has_mask, diag,
                                   b, h, i0, nq, nc, j0, nk)
                for j in range(nk):
                    row = St[j]
                    for i in range(nc):
                        row[i] = _expn(row[i] - Li[i])
                # dV += P^T dO   (diagonal tiles: key row j only sees queries i >= j + doff)
                if diag:
                    for j in range(0, nk4, _ROWS):
                        ks = max(0, j + doff)
                        if ks < nq:
                            _gemm(zero, _ptr(St), j * bqp + ks, bqp, I1, _ptr(dorows),
                                  (bh * Tq + i0 + ks) * lddo, lddo, _ptr(dVa), j * Dvp, Dvp,
                                  I4, Dvp, nq - ks, I0, I0, I0)
                else:
                    _gemm(zero, _ptr(St), I0, bqp, I1, _ptr(dorows), (bh * Tq + i0) * lddo, lddo,
                          _ptr(dVa), I0, Dvp, nk4, Dvp, nq, I0, I0, I0)
                # dP^T = V dO^T
                _rows_times_T(vrows, bh * Tk + j0, nk, Dv, dOTp[pk], bqp, nc, dPt, bqp, Vtail,
                              doff, Li, no_mx)
                # dS^T = P^T * (dP^T - Di)   (zero where causally masked: dP^T not computed)
                for j in range(nk):
                    prow = St[j]
                    drow = dPt[j]
                    lo = 0
                    if diag:
                        lo = min(max(j + doff, 0), nc)
                        for i in range(lo):
                            drow[i] = 0
                    for i in range(lo, nc):
                        drow[i] = prow[i] * (drow[i] - Di[i])
                # dK += dS^T Q      (scale applied when written out)
                if diag:
                    for j in range(0, nk4, _ROWS):
                        ks = max(0, j + doff)
                        if ks < nq:
                            _gemm(zero, _ptr(dPt), j * bqp + ks, bqp, I1, _ptr(qrows),
                                  (bh * Tq + i0 + ks) * ldq, ldq, _ptr(dKa), j * Dp, Dp,
                                  I4, Dp, nq - ks, I0, I0, I0)
                else:
                    _gemm(zero, _ptr(dPt), I0, bqp, I1, _ptr(qrows), (bh * Tq + i0) * ldq, ldq,
                          _ptr(dKa), I0, Dp, nk4, Dp, nq, I0, I0, I0)
                # dQ += dS K        (scale applied in pass 3)
                if diag:
                    for i in range(0, nq4, _ROWS):
                        kn = min(nk, i0 + i + _ROWS - j0)
                        if kn > 0:
                            _gemm(zero, _ptr(dPt), i, I1, bqp, _ptr(krows), (bh * Tk + j0) * ldk,
                                  ldk, _ptr(dQb), (pk * bq4 + i) * Dp, Dp, I4, Dp, kn, I0, I0, I0)
                else:
                    _gemm(zero, _ptr(dPt), I0, I1, bqp, _ptr(krows), (bh * Tk + j0) * ldk, ldk,
                          _ptr(dQb), pk * bq4 * Dp, Dp, nq4, Dp, nk, I0, I0, I0)
            for j in range(nk):
                dkrow = dk[b, h, j0 + j]
                src = dKa[j]
                for d in range(D):
                    dkrow[d] = src[d] * scale
                dvrow = dv[b, h, j0 + j]
                srcv = dVa[j]
                for e in range(Dv):
                    dvrow[e] = srcv[e]


@njit(fastmath=_FASTMATH)
def _bwd_dq_worker(counter, scale, bq, nbuf, dQacc, dq):
    """Backward pass 3, items (bh, query block): dq = scale * sum of the dQ accumulators."""
    B, H, Tq, D = dq.shape
    nqb = (Tq + bq - 1) // bq
    bq4 = _round_up(bq, _ROWS)
    nitems = B * H * nqb
    while True:
        it = _fetch_add(counter, 0)
        if it >= nitems:
            break
        bh = it // nqb
        qb = it - bh * nqb
        b = bh // H
        h = bh - b * H
        i0 = qb * bq
        nq = min(bq, Tq - i0)
        for i in range(nq):
            dqrow = dq[b, h, i0 + i]
            r0 = dQacc[0, it * bq4 + i]
            for d in range(D):
                dqrow[d] = r0[d]
            for r in range(1, nbuf):
                rr = dQacc[r, it * bq4 + i]
                for d in range(D):
                    dqrow[d] += rr[d]
            for d in range(D):
                dqrow[d] *= scale


def _bwd_impl(q, qrows, krows, vrows, dorows, out, lse, dout, bias, mask, has_bias, has_mask,
              causal, scale, bq, bk, Tk, nbuf, QTp, dOTp, Dvec, Lvec, dQacc, dq, dk, dv,
              nthreads):
    """FlashAttention-2 style backward.  ``*rows`` are (rows, ld) row-major views of the
    inputs, zero padded to whole vectors where the head dim needs it; QTp / dOTp / Dvec / Lvec
    are per-query-block packing buffers; dQacc (nbuf, BH*nqb*bq4, Dp) accumulates dQ/scale."""
    B, H, Tq, D = q.shape
    Dv = dout.shape[3]
    BH = B * H
    nqb = (Tq + bq - 1) // bq
    nkb = (Tk + bk - 1) // bk
    counters = np.zeros(3, dtype=np.int64)
    nt1 = max(1, min(nthreads, BH * nqb))
    for t in prange(nt1):
        _bwd_pack_worker(counters[0:1], q, out, lse, dout, scale, bq, nbuf, QTp, dOTp,
                         Dvec, Lvec, dQacc)
    n2 = BH if nbuf == 1 else BH * nkb
    nt2 = max(1, min(nthreads, n2))
    for t in prange(nt2):
        _bwd_main_worker(np.intp(t), counters[1:2], q, qrows, krows, vrows, dorows, bias,
                         mask, has_bias, has_mask, causal, scale, bq, bk, Tk, Dv, nbuf,
                         QTp, dOTp, Dvec, Lvec, dQacc, dk, dv)
    for t in prange(nt1):
        _bwd_dq_worker(counters[2:3], scale, bq, nbuf, dQacc, dq)


# ----------------------------------------------------------------------------------------
# lazy, explicitly typed compilation (one specialisation per kernel and dtype)
# ----------------------------------------------------------------------------------------

_JIT_OPTS = dict(parallel=True, cache=True, fastmath=_FASTMATH, nogil=True)
_KERNELS: dict = {}


def _arr(dt, ndim, layout="C", readonly=False):
    return types.Array(dt, ndim, layout, readonly=readonly)


def _signature(name, dt):
    ip = types.intp
    bl = types.boolean
    ro4 = _arr(dt, 4, "C", True)
    ro2 = _arr(dt, 2, "C", True)
    bias_t = _arr(dt, 4, "A", True)
    mask_t = _arr(types.boolean, 4, "A", True)
    if name == "fwd":
        return types.void(ro4, ro2, ro2, bias_t, mask_t, bl, bl, bl, dt, ip, ip, ip, ip,
                          _arr(dt, 4), _arr(dt, 3), ip)
    if name == "bwd":
        return types.void(ro4, ro2, ro2, ro2, ro2, ro4, _arr(dt, 3, "C", True), ro4,
                          bias_t, mask_t, bl, bl, bl, dt, ip, ip, ip, ip,
                          _arr(dt, 3), _arr(dt, 3), _arr(dt, 2), _arr(dt, 2), _arr(dt, 3),
                          _arr(dt, 4), _arr(dt, 4), _arr(dt, 4), ip)
    raise KeyError(name)


def _kernel(name, dt):
    key = (name, dt)
    fn = _KERNELS.get(key)
    if fn is None:
        nbdt = numba.from_dtype(np.dtype(dt))
        py = {"fwd": _fwd_impl, "bwd": _bwd_impl}[name]
        sig = _signature(name, nbdt)
        fn = njit(**_JIT_OPTS)(py)
        try:
            fn.compile(sig)
        except Exception:
            # numba's disk cache is keyed by file, but an entry pickles the *module name* it
            # was compiled under; an entry written by a process that loaded this file under
            # another name cannot be loaded here.  Drop the stale entries and recompile.
            cache = getattr(fn, "_cache", None)
            if cache is None or not hasattr(cache, "flush"):
                raise
            cache.flush()
            fn.compile(sig)
        fn.disable_compile()  # exactly one specialisation per kernel and dtype
        _KERNELS[key] = fn
    return fn


# ----------------------------------------------------------------------------------------
# block sizes
# ----------------------------------------------------------------------------------------


def _block(T, max_block, gran):
    """Full blocks of ``max_block`` (a multiple of ``gran``) plus a remainder block; a sequence
    no longer than ``max_block + gran`` is one block rounded up to ``gran`` (no tiny remainder
    block).  Only the last block is padded (to ``gran``), so at most gran-1 rows/columns are
    wasted per (batch, head)."""
    t = max(gran, -(-T // gran) * gran)
    return t if t <= max_block + gran else max_block


def _fwd_blocks(Tq, Tk, D, Dv, itemsize, causal=False):
    """Query blocks are score *columns* (granularity: one vector), key blocks are score rows
    (granularity: the 4-row micro-tile).  St (block_k x block_q) stays within L2."""
    lanes = _VB // itemsize
    bq_max = 128 if (Tq >= 1024 and max(D, Dv) <= 128) else 64
    bk_max = 64 if causal else 256
    return _block(Tq, bq_max, lanes), _block(Tk, bk_max, _ROWS)


def _bwd_blocks(Tq, Tk, D, Dv, itemsize, causal=False):
    lanes = _VB // itemsize
    return _block(Tq, 64, lanes), _block(Tk, 64, _ROWS)


def _c(x):
    """C-contiguous and aligned (what the compiled signatures expect)."""
    x = np.ascontiguousarray(x)
    return x if x.flags.aligned else x.copy()


def _rows(x, lanes):
    """(B,H,T,E) -> (B*H*T, E') row-major view, zero padded to E' = round_up(E, lanes) only
    when E is not a multiple of the vector width (the micro-kernel reads whole vectors)."""
    B, H, T, E = x.shape
    r = _c(x).reshape(B * H * T, E)
    if E % lanes:
        r = np.pad(r, ((0, 0), (0, lanes - E % lanes)))
    return r


# ----------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------

_DUMMY: dict = {}


def _dummies(dt):
    d = _DUMMY.get(dt)
    if d is None:
        d = (np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=dt), (1, 1, 1, 1)),
             np.broadcast_to(np.zeros((1, 1, 1, 1), dtype=np.bool_), (1, 1, 1, 1)))
        _DUMMY[dt] = d
    return d


def _check_array(name, a, ndim):
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    if a.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name} must be float32 or float64, got {a.dtype}")


def _check_qkv(q, k, v):
    _check_array("q", q, 4)
    _check_array("k", k, 4)
    _check_array("v", v, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Tq, D = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"batch/head dims differ: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: q {q.shape}, k {k.shape}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v sequence lengths differ: k {k.shape}, v {v.shape}")
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1: q {q.shape}, v {v.shape}")
    return B, H, Tq, k.shape[2], D, v.shape[3]


def _check_scale(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, (bool, np.bool_)):
        raise ValueError(f"scale must be a real number, got {scale!r}")
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a real number, got {scale!r}") from None
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {s}")
    return s


def _prep_bias_mask(bias, mask, full, dt):
    dbias, dmask = _dummies(dt)
    if bias is None:
        b = dbias
    else:
        if not isinstance(bias, np.ndarray):
            raise ValueError(f"bias must be a numpy.ndarray, got {type(bias).__name__}")
        if bias.dtype.kind != "f":
            raise ValueError(f"bias must be a float array, got {bias.dtype}")
        if bias.ndim > 4:
            raise ValueError(f"bias must be broadcastable to {full}, got shape {bias.shape}")
        try:
            bias = bias.astype(dt, copy=False)
            if not bias.flags.aligned:
                bias = bias.copy()
            b = np.broadcast_to(bias, full)
        except ValueError:
            raise ValueError(f"bias of shape {bias.shape} is not broadcastable to {full}") from None
    if mask is None:
        m = dmask
    else:
        if not isinstance(mask, np.ndarray):
            raise ValueError(f"mask must be a numpy.ndarray, got {type(mask).__name__}")
        if mask.dtype != np.bool_:
            raise ValueError(f"mask must be a boolean array (True = masked out), got {mask.dtype}")
        if mask.ndim > 4:
            raise ValueError(f"mask must be broadcastable to {full}, got shape {mask.shape}")
        try:
            m = np.broadcast_to(mask if mask.flags.aligned else mask.copy(), full)
        except ValueError:
            raise ValueError(f"mask of shape {mask.shape} is not broadcastable to {full}") from None
    return b, m, bias is not None, mask is not None


# ----------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------


def attention_forward(q, k, v, *, scale=None, causal=False, bias=None, mask=None,
                      return_lse=False, out=None):
    """Scaled dot-product attention, flash style (see the module docstring).

    q (B,H,Tq,D), k (B,H,Tk,D), v (B,H,Tk,Dv); float32 or float64 (all the same dtype).
    scale: float, default 1/sqrt(D).  bias: additive float array broadcastable to
    (B,H,Tq,Tk) (may contain -inf).  mask: boolean array broadcastable to (B,H,Tq,Tk),
    True = masked out.  causal: query i attends key j only when j <= i (top-left aligned).
    Returns out (B,H,Tq,Dv) [and lse (B,H,Tq), -inf for fully masked rows, whose output row
    is 0].  ``out``: a C-contiguous (B,H,Tq,Dv) array of q's dtype to write the result into
    (the executor passes its planned buffer, so no second T×Dv array is allocated).
    Raises ValueError on invalid inputs.
    """
    return _forward(q, k, v, scale=scale, causal=causal, bias=bias, mask=mask,
                    return_lse=return_lse, out=out)


def _forward(q, k, v, *, scale=None, causal=False, bias=None, mask=None, return_lse=False,
             block_q=None, block_k=None, out=None):
    B, H, Tq, Tk, D, Dv = _check_qkv(q, k, v)
    dt = q.dtype
    scale = _check_scale(scale, D)
    bias_a, mask_a, has_bias, has_mask = _prep_bias_mask(bias, mask, (B, H, Tq, Tk), dt)
    if out is None:
        out = np.empty((B, H, Tq, Dv), dtype=dt)
    elif (out.shape != (B, H, Tq, Dv) or out.dtype != dt or not out.flags.c_contiguous
          or not out.flags.writeable):
        raise ValueError(f"out must be a writeable C-contiguous {(B, H, Tq, Dv)} {dt} array, "
                         f"got {out.shape} {out.dtype}")
    lse = np.empty((B, H, Tq), dtype=dt)
    if B * H * Tq == 0:
        return (out, lse) if return_lse else out
    lanes = _VB // dt.itemsize
    bq, bk = _fwd_blocks(Tq, Tk, D, Dv, dt.itemsize, causal)
    if block_q is not None:
        bq = max(1, int(block_q))
    if block_k is not None:
        bk = max(1, int(block_k))
    q = _c(q)
    krows = _c(k).reshape(B * H * Tk, D)
    vrows = _rows(v, lanes)
    _kernel("fwd", dt.type)(q, krows, vrows, bias_a, mask_a, has_bias, has_mask, bool(causal),
                            scale, bq, bk, Tk, Dv, out, lse, numba.get_num_threads())
    return (out, lse) if return_lse else out


def attention_backward(q, k, v, out, lse, dout, *, scale=None, causal=False, bias=None,
                       mask=None):
    """Gradients of ``attention_forward`` w.r.t. q, k, v (FlashAttention-2 recomputation).

    ``out`` and ``lse`` are the forward results (``return_lse=True``), ``dout`` the gradient of
    the loss w.r.t. ``out``.  scale / causal / bias / mask must be the forward's.  Returns
    (dq, dk, dv) with the shapes of q, k, v.  Fully masked query rows get zero gradients.
    The Tq x Tk score matrix is never materialised (block-wise recomputation from lse).
    """
    return _backward(q, k, v, out, lse, dout, scale=scale, causal=causal, bias=bias, mask=mask)


def _backward(q, k, v, out, lse, dout, *, scale=None, causal=False, bias=None, mask=None,
              block_q=None, block_k=None):
    B, H, Tq, Tk, D, Dv = _check_qkv(q, k, v)
    dt = q.dtype
    _check_array("out", out, 4)
    _check_array("dout", dout, 4)
    _check_array("lse", lse, 3)
    for name, a, shp in (("out", out, (B, H, Tq, Dv)), ("dout", dout, (B, H, Tq, Dv)),
                         ("lse", lse, (B, H, Tq))):
        if a.shape != shp:
            raise ValueError(f"{name} must have shape {shp}, got {a.shape}")
        if a.dtype != dt:
            raise ValueError(f"{name} must have dtype {dt} like q, got {a.dtype}")
    scale = _check_scale(scale, D)
    bias_a, mask_a, has_bias, has_mask = _prep_bias_mask(bias, mask, (B, H, Tq, Tk), dt)
    if B * H * Tq == 0 or Tk == 0:
        return (np.zeros((B, H, Tq, D), dtype=dt), np.zeros((B, H, Tk, D), dtype=dt),
                np.zeros((B, H, Tk, Dv), dtype=dt))
    dq = np.empty((B, H, Tq, D), dtype=dt)
    dk = np.empty((B, H, Tk, D), dtype=dt)
    dv = np.empty((B, H, Tk, Dv), dtype=dt)
    lanes = _VB // dt.itemsize
    bq, bk = _bwd_blocks(Tq, Tk, D, Dv, dt.itemsize, causal)
    if block_q is not None:
        bq = max(1, int(block_q))
    if block_k is not None:
        bk = max(1, int(block_k))
    BH = B * H
    nqb = -(-Tq // bq)
    nkb = -(-Tk // bk)
    bqp = -(-bq // lanes) * lanes
    bq4 = -(-bq // _ROWS) * _ROWS
    Dp = -(-D // lanes) * lanes
    nt = numba.get_num_threads()
    # dQ ownership: whole heads per thread when that balances, else per-thread accumulators
    nbuf = 1 if (nt == 1 or BH % nt == 0 or BH >= 8 * nt) else nt
    q = _c(q)
    out = _c(out)
    dout = _c(dout)
    lse = _c(lse)
    qrows = _rows(q, lanes)
    krows = _rows(k, lanes)
    vrows = _c(v).reshape(BH * Tk, Dv)
    dorows = _rows(dout, lanes)
    QTp = np.empty((BH * nqb, D, bqp), dtype=dt)
    dOTp = np.empty((BH * nqb, Dv, bqp), dtype=dt)
    Dvec = np.empty((BH * nqb, bqp), dtype=dt)
    Lvec = np.empty((BH * nqb, bqp), dtype=dt)
    dQacc = np.empty((nbuf, BH * nqb * bq4, Dp), dtype=dt)
    _kernel("bwd", dt.type)(q, qrows, krows, vrows, dorows, out, lse, dout, bias_a, mask_a,
                            has_bias, has_mask, bool(causal), scale, bq, bk, Tk, nbuf,
                            QTp, dOTp, Dvec, Lvec, dQacc, dq, dk, dv, nt)
    return dq, dk, dv
