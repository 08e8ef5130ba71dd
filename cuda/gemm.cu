// Tensor-core GEMMs for FP16 and BF16: dense, grouped over expert segments, grouped with a
// fused SwiGLU epilogue, and the grouped weight gradient. f32 accumulation throughout.
//
// One kernel body: a 128x128 output tile per block of 8 warps (2 x 4, each 64x32), K in steps
// of 32 through a 4-stage cp.async pipeline in shared memory (rows padded by 8 elements so
// that ldmatrix is free of bank conflicts), fragments loaded with ldmatrix (.trans when an
// operand is stored with the other dimension contiguous) and multiplied with
// mma.sync.m16n8k16. Requirements checked by the host: sm_80+, every dimension that is
// contiguous in memory a multiple of 8, 16-byte aligned base pointers.
//
// Grouped GEMMs take `expert_offsets` [E+1] (rows of expert e are expert_offsets[e] ..
// expert_offsets[e+1] of the expert-sorted buffer) and `tile_offsets` [E+1] (first M-tile of
// each expert, from `grouped_tiles`), and launch an upper bound of M-tiles; each block finds
// its expert by binary search, so the launch needs no host synchronisation.
#include "common.cuh"

#define BM 128
#define BN 128
#define BK 32
#define PAD 8
#define STAGES 4
#define THREADS 256
#define K_STRIDE (BK + PAD)    // row stride of a tile stored [rows][k]
#define X_STRIDE (BM + PAD)    // row stride of a tile stored [k][rows] (BM == BN)
#define SLOT (BM * K_STRIDE)   // elements of one operand stage; >= BK * X_STRIDE
#define SMEM_BYTES (STAGES * 2 * SLOT * 2)

// One operand of the block: `ptr` is element (0, 0) of the block's slice, `ld` the stride
// between stored rows, `valid` how many of the block's 128 rows (M or N) exist.
struct Operand {
    const u16* ptr;
    i64 ld;
    int valid;
};

// The block's tile of an operand stored K-contiguous ([rows][K]) into `slot` ([128][K_STRIDE]).
// With SWIGLU the 128 rows are taken from a [2F, K] weight so that each warp column (32 rows)
// holds 16 gate rows and the 16 matching up rows: row r -> act column
// n0 + (r / 32) * 16 + r % 16, from the gate half if r % 32 < 16, else the up half.
template <bool SWIGLU>
__device__ __forceinline__ void load_kmajor(u16* slot, Operand op, int k0, int K, int n0, int F) {
    for (int c = threadIdx.x; c < BM * BK / 8; c += THREADS) {
        int r = c >> 2, kc = (c & 3) * 8;
        bool in_k = k0 + kc < K;
        const u16* src;
        bool valid;
        if (SWIGLU) {
            int col = n0 + (r >> 5) * 16 + (r & 15);
            valid = in_k && col < F;
            src = op.ptr + (i64)((r & 31) < 16 ? col : F + col) * op.ld + k0 + kc;
        } else {
            valid = in_k && r < op.valid;
            src = op.ptr + (i64)r * op.ld + k0 + kc;
        }
        cp_async16(slot + r * K_STRIDE + kc, valid ? src : op.ptr, valid);
    }
}

// The block's tile of an operand stored with its M (or N) dimension contiguous ([K][rows]),
// into `slot` ([BK][X_STRIDE]).
__device__ __forceinline__ void load_xmajor(u16* slot, Operand op, int k0, int K) {
    for (int c = threadIdx.x; c < BK * BM / 8; c += THREADS) {
        int kr = c >> 4, xc = (c & 15) * 8;
        bool valid = k0 + kr < K && xc < op.valid;
        const u16* src = op.ptr + (i64)(k0 + kr) * op.ld + xc;
        cp_async16(slot + kr * X_STRIDE + xc, valid ? src : op.ptr, valid);
    }
}

