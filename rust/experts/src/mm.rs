//! `C = A @ B` in float32 with one reduction order for every shape, tile and tier.
//!
//! Every element is `c[i, j] = (((0 + a[i,0] b[0,j]) + a[i,1] b[1,j]) + ...) + a[i,k-1] b[k-1,j]`,
//! summed in `k` order one term at a time; the vector tiers fuse each multiply-add (one
//! rounding), the generic tier rounds the product and the sum. Nothing else enters: not the
//! row count, not the tile an element falls in (edge tiles run the same kernel on a copy),
//! not the `k` blocks (a block's partial sums are stored as float32 and reloaded, which is
//! exactly the chain continuing). So a row of `C` is bitwise the same whoever shares the call.
//!
//! The kernels are the broadcast-A, load-B form of a GEMM micro-kernel (as in BLIS): `B` is
//! packed into panels of `NR` columns by `KC` values of `k` that stay in L1, and an `MR` by
//! `NR` tile of `C` lives in registers while `k` runs. `A` and `B` are read through strides,
//! so either may be a transposed view (`x @ w^T` packs `w`'s rows as panel columns).

use std::marker::PhantomData;

use crate::Isa;

/// A matrix read through strides: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    /// Panics (a bug in this crate) unless every element of a `rows` by `cols` matrix is in `data`.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            assert!(
                self.data.len() > (rows - 1) * self.rs + (cols - 1) * self.cs,
                "mm: {what} too short"
            );
        }
    }
}

/// A `rows` by `cols` block of a row-major matrix with row stride `ld`, written through a raw
/// pointer so that tasks can own disjoint column ranges of the same rows.
#[derive(Clone, Copy)]
pub(crate) struct Out<'a> {
    ptr: *mut f32,
    ld: usize,
    pub rows: usize,
    pub cols: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: an `Out` is a mutable borrow of its elements; tasks handed `Out`s of one matrix get
// disjoint blocks of it (`rows`/`cols` split it), so no element is written by two threads.
unsafe impl Send for Out<'_> {}
// SAFETY: as above; a shared `Out` is only copied, never written through, by the task system.
unsafe impl Sync for Out<'_> {}

impl<'a> Out<'a> {
    /// The whole of `c` as a `rows` by `cols` matrix with row stride `ld`.
    pub fn new(c: &'a mut [f32], ld: usize, rows: usize, cols: usize) -> Out<'a> {
        if rows > 0 && cols > 0 {
            assert!(cols <= ld && c.len() >= (rows - 1) * ld + cols, "mm: C too short");
        }
        Out {
            ptr: c.as_mut_ptr(),
            ld,
            rows,
            cols,
            _borrow: PhantomData,
        }
    }

    /// Rows `r0..r1` and columns `c0..c1` of this block.
    pub fn block(self, r0: usize, r1: usize, c0: usize, c1: usize) -> Out<'a> {
        assert!(
            r0 <= r1 && r1 <= self.rows && c0 <= c1 && c1 <= self.cols,
            "mm: block out of range"
        );
        Out {
            // SAFETY: the offset stays inside the block (checked just above), which `new` checked
            // to lie inside its slice.
            ptr: unsafe { self.ptr.add(r0 * self.ld + c0) },
            ld: self.ld,
            rows: r1 - r0,
            cols: c1 - c0,
            _borrow: PhantomData,
        }
    }

    fn fill(self, v: f32) {
        for r in 0..self.rows {
            // SAFETY: row `r` of the block, inside the borrowed slice (see `new` and `block`).
            unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r * self.ld), self.cols) }.fill(v);
        }
    }
}

/// Largest `MR * NR` of any tier, for the copy of an edge tile.
const MAX_TILE: usize = 6 * 64;

/// A tier's micro-kernel and its blocking.
trait Micro {
    /// Rows of a register tile.
    const MR: usize;
    /// Columns of a register tile (and of a packed panel).
    const NR: usize;
    /// Values of `k` per packed panel.
    const KC: usize;

