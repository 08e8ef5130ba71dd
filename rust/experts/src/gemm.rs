//! `C = A @ B` for the backward pass, with `A` read through strides (so `A` may be a
//! transposed view) and `B`, `C` row-major: the broadcast-A, load-B form of a GEMM
//! micro-kernel, 4 rows by 64 columns of `C` in 16 AVX-512 registers.

/// A matrix read by (row, k): element `(r, k)` is `data[r * rs + k * ks]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub ks: usize,
}

/// `c[r * ldc + j] = sum_k a(r, k) * b[k * ldb + j]` for `r < rows`, `j < cols`.
pub(crate) type Gemm = fn(Strided, &[f32], usize, usize, &mut [f32], usize, usize, usize);

/// The fastest kernel this CPU runs.
pub(crate) fn best() -> Gemm {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return avx512::gemm;
    }
    portable
}

/// Panics (a bug in this crate, not bad input) unless every index the kernels touch is in range.
#[allow(clippy::too_many_arguments)]
fn check(a: Strided, b: &[f32], ldb: usize, k: usize, c: &[f32], ldc: usize, rows: usize, cols: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(c.len() >= (rows - 1) * ldc + cols, "gemm: C too short");
    if k > 0 {
        assert!(a.data.len() > (rows - 1) * a.rs + (k - 1) * a.ks, "gemm: A too short");
        assert!(b.len() >= (k - 1) * ldb + cols, "gemm: B too short");
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn portable(
    a: Strided,
    b: &[f32],
    ldb: usize,
    k: usize,
    c: &mut [f32],
    ldc: usize,
    rows: usize,
    cols: usize,
) {
    check(a, b, ldb, k, c, ldc, rows, cols);
    for r in 0..rows {
        let row = &mut c[r * ldc..r * ldc + cols];
        row.fill(0.0);
        for kk in 0..k {
            let av = a.data[r * a.rs + kk * a.ks];
            for (cv, &bv) in row.iter_mut().zip(&b[kk * ldb..kk * ldb + cols]) {
                *cv += av * bv;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Strided, check};
    use std::arch::x86_64::*;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
        a: Strided,
        b: &[f32],
        ldb: usize,
        k: usize,
        c: &mut [f32],
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        check(a, b, ldb, k, c, ldc, rows, cols);
        // SAFETY: `best` hands out this function only after detecting AVX-512F, and `check`
        // has verified the extent of every access below.
        unsafe { gemm_avx512(a, b, ldb, k, c, ldc, rows, cols) }
    }

    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_avx512(
        a: Strided,
        b: &[f32],
        ldb: usize,
        k: usize,
        c: &mut [f32],
        ldc: usize,
        rows: usize,
        cols: usize,
    ) {
        for c0 in (0..cols).step_by(64) {
            let width = (cols - c0).min(64);
            // Lanes of each of the 4 column vectors inside `width`; masked-off lanes are never
            // read or written.
            let masks: [__mmask16; 4] = std::array::from_fn(|v| {
                let lanes = width.saturating_sub(16 * v).min(16);
                ((1u32 << lanes) - 1) as __mmask16
            });
            for r0 in (0..rows).step_by(4) {
                let count = (rows - r0).min(4);
                // Missing rows repeat the last one; their sums are dropped.
                let arow: [usize; 4] = std::array::from_fn(|r| (r0 + r.min(count - 1)) * a.rs);
                let mut acc = [[_mm512_setzero_ps(); 4]; 4];
                for kk in 0..k {
                    let brow = b.as_ptr().wrapping_add(kk * ldb + c0);
                    let bv: [__m512; 4] =
                        std::array::from_fn(|v| unsafe { _mm512_maskz_loadu_ps(masks[v], brow.wrapping_add(16 * v)) });
                    for r in 0..4 {
                        let av = _mm512_set1_ps(unsafe { *a.data.get_unchecked(arow[r] + kk * a.ks) });
                        for v in 0..4 {
                            acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
                        }
                    }
                }
                for (r, acc_r) in acc.iter().enumerate().take(count) {
                    let crow = c.as_mut_ptr().wrapping_add((r0 + r) * ldc + c0);
                    for v in 0..4 {
                        unsafe { _mm512_mask_storeu_ps(crow.wrapping_add(16 * v), masks[v], acc_r[v]) };
                    }
                }
            }
        }
    }
}
