// Expert routing on the GPU, the same rules as the Rust router (rust/router): softmax top-k,
// progressive top-p, and DeepSeek-V3's sigmoid group-limited top-k. One warp per token, its
// logit row staged in shared memory.
//
// Selection uses the Rust router's packed keys: each entry becomes one 64-bit integer, the
// value's order-preserving bits above the reversed expert index, so keys are distinct, a
// larger key is a better expert and ties go to the lower index. The next best expert is one
// warp-wide max over the keys below the previous pick: no sorting and no writes between picks.
//
// Outputs are padded per token to the rule's width W: ids [T, W] (int64), weights [T, W]
// (f32, times `scale`), counts [T] (int64; < W only for top-p). A row holding a NaN or
// infinite logit (or bias) lowers *bad to its token index (initialised to T by the host),
// and the host raises.
#include "common.cuh"

#define ROUTER_WARPS 4

__device__ __forceinline__ i64 select_key(float v, int i, int E) {
    int bits = __float_as_int(v + 0.0f);  // -0.0 and +0.0 tie
    int ordered = bits ^ (int)(((u32)(bits >> 31)) >> 1);  // negatives: reverse the magnitude order
    return ((i64)ordered << 32) | (i64)(u32)(E - 1 - i);
}

__device__ __forceinline__ i64 warp_max_i64(i64 v) {
    for (int o = 16; o > 0; o >>= 1) {
        i64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    return v;
}

// The best key of `row` below `prev` (every lane gets it). `row` has E entries.
__device__ __forceinline__ i64 next_best(const float* row, int E, i64 prev) {
    const int lane = threadIdx.x & 31;
    i64 best = (i64)0x8000000000000000LL;
    for (int i = lane; i < E; i += 32) {
        i64 k = select_key(row[i], i, E);
        if (k < prev && k > best) best = k;
    }
    return warp_max_i64(best);
}

__device__ __forceinline__ int key_index(i64 key, int E) { return E - 1 - (int)(key & 0xffffffffLL); }

// Loads token t's logits into `row` and reports whether they are all finite.
__device__ __forceinline__ bool stage_row(const float* logits, i64 t, int E, float* row) {
    const int lane = threadIdx.x & 31;
    bool finite = true;
    for (int i = lane; i < E; i += 32) {
        float z = logits[t * E + i];
        finite = finite && isfinite(z);
        row[i] = z;
    }
    finite = __all_sync(0xffffffffu, finite);
    __syncwarp();
    return finite;
}

// rule 0: top-k (W = k); rule 1: top-p (W = max_k; keep the shortest prefix of the experts by
// descending probability whose mass, accumulated in double as on the CPU, reaches p, within
// min_k..max_k).
extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
    route_softmax(const float* logits, int T, int E, int rule, int W, double p, int min_k, int renormalize,
                  float scale, i64* ids, float* weights, i64* counts, int* bad) {
    extern __shared__ float router_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 t = (i64)blockIdx.x * ROUTER_WARPS + warp;
    if (t >= T) return;
    float* row = router_smem + warp * E;
    if (!stage_row(logits, t, E, row)) {
        if (lane == 0) {
            atomicMin(bad, (int)t);
            counts[t] = 0;
        }
        return;
    }
    float mx = NEG_INF;
    for (int i = lane; i < E; i += 32) mx = fmaxf(mx, row[i]);
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.0f;
    for (int i = lane; i < E; i += 32) sum += expf(row[i] - mx);
    sum = warp_sum(sum);
    i64 prev = 0x7fffffffffffffffLL;
    double mass = 0.0;
    float kept = 0.0f;  // sum of the kept probabilities, for renormalisation
    int keep = 0;
    while (keep < W && !(rule == 1 && keep >= min_k && mass >= p)) {
        prev = next_best(row, E, prev);
        int e = key_index(prev, E);
        float prob = expf(row[e] - mx) / sum;
        mass += (double)prob;
        kept += prob;
        if (lane == 0) {
            ids[t * W + keep] = e;
            weights[t * W + keep] = prob;
        }
        keep++;
    }
    if (lane == 0) {
        for (int j = 0; j < keep; j++) {
            float w = weights[t * W + j];
            weights[t * W + j] = (renormalize ? w / kept : w) * scale;
        }
        for (int j = keep; j < W; j++) {
            ids[t * W + j] = 0;
            weights[t * W + j] = 0.0f;
        }
        counts[t] = keep;
    }
}

// DeepSeek-V3: choice = sigmoid(z) + bias; the topk_group groups (of n_group equal groups) with
// the largest sum of their two best choices (their one choice when a group has one expert)
// stay in the running, then the k best choices among them; weights are the unbiased
// sigmoid(z), divided by their sum + 1e-20 when renormalising. W = k.
extern "C" __global__ void __launch_bounds__(ROUTER_WARPS * 32)
    route_sigmoid_grouped(const float* logits, const float* bias, int T, int E, int k, int n_group,
                          int topk_group, int renormalize, float scale, i64* ids, float* weights, i64* counts,
                          int* bad) {
    extern __shared__ float router_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 t = (i64)blockIdx.x * ROUTER_WARPS + warp;
    if (t >= T) return;
    float* row = router_smem + warp * (E + n_group);
    float* group_score = row + E;
    bool bias_finite = true;
    for (int i = lane; i < E; i += 32) bias_finite = bias_finite && isfinite(bias[i]);
    bias_finite = __all_sync(0xffffffffu, bias_finite);
    if (!stage_row(logits, t, E, row) || !bias_finite) {
        if (lane == 0) {
            atomicMin(bad, (int)t);
            counts[t] = 0;
        }
        return;
    }
    for (int i = lane; i < E; i += 32) row[i] = 1.0f / (1.0f + expf(-row[i])) + bias[i];
    __syncwarp();
    const int gs = E / n_group;
    for (int g = lane; g < n_group; g += 32) {
        float first = NEG_INF, second = NEG_INF;
        for (int i = g * gs; i < (g + 1) * gs; i++) {
            float v = row[i];
            if (v > first) {
                second = first;
                first = v;
            } else if (v > second) {
                second = v;
            }
        }
        group_score[g] = gs == 1 ? first : first + second;
    }
    __syncwarp();
    i64 gprev = 0x7fffffffffffffffLL;
    for (int j = 0; j < topk_group; j++) gprev = next_best(group_score, n_group, gprev);
    // Groups whose key is at least the last pick's are the chosen ones.
    for (int i = lane; i < E; i += 32) {
        int g = i / gs;
        if (select_key(group_score[g], g, n_group) < gprev) row[i] = NEG_INF;
    }
    __syncwarp();
    i64 prev = 0x7fffffffffffffffLL;
    float kept = 0.0f;
    for (int j = 0; j < k; j++) {
        prev = next_best(row, E, prev);
        int e = key_index(prev, E);
        float s = 1.0f / (1.0f + expf(-logits[t * E + e]));
        kept += s;
        if (lane == 0) {
            ids[t * k + j] = e;
            weights[t * k + j] = s;
        }
    }
    if (lane == 0) {
        for (int j = 0; j < k; j++) {
            float w = weights[t * k + j];
            weights[t * k + j] = (renormalize ? w / (kept + 1e-20f) : w) * scale;
        }
        counts[t] = k;
    }
}