    /// `rows` (1 to `MR`) rows by `NR` columns of `c` (row stride `ldc`) = (when `first`, 0;
    /// else themselves) + the sum over `kk < kc` of `a[r * ars + kk * acs] * b[kk * NR + j]`,
    /// in the order of the module documentation.
    ///
    /// # Safety
    /// The tier is supported by this CPU; `a`, `b` and `c` point to that many readable
    /// (writable for `c`) elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        first: bool,
    );

    /// Packs `b` rows `k0..k0 + kc`, columns `j0..j0 + nr` into `dst[kk * NR + j]`, zeroing
    /// columns `nr..NR`.
    ///
    /// # Safety
    /// The tier is supported by this CPU; `b` holds every element packed (checked by `matmul`).
    unsafe fn pack(b: View, k0: usize, kc: usize, j0: usize, nr: usize, dst: &mut [f32]) {
        pack_portable(b, k0, kc, j0, nr, Self::NR, dst)
    }
}

fn pack_portable(b: View, k0: usize, kc: usize, j0: usize, nr: usize, width: usize, dst: &mut [f32]) {
    let dst = &mut dst[..kc * width];
    if nr < width {
        dst.fill(0.0);
    }
    if b.cs == 1 {
        // Row-major B: each k is a contiguous run of columns.
        for (kk, d) in dst.chunks_exact_mut(width).enumerate() {
            let s = (k0 + kk) * b.rs + j0;
            d[..nr].copy_from_slice(&b.data[s..s + nr]);
        }
    } else if b.rs == 1 {
        // Transposed B (`w^T` of a row-major `w`): each column is a contiguous run of k,
        // moved 4 columns at a time (4 streams read, one 4-wide store per k).
        let jfull = nr / 4 * 4;
        for jb in (0..jfull).step_by(4) {
            let cols: [&[f32]; 4] = std::array::from_fn(|i| {
                let s = (j0 + jb + i) * b.cs + k0;
                &b.data[s..s + kc]
            });
            for (kk, d) in dst.chunks_exact_mut(width).enumerate() {
                d[jb..jb + 4].copy_from_slice(&[cols[0][kk], cols[1][kk], cols[2][kk], cols[3][kk]]);
            }
        }
        for j in jfull..nr {
            let s = (j0 + j) * b.cs + k0;
            for (kk, &v) in b.data[s..s + kc].iter().enumerate() {
                dst[kk * width + j] = v;
            }
        }
    } else {
        for kk in 0..kc {
            for j in 0..nr {
                dst[kk * width + j] = b.data[(k0 + kk) * b.rs + (j0 + j) * b.cs];
            }
        }
    }
}

/// `out = A @ B` with `A` an `out.rows` by `k` view and `B` a `k` by `out.cols` view, in the
/// tier `isa` (which this CPU must run: checked, a panic otherwise); `packed` is scratch.
pub(crate) fn matmul(isa: Isa, a: View, b: View, k: usize, out: Out, packed: &mut Vec<f32>) {
    assert!(isa.supported(), "mm: the {isa} tier is not supported by this CPU");
    a.check(out.rows, k, "A");
    b.check(k, out.cols, "B");
    match isa {
        Isa::Generic => drive::<generic::Kernel>(a, b, k, out, packed),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => drive::<avx2::Kernel>(a, b, k, out, packed),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => drive::<avx512::Kernel>(a, b, k, out, packed),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => drive::<neon::Kernel>(a, b, k, out, packed),
        #[allow(unreachable_patterns)]
        _ => unreachable!("supported() is false for tiers of another architecture"),
    }
}

/// The columns a task of tier `isa` should take at a time (its panel width).
pub(crate) fn panel_width(isa: Isa) -> usize {
    match isa {
        Isa::Generic => generic::Kernel::NR,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::Kernel::NR,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::Kernel::NR,
        #[cfg(target_arch = "aarch64")]
        Isa::Neon => neon::Kernel::NR,
        #[allow(unreachable_patterns)]
        _ => 16,
    }
}

