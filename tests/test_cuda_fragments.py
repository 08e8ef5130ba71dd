"""The index arithmetic of the tensor-core GEMM (cuda/gemm.cu), checked without a GPU.

A numpy model of one block's K step runs the kernel's own formulas (copied below, one for one:
shared-memory tile layouts of the cp.async loaders, the ldmatrix row addresses of each lane,
the fragment registers fed to mma.sync, the epilogue's output positions) under the PTX
semantics of ldmatrix (.trans) and mma.m16n8k16, and must reproduce A @ B for every operand
layout and for the SwiGLU gate/up interleaving. What it cannot check is the PTX semantics
themselves; the ``gpu`` tests do that on a device.
"""

import numpy as np
import pytest

BM = BN = 128
BK = 32
PAD = 8
K_STRIDE = BK + PAD
X_STRIDE = BM + PAD


# ---- the loaders: element (row, k) of the block's operand -> shared-memory offset -----------


def store_kmajor(tile):  # tile [128 rows, BK]
    smem = np.zeros(BM * K_STRIDE)
    for c in range(BM * BK // 8):  # load_kmajor: r = c >> 2, kc = (c & 3) * 8
        r, kc = c >> 2, (c & 3) * 8
        smem[r * K_STRIDE + kc : r * K_STRIDE + kc + 8] = tile[r, kc : kc + 8]
    return smem


def store_xmajor(tile):  # tile [128 rows, BK], stored with the rows contiguous
    smem = np.zeros(BK * X_STRIDE)
    for c in range(BK * BM // 8):  # load_xmajor: kr = c >> 4, xc = (c & 15) * 8
        kr, xc = c >> 4, (c & 15) * 8
        smem[kr * X_STRIDE + xc : kr * X_STRIDE + xc + 8] = tile[xc : xc + 8, kr]
    return smem


# ---- PTX semantics ----------------------------------------------------------------------


def ldmatrix_x4(smem, addr, trans):
    """regs[lane][i] = the two 16-bit values lane receives from matrix i (lanes 8i..8i+7 address its rows)."""
    regs = np.zeros((32, 4, 2))
    for i in range(4):
        rows = [smem[addr[8 * i + r] : addr[8 * i + r] + 8] for r in range(8)]
        m = np.array(rows)  # [8 rows, 8 cols] as stored
        for lane in range(32):
            if trans:
                regs[lane, i] = m[2 * (lane % 4) : 2 * (lane % 4) + 2, lane // 4]
            else:
                regs[lane, i] = m[lane // 4, 2 * (lane % 4) : 2 * (lane % 4) + 2]
    return regs


def mma_16816(d, a, b0, b1):
    """d[lane][4] += A (from a[lane][4][2]) @ B (from b0, b1 [lane][2]) in the m16n8k16 layouts."""
    am = np.zeros((16, 16))
    bm = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        am[g, 2 * t : 2 * t + 2] = a[lane][0]
        am[g + 8, 2 * t : 2 * t + 2] = a[lane][1]
        am[g, 8 + 2 * t : 8 + 2 * t + 2] = a[lane][2]
        am[g + 8, 8 + 2 * t : 8 + 2 * t + 2] = a[lane][3]
        bm[2 * t : 2 * t + 2, g] = b0[lane]
        bm[8 + 2 * t : 8 + 2 * t + 2, g] = b1[lane]
    c = am @ bm
    for lane in range(32):
        g, t = lane // 4, lane % 4
        d[lane] += [c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]]


# ---- one block, one BK step, the kernel's formulas ----------------------------------------


def block_product(a_tile, b_tile, a_k, b_k):
    """C [128, 128] of one block from a_tile [128, BK] (M x K) and b_tile [128, BK] (N x K)."""
    as_ = store_kmajor(a_tile) if a_k else store_xmajor(a_tile)
    bs = store_kmajor(b_tile) if b_k else store_xmajor(b_tile)
    acc = np.zeros((8, 4, 4, 32, 4))  # [warp][mf][nf][lane][i]
    lanes = np.arange(32)
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        for kk in range(0, BK, 16):
            af = []
            for mf in range(4):
                m0 = wm * 64 + mf * 16
                if a_k:
                    addr = (m0 + (lanes & 15)) * K_STRIDE + kk + (lanes >> 4) * 8
                else:
                    k = kk + (lanes & 7) + (lanes >> 4) * 8
                    addr = k * X_STRIDE + m0 + ((lanes >> 3) & 1) * 8
                af.append(ldmatrix_x4(as_, addr, trans=not a_k))
            bf = []
            for np_ in range(2):
                c0 = wn * 32 + np_ * 16
                if b_k:
                    row = c0 + (lanes & 7) + (lanes >> 4) * 8
                    addr = row * K_STRIDE + kk + ((lanes >> 3) & 1) * 8
                else:
                    k = kk + (lanes & 7) + ((lanes >> 3) & 1) * 8
                    addr = k * X_STRIDE + c0 + (lanes >> 4) * 8
                bf.append(ldmatrix_x4(bs, addr, trans=not b_k))
            for mf in range(4):
                for nf in range(4):
                    b = bf[nf >> 1]
                    mma_16816(acc[warp, mf, nf], af[mf], b[:, (nf & 1) * 2], b[:, (nf & 1) * 2 + 1])
    return acc


def store_tile(acc):
    """The epilogue's positions (store_tile): C[row, col], C[row, col + 1] <- acc[.., 2h], acc[.., 2h + 1]."""
    c = np.full((BM, BN), np.nan)
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        for mf in range(4):
            for nf in range(4):
                for h in range(2):
                    for lane in range(32):
                        row = wm * 64 + mf * 16 + (lane >> 2) + h * 8
                        col = wn * 32 + nf * 8 + (lane & 3) * 2
                        c[row, col] = acc[warp, mf, nf, lane, 2 * h]
                        c[row, col + 1] = acc[warp, mf, nf, lane, 2 * h + 1]
    return c


@pytest.mark.parametrize("a_k, b_k", [(True, True), (True, False), (False, False)])
def test_fragment_arithmetic_computes_the_block_product(a_k, b_k):
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 4, (BM, BK)).astype(float)
    b = rng.integers(-3, 4, (BN, BK)).astype(float)
    c = store_tile(block_product(a, b, a_k, b_k))
    np.testing.assert_array_equal(c, a @ b.T)


def test_swiglu_interleaving_pairs_each_gate_column_with_its_up_column():
    # load_kmajor<SWIGLU>: virtual row r holds weight row (gate if r % 32 < 16 else up) of act
    # column n0 + (r / 32) * 16 + r % 16; the epilogue pairs fragment nf (gate) with nf + 2 (up).
    rng = np.random.default_rng(1)
    f, k, n0 = 64, BK, 0
    w = rng.integers(-3, 4, (2 * f, k)).astype(float)  # [gate rows; up rows]
    x = rng.integers(-3, 4, (BM, k)).astype(float)
    virtual = np.zeros((BN, k))
    for r in range(BN):
        col = n0 + (r >> 5) * 16 + (r & 15)
        virtual[r] = w[col if (r & 31) < 16 else f + col]
    acc = block_product(x, virtual, True, True)
    h = x @ w.T
    for warp in range(8):
        wm, wn = warp >> 2, warp & 3
        for mf in range(4):
            for nf in range(2):
                for hh in range(2):
                    for lane in range(32):
                        row = wm * 64 + mf * 16 + (lane >> 2) + hh * 8
                        col = n0 + wn * 16 + nf * 8 + (lane & 3) * 2
                        for j in range(2):
                            assert acc[warp, mf, nf, lane, 2 * hh + j] == h[row, col + j]
                            assert acc[warp, mf, nf + 2, lane, 2 * hh + j] == h[row, f + col + j]


def test_the_model_uses_the_kernels_own_formulas():
    # The expressions modelled above, as they are written in cuda/gemm.cu: a change there
    # must be carried into the model (and pass it) here.
    from deepseek_rs.cuda import _runtime

    src = " ".join(_runtime.source("gemm.cu").split())
    for expr in [
        "int r = c >> 2, kc = (c & 3) * 8;",
        "int kr = c >> 4, xc = (c & 15) * 8;",
        "slot + r * K_STRIDE + kc",
        "slot + kr * X_STRIDE + xc",
        "int col = n0 + (r >> 5) * 16 + (r & 15);",
        "(r & 31) < 16 ? col : F + col",
        "as + (m0 + (lane & 15)) * K_STRIDE + kk + (lane >> 4) * 8",
        "int k = kk + (lane & 7) + (lane >> 4) * 8;",
        "as + k * X_STRIDE + m0 + ((lane >> 3) & 1) * 8",
        "int row = c0 + (lane & 7) + (lane >> 4) * 8;",
        "bs + row * K_STRIDE + kk + ((lane >> 3) & 1) * 8",
        "int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;",
        "bs + k * X_STRIDE + c0 + (lane >> 4) * 8",
        "bf[nf >> 1][(nf & 1) * 2], bf[nf >> 1][(nf & 1) * 2 + 1]",
        "int row = wm * 64 + mf * 16 + (lane >> 2) + h * 8;",
        "int col = n0 + wn * 32 + nf * 8 + (lane & 3) * 2;",
        "int col = n0 + wn * 16 + nf * 8 + (lane & 3) * 2;",
        "acc[mf][nf + 2][2 * h]",
        "const int wm = warp >> 2, wn = warp & 3;",
    ]:
        assert expr in src, expr
