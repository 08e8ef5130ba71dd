//! The 4x4 dot-product tile: `tile[i][j] = a[i] . b[j]` for 4 rows `a` and 4 rows `b` of one length.
//!
//! The AVX-512 path keeps the 16 sums in 16 vector registers, loading each row once per 16
//! floats; the portable path is the same computation in 8-float lanes for the compiler to
//! vectorise. The two differ only in rounding (fused multiply-add), and one process always
//! runs the same path, so results do not depend on the thread count.

/// A tile kernel.
pub(crate) type Dot = fn(&[&[f32]; 4], &[&[f32]; 4]) -> [[f32; 4]; 4];

/// The fastest tile kernel this CPU runs.
pub(crate) fn best() -> Dot {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        return avx512::dot;
    }
    portable
}

pub(crate) fn portable(a: &[&[f32]; 4], b: &[&[f32]; 4]) -> [[f32; 4]; 4] {
    const L: usize = 8;
    let k = a[0].len();
    let mut acc = [[[0f32; L]; 4]; 4];
    let full = k - k % L;
    for c in (0..full).step_by(L) {
        for (ai, acc_i) in a.iter().zip(acc.iter_mut()) {
            let ai = &ai[c..c + L];
            for (bj, acc_ij) in b.iter().zip(acc_i.iter_mut()) {
                let bj = &bj[c..c + L];
                for l in 0..L {
                    acc_ij[l] += ai[l] * bj[l];
                }
            }
        }
    }
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let lanes = acc[i][j].iter().sum::<f32>();
            lanes + (full..k).map(|c| a[i][c] * b[j][c]).sum::<f32>()
        })
    })
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub(super) fn dot(a: &[&[f32]; 4], b: &[&[f32]; 4]) -> [[f32; 4]; 4] {
        // SAFETY: `best` hands out this function only after detecting AVX-512F on this CPU.
        unsafe { dot_avx512(a, b) }
    }

    #[target_feature(enable = "avx512f")]
    fn dot_avx512(a: &[&[f32]; 4], b: &[&[f32]; 4]) -> [[f32; 4]; 4] {
        let k = a[0].len();
        debug_assert!(a.iter().chain(b.iter()).all(|r| r.len() == k));
        let mut acc = [[_mm512_setzero_ps(); 4]; 4];
        let mut c = 0;
        // SAFETY (all loads): every row has length k and the loads stay below it, the last one
        // masked to the rows' remaining elements.
        while c + 16 <= k {
            let av: [__m512; 4] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(a[i].as_ptr().add(c)) });
            for j in 0..4 {
                let bv = unsafe { _mm512_loadu_ps(b[j].as_ptr().add(c)) };
                for i in 0..4 {
                    acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
                }
            }
            c += 16;
        }
        if c < k {
            let mask: __mmask16 = (1u16 << (k - c)) - 1;
            let av: [__m512; 4] = std::array::from_fn(|i| unsafe { _mm512_maskz_loadu_ps(mask, a[i].as_ptr().add(c)) });
            for j in 0..4 {
                let bv = unsafe { _mm512_maskz_loadu_ps(mask, b[j].as_ptr().add(c)) };
                for i in 0..4 {
                    acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
                }
            }
        }
        std::array::from_fn(|i| std::array::from_fn(|j| _mm512_reduce_add_ps(acc[i][j])))
    }
}