fn drive<K: Micro>(a: View, b: View, k: usize, out: Out, packed: &mut Vec<f32>) {
    let (m, n) = (out.rows, out.cols);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    debug_assert!(K::MR * K::NR <= MAX_TILE);
    // BLIS order: per block of k, pack every panel of B (KC by n, in L2), then run blocks of
    // MC rows (KC by MC of A in L1/L2, MC by n of C in L2) panel by panel. Both orders below
    // give every element the same operations (see the module documentation).
    let panels = n.div_ceil(K::NR);
    let panel_len = K::KC * K::NR;
    if m <= MC {
        // Few rows: each panel is packed and used at once, while it is in L1.
        packed.resize(panel_len, 0.0);
        for k0 in (0..k).step_by(K::KC) {
            let kc = K::KC.min(k - k0);
            for j0 in (0..n).step_by(K::NR) {
                let nr = K::NR.min(n - j0);
                // SAFETY: the tier is supported (asserted in `matmul`), which also checked `b`.
                unsafe { K::pack(b, k0, kc, j0, nr, packed) };
                for r0 in (0..m).step_by(K::MR) {
                    let rows = K::MR.min(m - r0);
                    // SAFETY: every tile's elements are in `a`, `packed` and `out` (see `tile_at`).
                    unsafe { tile_at::<K>(a, k0, kc, packed, out, r0, rows, j0, nr) };
                }
            }
        }
        return;
    }
    packed.resize(panels * panel_len, 0.0);
    for k0 in (0..k).step_by(K::KC) {
        let kc = K::KC.min(k - k0);
        for (p, dst) in packed.chunks_exact_mut(panel_len).enumerate() {
            let j0 = p * K::NR;
            // SAFETY: the tier is supported (asserted in `matmul`), which also checked `b`.
            unsafe { K::pack(b, k0, kc, j0, K::NR.min(n - j0), dst) };
        }
        for i0 in (0..m).step_by(MC) {
            let i1 = (i0 + MC).min(m);
            for (p, panel) in packed.chunks_exact(panel_len).enumerate() {
                let j0 = p * K::NR;
                let nr = K::NR.min(n - j0);
                for r0 in (i0..i1).step_by(K::MR) {
                    let rows = K::MR.min(i1 - r0);
                    // SAFETY: every tile's elements are in `a`, `panel` and `out` (see `tile_at`).
                    unsafe { tile_at::<K>(a, k0, kc, panel, out, r0, rows, j0, nr) };
                }
            }
        }
    }
}

/// Rows of a block of A and C, so that it stays in L2 (about 100 KB of C per 256 columns).
const MC: usize = 96;

/// Runs the tier's tile for rows `r0..r0 + rows` and columns `j0..j0 + nr` of `out` over
/// `k0..k0 + kc`, on a full-width copy when `nr < NR` (so that an edge tile's elements see the
/// same operations as any other tile's).
///
/// # Safety
/// The tier is supported by this CPU; `a` holds rows `r0..r0 + rows` by `k0..k0 + kc` (checked
/// by `matmul`), `panel` `kc * NR` values, and the block lies in `out`.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_at<K: Micro>(
    a: View,
    k0: usize,
    kc: usize,
    panel: &[f32],
    out: Out,
    r0: usize,
    rows: usize,
    j0: usize,
    nr: usize,
) {
    let a_ptr = a.data[r0 * a.rs + k0 * a.cs..].as_ptr();
    let c = out.block(r0, r0 + rows, j0, j0 + nr);
    let first = k0 == 0;
    if nr == K::NR {
        // SAFETY: the caller's contract; `c` is a rows by NR block of `out`.
        unsafe { K::tile(kc, a_ptr, a.rs, a.cs, panel.as_ptr(), c.ptr, c.ld, rows, first) };
        return;
    }
    let mut tmp = [0f32; MAX_TILE];
    for r in 0..rows {
        // SAFETY: row r of the block `c`, nr elements.
        let row = unsafe { std::slice::from_raw_parts(c.ptr.add(r * c.ld), nr) };
        tmp[r * K::NR..r * K::NR + nr].copy_from_slice(row);
    }
    // SAFETY: the caller's contract, with `tmp` as a rows by NR matrix of row stride NR.
    unsafe {
        K::tile(
            kc,
            a_ptr,
            a.rs,
            a.cs,
            panel.as_ptr(),
            tmp.as_mut_ptr(),
            K::NR,
            rows,
            first,
        )
    };
    for r in 0..rows {
        // SAFETY: as above.
        let row = unsafe { std::slice::from_raw_parts_mut(c.ptr.add(r * c.ld), nr) };
        row.copy_from_slice(&tmp[r * K::NR..r * K::NR + nr]);
    }
}