template <bool A_K, bool B_K, bool SWIGLU>
__device__ __forceinline__ void load_stage(u16* smem, int stage, Operand a, Operand b, int kt, int K, int n0,
                                           int F) {
    u16* as = smem + stage * SLOT;
    u16* bs = smem + (STAGES + stage) * SLOT;
    int k0 = kt * BK;
    if (A_K) load_kmajor<false>(as, a, k0, K, 0, 0);
    else load_xmajor(as, a, k0, K);
    if (B_K) load_kmajor<SWIGLU>(bs, b, k0, K, n0, F);
    else load_xmajor(bs, b, k0, K);
}

// acc[mf][nf][i]: the warp's 64x32 tile as 4 x 4 m16n8 fragments. Element i of fragment
// (mf, nf) is row wm*64 + mf*16 + lane/4 + (i/2)*8, column wn*32 + nf*8 + (lane%4)*2 + i%2.
template <int DT, bool A_K, bool B_K, bool SWIGLU>
__device__ __forceinline__ void mainloop(float (&acc)[4][4][4], Operand a, Operand b, int K, int n0, int F,
                                         u16* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;
    const int ktiles = (K + BK - 1) / BK;
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) load_stage<A_K, B_K, SWIGLU>(smem, s, a, b, s, K, n0, F);
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; kt++) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt has landed for every thread; stage kt-1 is free again
        int next = kt + STAGES - 1;
        if (next < ktiles) load_stage<A_K, B_K, SWIGLU>(smem, next % STAGES, a, b, next, K, n0, F);
        cp_async_commit();
        const u16* as = smem + (kt % STAGES) * SLOT;
        const u16* bs = smem + (STAGES + kt % STAGES) * SLOT;
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            u32 af[4][4], bf[2][4];
#pragma unroll
            for (int mf = 0; mf < 4; mf++) {
                int m0 = wm * 64 + mf * 16;
                if (A_K) {
                    ldmatrix_x4(af[mf], as + (m0 + (lane & 15)) * K_STRIDE + kk + (lane >> 4) * 8);
                } else {
                    int k = kk + (lane & 7) + (lane >> 4) * 8;
                    ldmatrix_x4_trans(af[mf], as + k * X_STRIDE + m0 + ((lane >> 3) & 1) * 8);
                }
            }
#pragma unroll
            for (int np = 0; np < 2; np++) {
                int c0 = wn * 32 + np * 16;
                if (B_K) {
                    int row = c0 + (lane & 7) + (lane >> 4) * 8;
                    ldmatrix_x4(bf[np], bs + row * K_STRIDE + kk + ((lane >> 3) & 1) * 8);
                } else {
                    int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8;
                    ldmatrix_x4_trans(bf[np], bs + k * X_STRIDE + c0 + (lane >> 4) * 8);
                }
            }
#pragma unroll
            for (int mf = 0; mf < 4; mf++)
#pragma unroll
                for (int nf = 0; nf < 4; nf++)
                    mma_16816<DT>(acc[mf][nf], af[mf], bf[nf >> 1][(nf & 1) * 2], bf[nf >> 1][(nf & 1) * 2 + 1]);
        }
    }
    cp_async_wait<0>();
}

// Writes the block's tile (rows < m_valid, columns n0 + c < N) to C (row stride ldc).
template <int DT>
__device__ __forceinline__ void store_tile(const float (&acc)[4][4][4], u16* C, i64 ldc, int m_valid, int n0,
                                           int N) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;
#pragma unroll
    for (int mf = 0; mf < 4; mf++)
#pragma unroll
        for (int nf = 0; nf < 4; nf++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = wm * 64 + mf * 16 + (lane >> 2) + h * 8;
                int col = n0 + wn * 32 + nf * 8 + (lane & 3) * 2;
                if (row < m_valid && col < N) {
                    u32 v = pack2(from_f32<DT>(acc[mf][nf][2 * h]), from_f32<DT>(acc[mf][nf][2 * h + 1]));
                    *reinterpret_cast<u32*>(C + row * ldc + col) = v;
                }
            }
}

__device__ __forceinline__ u16* dyn_smem() {
    extern __shared__ uint4 smem_raw[];
    return reinterpret_cast<u16*>(smem_raw);
}

