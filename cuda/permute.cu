// The token permutation of a Mixture-of-Experts layer on the GPU, the same results as the
// Rust dispatch crate (rust/dispatch): a stable counting sort of the routed (token, expert)
// pairs by expert (histogram per chunk of pairs, scan, scatter), the gather of token rows into
// the expert-sorted buffer, and the weighted combine back to token order.
//
// Deterministic: integer counts only, every floating-point sum in a fixed order, no
// floating-point atomics. 16-bit rows are summed in f32.
#include "common.cuh"

#define CHUNK 256  // pairs per block of the histogram and scatter; also their block size

// pair_token[j] = t for every pair j of token t (token_offsets[t] <= j < token_offsets[t + 1]).
extern "C" __global__ void pair_tokens(const i64* token_offsets, i64 T, i64* pair_token) {
    i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    for (i64 j = token_offsets[t]; j < token_offsets[t + 1]; j++) pair_token[j] = t;
}

// chunk_counts[c * E + e]: pairs of chunk c (pairs c*CHUNK ..) routed to expert e. An expert
// id outside 0..E sets *bad to 1. Dynamic shared memory: E ints.
extern "C" __global__ void __launch_bounds__(CHUNK)
    expert_histogram(const i64* expert_ids, i64 N, int E, int* chunk_counts, int* bad) {
    extern __shared__ int hist[];
    for (int e = threadIdx.x; e < E; e += CHUNK) hist[e] = 0;
    __syncthreads();
    i64 j = (i64)blockIdx.x * CHUNK + threadIdx.x;
    if (j < N) {
        i64 e = expert_ids[j];
        if (e < 0 || e >= E) atomicMax(bad, 1);
        else atomicAdd(&hist[e], 1);  // integer counts: the order of the adds does not matter
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += CHUNK) chunk_counts[(i64)blockIdx.x * E + e] = hist[e];
}

// From the per-chunk counts: expert_counts [E], expert_offsets [E+1] (exclusive scan) and
// chunk_base[c * E + e], the sorted position of chunk c's first pair of expert e. One block.
extern "C" __global__ void expert_scan(const int* chunk_counts, int C, int E, i64* expert_counts,
                                       i64* expert_offsets, i64* chunk_base) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        i64 run = 0;
        for (int c = 0; c < C; c++) {
            chunk_base[(i64)c * E + e] = run;
            run += chunk_counts[(i64)c * E + e];
        }
        expert_counts[e] = run;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        i64 run = 0;
        for (int e = 0; e < E; e++) {
            expert_offsets[e] = run;
            run += expert_counts[e];
        }
        expert_offsets[E] = run;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        i64 base = expert_offsets[e];
        for (int c = 0; c < C; c++) chunk_base[(i64)c * E + e] += base;
    }
}

// Stable scatter: pair j of chunk c goes to chunk_base[c][e] + (pairs of expert e before j in
// the chunk). Writes sorted_pair, sorted_token (by sorted position) and pair_position (by pair).
extern "C" __global__ void __launch_bounds__(CHUNK)
    expert_scatter(const i64* expert_ids, const i64* pair_token, i64 N, int E, const i64* chunk_base,
                   i64* sorted_pair, i64* sorted_token, i64* pair_position) {
    __shared__ int ids[CHUNK];
    i64 j = (i64)blockIdx.x * CHUNK + threadIdx.x;
    int e = j < N ? (int)expert_ids[j] : -1;
    ids[threadIdx.x] = e;
    __syncthreads();
    if (j >= N || e < 0 || e >= E) return;
    int rank = 0;
    for (int i = 0; i < (int)threadIdx.x; i++) rank += ids[i] == e;
    i64 pos = chunk_base[(i64)blockIdx.x * E + e] + rank;
    sorted_pair[pos] = j;
    sorted_token[pos] = pair_token[j];
    pair_position[j] = pos;
}

// ---------------------------------------------------------------------------------------------
// Row movement. H (the row length) is a multiple of 8, so rows move as 16-byte vectors.
// ---------------------------------------------------------------------------------------------

template <int DT>
__device__ __forceinline__ void unpack8(uint4 v, float (&f)[8]) {
    const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = to_f32<DT>((u16)(w[i] & 0xffffu));
        f[2 * i + 1] = to_f32<DT>((u16)(w[i] >> 16));
    }
}

template <int DT>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
    uint4 v;
    v.x = pack2(from_f32<DT>(f[0]), from_f32<DT>(f[1]));
    v.y = pack2(from_f32<DT>(f[2]), from_f32<DT>(f[3]));
    v.z = pack2(from_f32<DT>(f[4]), from_f32<DT>(f[5]));
    v.w = pack2(from_f32<DT>(f[6]), from_f32<DT>(f[7]));
    return v;
}