/// Calls `$f::<R>(args)` for the run-time row count `$rows` in `1..=$mr`.
macro_rules! by_rows {
    ($rows:expr, $f:ident, [$($r:literal),+], $args:tt) => {
        match $rows {
            $($r => $f::<$r> $args,)+
            _ => unreachable!("a tile has 1 to MR rows"),
        }
    };
}

mod generic {
    use super::Micro;

    pub(crate) struct Kernel;

    const NR: usize = 8;

    impl Micro for Kernel {
        const MR: usize = 6;
        const NR: usize = NR;
        const KC: usize = 256;

        unsafe fn tile(
            kc: usize,
            a: *const f32,
            ars: usize,
            acs: usize,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            rows: usize,
            first: bool,
        ) {
            // SAFETY: forwarded from the caller's contract.
            unsafe { by_rows!(rows, tile, [1, 2, 3, 4, 5, 6], (kc, a, ars, acs, b, c, ldc, first)) }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile<const R: usize>(
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        let mut acc = [[0f32; NR]; R];
        if !first {
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: row r of the tile, NR elements (the caller's contract).
                acc_r.copy_from_slice(unsafe { std::slice::from_raw_parts(c.add(r * ldc), NR) });
            }
        }
        for kk in 0..kc {
            // SAFETY: row kk of the packed panel, NR elements.
            let bv: &[f32; NR] = unsafe { &*(b.add(kk * NR) as *const [f32; NR]) };
            for (r, acc_r) in acc.iter_mut().enumerate() {
                // SAFETY: element (r, kk) of A (the caller's contract).
                let av = unsafe { *a.add(r * ars + kk * acs) };
                for j in 0..NR {
                    acc_r[j] += av * bv[j];
                }
            }
        }
        for (r, acc_r) in acc.iter().enumerate() {
            // SAFETY: row r of the tile.
            unsafe { std::slice::from_raw_parts_mut(c.add(r * ldc), NR) }.copy_from_slice(acc_r);
        }
    }
}

/// Packing of a transposed `B` (`w^T` of a row-major `w`) with 8 by 8 AVX transposes, for the
/// AVX2 and AVX-512 tiers.
#[cfg(target_arch = "x86_64")]
mod avx_pack {
    use super::View;
    use std::arch::x86_64::*;