// Expert of grouped M-tile `tile`: the e with tile_offsets[e] <= tile < tile_offsets[e + 1].
__device__ __forceinline__ int expert_of_tile(const int* tile_offsets, int E, int tile) {
    int lo = 0, hi = E;  // tile_offsets[lo] <= tile < tile_offsets[hi]
    while (hi - lo > 1) {
        int mid = (lo + hi) >> 1;
        if (tile_offsets[mid] <= tile) lo = mid;
        else hi = mid;
    }
    return lo;
}

// ---------------------------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------------------------

// C [M, N] = A [M, K] @ B, B stored [N, K] (B_K: nn.Linear weights) or [K, N].
template <int DT, bool B_K>
__device__ __forceinline__ void gemm(const u16* A, const u16* B, u16* C, int M, int N, int K) {
    int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    Operand a = {A + (i64)m0 * K, K, min(BM, M - m0)};
    Operand b = B_K ? Operand{B + (i64)n0 * K, K, min(BN, N - n0)} : Operand{B + n0, N, min(BN, N - n0)};
    float acc[4][4][4];
    mainloop<DT, true, B_K, false>(acc, a, b, K, 0, 0, dyn_smem());
    store_tile<DT>(acc, C + (i64)m0 * N, N, a.valid, n0, N);
}

// Segment e of C = segment e of A @ W[e]^T (W [E, N, K], B_K) or @ W[e] (W [E, K, N]).
template <int DT, bool B_K>
__device__ __forceinline__ void grouped_gemm(const u16* A, const u16* W, u16* C, const i64* expert_offsets,
                                             const int* tile_offsets, int E, int N, int K) {
    int tile = blockIdx.y;
    if (tile >= tile_offsets[E]) return;
    int e = expert_of_tile(tile_offsets, E, tile);
    i64 m0 = expert_offsets[e] + (i64)(tile - tile_offsets[e]) * BM;
    int m_valid = (int)min((i64)BM, expert_offsets[e + 1] - m0);
    int n0 = blockIdx.x * BN;
    const u16* w = W + (i64)e * N * K;
    Operand a = {A + m0 * K, K, m_valid};
    Operand b = B_K ? Operand{w + (i64)n0 * K, K, min(BN, N - n0)} : Operand{w + n0, N, min(BN, N - n0)};
    float acc[4][4][4];
    mainloop<DT, true, B_K, false>(acc, a, b, K, 0, 0, dyn_smem());
    store_tile<DT>(acc, C + m0 * N, N, m_valid, n0, N);
}

// The SwiGLU first layer of the experts: with h = segment e of A @ W[e]^T (W [E, 2F, K], gate
// rows first), Act [rows, F] = silu(h[:, :F]) * h[:, F:]; h itself goes to Hout [rows, 2F]
// when Hout is not null (the backward needs it). Each block makes 64 act columns.
template <int DT>
__device__ __forceinline__ void grouped_swiglu(const u16* A, const u16* W, u16* Act, u16* Hout,
                                               const i64* expert_offsets, const int* tile_offsets, int E, int F,
                                               int K) {
    int tile = blockIdx.y;
    if (tile >= tile_offsets[E]) return;
    int e = expert_of_tile(tile_offsets, E, tile);
    i64 m0 = expert_offsets[e] + (i64)(tile - tile_offsets[e]) * BM;
    int m_valid = (int)min((i64)BM, expert_offsets[e + 1] - m0);
    int n0 = blockIdx.x * (BN / 2);
    Operand a = {A + m0 * K, K, m_valid};
    Operand b = {W + (i64)e * 2 * F * K, K, 0};
    float acc[4][4][4];
    mainloop<DT, true, true, true>(acc, a, b, K, n0, F, dyn_smem());
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int wm = warp >> 2, wn = warp & 3;
#pragma unroll
    for (int mf = 0; mf < 4; mf++)
#pragma unroll
        for (int nf = 0; nf < 2; nf++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int row = wm * 64 + mf * 16 + (lane >> 2) + h * 8;
                int col = n0 + wn * 16 + nf * 8 + (lane & 3) * 2;
                if (row >= m_valid || col >= F) continue;
                i64 r = m0 + row;
                // Rounded to the storage type first, so that the backward (which recomputes
                // the activation from the stored h) sees exactly the forward's values.
                u16 g0 = from_f32<DT>(acc[mf][nf][2 * h]), g1 = from_f32<DT>(acc[mf][nf][2 * h + 1]);
                u16 u0 = from_f32<DT>(acc[mf][nf + 2][2 * h]), u1 = from_f32<DT>(acc[mf][nf + 2][2 * h + 1]);
                if (Hout != nullptr) {
                    *reinterpret_cast<u32*>(Hout + r * 2 * F + col) = pack2(g0, g1);
                    *reinterpret_cast<u32*>(Hout + r * 2 * F + F + col) = pack2(u0, u1);
                }
                float a0 = silu(to_f32<DT>(g0)) * to_f32<DT>(u0);
                float a1 = silu(to_f32<DT>(g1)) * to_f32<DT>(u1);
                *reinterpret_cast<u32*>(Act + r * F + col) = pack2(from_f32<DT>(a0), from_f32<DT>(a1));
            }
}

