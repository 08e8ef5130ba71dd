// Shared helpers of the deepseek_rs CUDA kernels (compiled at run time by NVRTC through CuPy).
//
// No CUDA headers are included: 16-bit floats are carried as raw `unsigned short` bits and
// converted, loaded and multiplied with inline PTX, so the sources compile with NVRTC alone.
// Every kernel is instantiated for FP16 (DT_F16) and BF16 (DT_BF16). Needs sm_80 or newer
// (cp.async, bf16 mma).
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

// -inf without <math.h> (NVRTC has no standard headers).
#define NEG_INF __int_as_float(0xff800000)

#define DT_F16 0
#define DT_BF16 1

template <int DT>
__device__ __forceinline__ float to_f32(u16 x) {
    if (DT == DT_F16) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
        return f;
    } else {
        return __uint_as_float(((u32)x) << 16);
    }
}

template <int DT>
__device__ __forceinline__ u16 from_f32(float f) {
    u16 x;
    if (DT == DT_F16) {
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(x) : "f"(f));
    } else {
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(x) : "f"(f));
    }
    return x;
}

// Two 16-bit values in one 32-bit word, `lo` at the lower address.
__device__ __forceinline__ u32 pack2(u16 lo, u16 hi) { return (u32)lo | ((u32)hi << 16); }

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

// ---------------------------------------------------------------------------------------------
// Tensor-core primitives (sm_80+)
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16-byte asynchronous copy global -> shared; `valid == false` writes 16 zero bytes instead
// (the source is not read, so out-of-range rows need no clamped address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
                 "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}

// The same, each matrix transposed on the way (for operands stored with the other dim contiguous).
__device__ __forceinline__ void ldmatrix_x4_trans(u32 (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(smem)));
}

// D = A (16x16, row) * B (16x8, col) + D, f32 accumulators.
template <int DT>
__device__ __forceinline__ void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (DT == DT_F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
            "{%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Fixed-order warp sum (butterfly): the same lanes are added in the same order every run.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