    /// [`super::Micro::pack`] into panels `width` wide.
    ///
    /// # Safety
    /// AVX2 is supported by this CPU; `b` holds every element packed.
    pub(super) unsafe fn pack(b: View, k0: usize, kc: usize, j0: usize, nr: usize, width: usize, dst: &mut [f32]) {
        if b.rs != 1 || b.cs == 1 {
            return super::pack_portable(b, k0, kc, j0, nr, width, dst);
        }
        // SAFETY: forwarded from the caller's contract.
        unsafe { pack_transposed(b.data, b.cs, k0, kc, j0, nr, width, dst) }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    fn pack_transposed(
        data: &[f32],
        cs: usize,
        k0: usize,
        kc: usize,
        j0: usize,
        nr: usize,
        width: usize,
        dst: &mut [f32],
    ) {
        let dst = &mut dst[..kc * width];
        let (kfull, jfull) = (kc / 8 * 8, nr / 8 * 8);
        for jb in (0..jfull).step_by(8) {
            for kb in (0..kfull).step_by(8) {
                let src = &data[(j0 + jb) * cs + k0 + kb..];
                // SAFETY: element (k0 + kb + 7, j0 + jb + 7) of B is in `data` (the caller's
                // contract), and every load reads 8 values of k at or below it.
                let r: [__m256; 8] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.as_ptr().add(i * cs)) });
                let t = transpose8(r);
                for (i, ti) in t.iter().enumerate() {
                    let at = &mut dst[(kb + i) * width + jb..(kb + i) * width + jb + 8];
                    // SAFETY: `at` holds 8 values.
                    unsafe { _mm256_storeu_ps(at.as_mut_ptr(), *ti) };
                }
            }
            for kk in kfull..kc {
                for j in jb..jb + 8 {
                    dst[kk * width + j] = data[(j0 + j) * cs + k0 + kk];
                }
            }
        }
        for j in jfull..nr {
            for kk in 0..kc {
                dst[kk * width + j] = data[(j0 + j) * cs + k0 + kk];
            }
        }
        for kk in 0..kc {
            dst[kk * width + nr..(kk + 1) * width].fill(0.0);
        }
    }

    /// Columns of the 8 by 8 matrix whose rows are `r`.
    #[inline(always)]
    fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: register shuffles only; AVX is enabled in every caller (`pack_transposed`).
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(s0, s4),
                _mm256_permute2f128_ps::<0x20>(s1, s5),
                _mm256_permute2f128_ps::<0x20>(s2, s6),
                _mm256_permute2f128_ps::<0x20>(s3, s7),
                _mm256_permute2f128_ps::<0x31>(s0, s4),
                _mm256_permute2f128_ps::<0x31>(s1, s5),
                _mm256_permute2f128_ps::<0x31>(s2, s6),
                _mm256_permute2f128_ps::<0x31>(s3, s7),
            ]
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Micro;
    use std::arch::x86_64::*;

    pub(crate) struct Kernel;

    const NR: usize = 16;

    impl Micro for Kernel {
        const MR: usize = 6;
        const NR: usize = NR;
        const KC: usize = 256;

        unsafe fn pack(b: super::View, k0: usize, kc: usize, j0: usize, nr: usize, dst: &mut [f32]) {
            // SAFETY: forwarded from the caller's contract (this tier implies AVX2).
            unsafe { super::avx_pack::pack(b, k0, kc, j0, nr, NR, dst) }
        }

        unsafe fn tile(
            kc: usize,
            a: *const f32,
            ars: usize,
            acs: usize,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            rows: usize,
            first: bool,
        ) {
            // SAFETY: forwarded from the caller's contract (which includes AVX2 and FMA).
            unsafe { by_rows!(rows, tile, [1, 2, 3, 4, 5, 6], (kc, a, ars, acs, b, c, ldc, first)) }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        // SAFETY (all pointer accesses): inside the tile, the panel and A, by the caller's contract.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            if !first {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                        *acc_rv = _mm256_loadu_ps(c.add(r * ldc + 8 * v));
                    }
                }
            }
            for kk in 0..kc {
                let bp = b.add(kk * NR);
                let bv = [_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8))];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(r * ars + kk * acs));
                    for v in 0..2 {
                        acc_r[v] = _mm256_fmadd_ps(av, bv[v], acc_r[v]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, acc_rv) in acc_r.iter().enumerate() {
                    _mm256_storeu_ps(c.add(r * ldc + 8 * v), *acc_rv);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Micro;
    use std::arch::x86_64::*;

    pub(crate) struct Kernel;

    const NR: usize = 64;

    impl Micro for Kernel {
        const MR: usize = 6;
        const NR: usize = NR;
        const KC: usize = 128;

        unsafe fn pack(b: super::View, k0: usize, kc: usize, j0: usize, nr: usize, dst: &mut [f32]) {
            // SAFETY: forwarded from the caller's contract (this tier implies AVX2).
            unsafe { super::avx_pack::pack(b, k0, kc, j0, nr, NR, dst) }
        }

        unsafe fn tile(
            kc: usize,
            a: *const f32,
            ars: usize,
            acs: usize,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            rows: usize,
            first: bool,
        ) {
            // SAFETY: forwarded from the caller's contract (which includes AVX-512F).
            unsafe { by_rows!(rows, tile, [1, 2, 3, 4, 5, 6], (kc, a, ars, acs, b, c, ldc, first)) }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize>(
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        // SAFETY (all pointer accesses): inside the tile, the panel and A, by the caller's contract.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; R];
            if !first {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                        *acc_rv = _mm512_loadu_ps(c.add(r * ldc + 16 * v));
                    }
                }
            }
            for kk in 0..kc {
                let bp = b.add(kk * NR);
                let bv = [
                    _mm512_loadu_ps(bp),
                    _mm512_loadu_ps(bp.add(16)),
                    _mm512_loadu_ps(bp.add(32)),
                    _mm512_loadu_ps(bp.add(48)),
                ];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * ars + kk * acs));
                    for v in 0..4 {
                        acc_r[v] = _mm512_fmadd_ps(av, bv[v], acc_r[v]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, acc_rv) in acc_r.iter().enumerate() {
                    _mm512_storeu_ps(c.add(r * ldc + 16 * v), *acc_rv);
                }
            }
        }
    }
}