// The weight gradient of a grouped GEMM: G[e] [M, N] = X_e^T @ Y_e over expert e's rows of
// X [rows, M] and Y [rows, N]; experts without rows get zeros. Grid (N/128, M/128, E).
template <int DT>
__device__ __forceinline__ void grouped_wgrad(const u16* X, const u16* Y, u16* G, const i64* expert_offsets,
                                              int M, int N) {
    int e = blockIdx.z;
    int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    i64 s = expert_offsets[e];
    int K = (int)(expert_offsets[e + 1] - s);
    Operand a = {X + s * M + m0, M, min(BM, M - m0)};
    Operand b = {Y + s * N + n0, N, min(BN, N - n0)};
    float acc[4][4][4];
    mainloop<DT, false, false, false>(acc, a, b, K, 0, 0, dyn_smem());
    store_tile<DT>(acc, G + (i64)e * M * N + (i64)m0 * N, N, a.valid, n0, N);
}

#define GEMM_KERNELS(NAME, DT)                                                                                \
    extern "C" __global__ void __launch_bounds__(THREADS) gemm_##NAME(const u16* A, const u16* B, u16* C,     \
                                                                      int M, int N, int K) {                  \
        gemm<DT, false>(A, B, C, M, N, K);                                                                    \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS) gemm_bt_##NAME(const u16* A, const u16* B, u16* C,  \
                                                                         int M, int N, int K) {               \
        gemm<DT, true>(A, B, C, M, N, K);                                                                     \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        grouped_gemm_##NAME(const u16* A, const u16* W, u16* C, const i64* expert_offsets,                    \
                            const int* tile_offsets, int E, int N, int K) {                                   \
        grouped_gemm<DT, false>(A, W, C, expert_offsets, tile_offsets, E, N, K);                              \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        grouped_gemm_bt_##NAME(const u16* A, const u16* W, u16* C, const i64* expert_offsets,                 \
                               const int* tile_offsets, int E, int N, int K) {                                \
        grouped_gemm<DT, true>(A, W, C, expert_offsets, tile_offsets, E, N, K);                               \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        grouped_swiglu_##NAME(const u16* A, const u16* W, u16* Act, u16* Hout, const i64* expert_offsets,     \
                              const int* tile_offsets, int E, int F, int K) {                                 \
        grouped_swiglu<DT>(A, W, Act, Hout, expert_offsets, tile_offsets, E, F, K);                           \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                     \
        grouped_wgrad_##NAME(const u16* X, const u16* Y, u16* G, const i64* expert_offsets, int M, int N) {   \
        grouped_wgrad<DT>(X, Y, G, expert_offsets, M, N);                                                     \
    }

GEMM_KERNELS(f16, DT_F16)
GEMM_KERNELS(bf16, DT_BF16)

// tile_offsets[e] = sum over experts before e of ceil(rows_e / BM): the M-tiles of the grouped
// GEMMs. One thread: E is small and this runs once per layer call.
extern "C" __global__ void grouped_tiles(const i64* expert_offsets, int E, int* tile_offsets) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    int total = 0;
    for (int e = 0; e < E; e++) {
        tile_offsets[e] = total;
        total += (int)((expert_offsets[e + 1] - expert_offsets[e] + BM - 1) / BM);
    }
    tile_offsets[E] = total;
}