// out[r] = src[index[r]], times scale[scale_index[r]] when scale is not null. Block per row.
template <int DT>
__device__ __forceinline__ void gather_rows(const u16* src, const i64* index, const float* scale,
                                            const i64* scale_index, u16* out, int H) {
    i64 r = blockIdx.x;
    const uint4* from = reinterpret_cast<const uint4*>(src + index[r] * H);
    uint4* to = reinterpret_cast<uint4*>(out + r * H);
    if (scale == nullptr) {
        for (int c = threadIdx.x; c < H / 8; c += blockDim.x) to[c] = from[c];
        return;
    }
    float s = scale[scale_index[r]];
    for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
        float f[8];
        unpack8<DT>(from[c], f);
#pragma unroll
        for (int i = 0; i < 8; i++) f[i] *= s;
        to[c] = pack8<DT>(f);
    }
}

// out[t] = sum over token t's pairs j, in CSR order, of weights[j] * buf[pair_position[j]]
// (weight 1 when weights is null), summed in f32. Block per token.
template <int DT>
__device__ __forceinline__ void combine_rows(const u16* buf, const i64* pair_position, const i64* token_offsets,
                                             const float* weights, u16* out, int H) {
    i64 t = blockIdx.x;
    i64 first = token_offsets[t], last = token_offsets[t + 1];
    for (int c = threadIdx.x; c < H / 8; c += blockDim.x) {
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (i64 j = first; j < last; j++) {
            float w = weights == nullptr ? 1.0f : weights[j];
            float f[8];
            unpack8<DT>(reinterpret_cast<const uint4*>(buf + pair_position[j] * H)[c], f);
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] += w * f[i];
        }
        reinterpret_cast<uint4*>(out + t * H)[c] = pack8<DT>(acc);
    }
}

// grad_weights[j] = dot(grad_out[pair_token[j]], buf[pair_position[j]]) in f32. Warp per pair.
template <int DT>
__device__ __forceinline__ void combine_weight_grad(const u16* grad_out, const u16* buf, const i64* pair_position,
                                                    const i64* pair_token, i64 N, int H, float* grad_weights) {
    i64 j = (i64)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (j >= N) return;
    const uint4* g = reinterpret_cast<const uint4*>(grad_out + pair_token[j] * H);
    const uint4* b = reinterpret_cast<const uint4*>(buf + pair_position[j] * H);
    float acc = 0.0f;
    for (int c = lane; c < H / 8; c += 32) {
        float fg[8], fb[8];
        unpack8<DT>(g[c], fg);
        unpack8<DT>(b[c], fb);
#pragma unroll
        for (int i = 0; i < 8; i++) acc += fg[i] * fb[i];
    }
    acc = warp_sum(acc);
    if (lane == 0) grad_weights[j] = acc;
}

// The SwiGLU backward, elementwise over [rows, F]: from h = [gate | up] [rows, 2F] and the
// gradient of act = silu(gate) * up, the gradient of h, and act itself (for the down weights'
// gradient).
template <int DT>
__device__ __forceinline__ void swiglu_backward(const u16* h, const u16* grad_act, u16* grad_h, u16* act, i64 rows,
                                                int F) {
    i64 n = rows * F;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 r = i / F;
        int c = (int)(i - r * F);
        float g = to_f32<DT>(h[r * 2 * F + c]), u = to_f32<DT>(h[r * 2 * F + F + c]);
        float ga = to_f32<DT>(grad_act[i]);
        float sig = 1.0f / (1.0f + expf(-g));
        float sl = g * sig;
        act[i] = from_f32<DT>(sl * u);
        grad_h[r * 2 * F + F + c] = from_f32<DT>(ga * sl);
        grad_h[r * 2 * F + c] = from_f32<DT>(ga * u * sig * (1.0f + g * (1.0f - sig)));
    }
}

#define PERMUTE_KERNELS(NAME, DT)                                                                              \
    extern "C" __global__ void gather_rows_##NAME(const u16* src, const i64* index, const float* scale,        \
                                                  const i64* scale_index, u16* out, int H) {                   \
        gather_rows<DT>(src, index, scale, scale_index, out, H);                                               \
    }                                                                                                          \
    extern "C" __global__ void combine_rows_##NAME(const u16* buf, const i64* pair_position,                   \
                                                   const i64* token_offsets, const float* weights, u16* out,   \
                                                   int H) {                                                    \
        combine_rows<DT>(buf, pair_position, token_offsets, weights, out, H);                                  \
    }                                                                                                          \
    extern "C" __global__ void combine_weight_grad_##NAME(const u16* grad_out, const u16* buf,                 \
                                                          const i64* pair_position, const i64* pair_token,     \
                                                          i64 N, int H, float* grad_weights) {                 \
        combine_weight_grad<DT>(grad_out, buf, pair_position, pair_token, N, H, grad_weights);                 \
    }                                                                                                          \
    extern "C" __global__ void swiglu_backward_##NAME(const u16* h, const u16* grad_act, u16* grad_h,          \
                                                      u16* act, i64 rows, int F) {                             \
        swiglu_backward<DT>(h, grad_act, grad_h, act, rows, F);                                                \
    }

PERMUTE_KERNELS(f16, DT_F16)
PERMUTE_KERNELS(bf16, DT_BF16)