/// NEON (aarch64). Not compiled on the x86_64 machines this crate is developed on; kept to
/// the same shape as the AVX2 kernel.
#[cfg(target_arch = "aarch64")]
mod neon {
    use super::Micro;
    use std::arch::aarch64::*;

    pub(crate) struct Kernel;

    const NR: usize = 16;

    impl Micro for Kernel {
        const MR: usize = 6;
        const NR: usize = NR;
        const KC: usize = 256;

        unsafe fn tile(
            kc: usize,
            a: *const f32,
            ars: usize,
            acs: usize,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            rows: usize,
            first: bool,
        ) {
            // SAFETY: forwarded from the caller's contract (which includes NEON).
            unsafe { by_rows!(rows, tile, [1, 2, 3, 4, 5, 6], (kc, a, ars, acs, b, c, ldc, first)) }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "neon")]
    unsafe fn tile<const R: usize>(
        kc: usize,
        a: *const f32,
        ars: usize,
        acs: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        first: bool,
    ) {
        // SAFETY (all pointer accesses): inside the tile, the panel and A, by the caller's contract.
        unsafe {
            let mut acc = [[vdupq_n_f32(0.0); 4]; R];
            if !first {
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    for (v, acc_rv) in acc_r.iter_mut().enumerate() {
                        *acc_rv = vld1q_f32(c.add(r * ldc + 4 * v));
                    }
                }
            }
            for kk in 0..kc {
                let bp = b.add(kk * NR);
                let bv = [
                    vld1q_f32(bp),
                    vld1q_f32(bp.add(4)),
                    vld1q_f32(bp.add(8)),
                    vld1q_f32(bp.add(12)),
                ];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let av = vdupq_n_f32(*a.add(r * ars + kk * acs));
                    for v in 0..4 {
                        // Fused: acc + av * b, one rounding.
                        acc_r[v] = vfmaq_f32(acc_r[v], av, bv[v]);
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                for (v, acc_rv) in acc_r.iter().enumerate() {
                    vst1q_f32(c.add(r * ldc + 4 * v), *acc_rv);
                }
            }
        }
    }
}
