// Device helpers shared by the KD, top-k and softmax kernels: dtype conversion, 16-byte packs
// and the loop over them, NaN-propagating online max/sum, and deterministic block / cluster
// reductions.
//
// CUDA headers only (no torch): every .cu file compiles with nvcc alone.
#pragma once

#include <cstdint>

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace kdk {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxVec = 8;  // elements per 16-byte pack of a 2-byte dtype; slices are multiples of it

// ---- dtype conversion (explicit: torch builds define __CUDA_NO_HALF_CONVERSIONS__) ------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- packs: VEC consecutive elements moved as one aligned access -----------------------------

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

__host__ __device__ __forceinline__ bool is_aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// Loads elements [0, n) of a pack at p (n <= VEC); one vector load when the pack is full and
// `aligned` (p aligned to the pack size), else element by element. Lanes >= n are zero.
template <int VEC, typename T>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* __restrict__ p, int n, bool aligned) {
  Pack<T, VEC> r;
  if (aligned && n == VEC) {
    r = *reinterpret_cast<const Pack<T, VEC>*>(p);
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.v[j] = j < n ? p[j] : from_float<T>(0.f);
  }
  return r;
}

// Two floats rounded to T (half / bfloat16) in one 32-bit word, the first in the low half (the
// lower address): one paired conversion instruction for both.
template <typename T> __device__ __forceinline__ unsigned pack2(float a, float b);
template <> __device__ __forceinline__ unsigned pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  unsigned u;
  memcpy(&u, &h, sizeof(u));
  return u;
}
template <> __device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  unsigned u;
  memcpy(&u, &h, sizeof(u));
  return u;
}

// Stores elements [0, n) of v at p (global memory), rounding to T; same vector / scalar rule as
// load_pack. A full pack goes out as one st.global.v4 / .v2 of 32-bit words (inline PTX): nvcc 13
// split a plain store of the Pack, or of a uint4, into eight STG.E.U16 or four STG.E per pack
// inside the row loops (the kernel report's SASS), whereas the asm fixes the width. The "memory"
// clobber keeps it ordered like any store (kd_topk.cu overwrites some entries after a barrier).
template <int VEC, typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ p, const float (&v)[VEC], int n, bool aligned) {
  constexpr int kWords = static_cast<int>(sizeof(T)) * VEC / 4;
  static_assert(kWords == 2 || kWords == 4, "a pack is 8 or 16 bytes");
  if (aligned && n == VEC) {
    unsigned w[kWords];
#pragma unroll
    for (int i = 0; i < kWords; ++i) {
      if constexpr (sizeof(T) == 4) w[i] = __float_as_uint(v[i]);
      else w[i] = pack2<T>(v[2 * i], v[2 * i + 1]);
    }
    if constexpr (kWords == 4)
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
                   : "memory");
    else
      asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w[0]), "r"(w[1]) : "memory");
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      if (j < n) p[j] = from_float<T>(v[j]);
  }
}

// ---- online softmax statistics ---------------------------------------------------------------

// max that lets a NaN through (fmaxf drops it): NaN in -> NaN out.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Running (m, r) of raw values x at a scale c > 0 (c = 1/T for tempered logits): m = max x and
// d = sum exp((x - m) c) = 1 + r. Empty state: (-inf, -1), i.e. d = 0.
// * Centred before scaled: (x - m) c carries a rounding of its own size, where x c - max(x) c
//   carries eps |x c| (0.004 at |x| = 65504) into every log-probability (docs/numerics.md).
// * The 1 that (one of) the max entries contributes stays out of r, so a nearly one-hot row keeps
//   its remainder: log d = log1pf(r), where a sum that includes the 1 would round the rest away.
//   Entries equal to the max are counted exactly (ties) rather than summed as exp(0).
// A +inf or NaN input leaves r = NaN, so that the row's log-sum-exp is NaN.
template <int VEC>
__device__ __forceinline__ void maxsum_add(float& m, float& r, const float (&x)[VEC], int n, float c) {
  float mx = m;
#pragma unroll
  for (int j = 0; j < VEC; ++j)
    if (j < n) mx = nan_max(mx, x[j]);
  if (mx == -INFINITY) return;  // nothing but -inf so far: still empty
  const bool grew = mx != m;    // a new max (or NaN): the old 1 + r becomes part of r
  float acc = grew ? (1.f + r) * __expf((m - mx) * c) : r;  // empty before: 0 * 0
  float ties = grew ? -1.f : 0.f;  // one entry equal to the new max is the 1 outside r
#pragma unroll
  for (int j = 0; j < VEC; ++j) {  // selects, not branches: the exp of a lane >= n is dropped
    const float e = __expf((x[j] - mx) * c);
    const bool tie = j < n && x[j] == mx;
    acc += j < n && !tie ? e : 0.f;
    ties += tie ? 1.f : 0.f;
  }
  m = mx;
  r = mx == INFINITY ? NAN : acc + ties;  // +inf: the exps of inf - inf were not taken above
}

// Merges (m2, r2) into (m, r), both at scale c: the side with the larger max keeps its 1 apart,
// the other side's 1 + r is rescaled into r. NaN in either max gives NaN.
__device__ __forceinline__ void maxsum_merge(float& m, float& r, float m2, float r2, float c) {
  const float mx = nan_max(m, m2);
  if (mx == -INFINITY) return;  // both empty
  r = m >= m2 ? r + (1.f + r2) * __expf((m2 - m) * c) : r2 + (1.f + r) * __expf((m - m2) * c);
  m = mx;
}

// log-sum-exp of values already scaled (c = 1): m + log d.
__device__ __forceinline__ float lse_of(float m, float r) { return m + log1pf(r); }

// log(exp(a) + exp(b)), -inf when both are -inf (never NaN from -inf - -inf).
__device__ __forceinline__ float logaddexp(float a, float b) {
  const float mx = nan_max(a, b);
  if (mx == -INFINITY) return -INFINITY;
  const float mn = a == mx ? b : a;
  return mx + log1pf(__expf(mn - mx));
}

// a * b, exactly 0 where a == 0: a zero probability times -inf (or NaN) is 0; a NaN a stays NaN.
__device__ __forceinline__ float mul0(float a, float b) { return a == 0.f ? 0.f : a * b; }

// K/2 interleaved (m, r) pairs, pair k / 2 at scale c[k / 2] (as it was accumulated).
template <int K>
struct MaxSumOp {
  float c[K / 2];
  __device__ __forceinline__ void operator()(float (&a)[K], const float (&b)[K]) const {
#pragma unroll
    for (int k = 0; k < K; k += 2) maxsum_merge(a[k], a[k + 1], b[k], b[k + 1], c[k / 2]);
  }
};

template <int K>
struct SumOp {
  __device__ __forceinline__ void operator()(float (&a)[K], const float (&b)[K]) const {
#pragma unroll
    for (int k = 0; k < K; ++k) a[k] += b[k];
  }
};

// ---- pack loops ----------------------------------------------------------------------------

// Runs use(i, buf) for the packs i = threadIdx.x + k * blockDim.x < npacks, issuing U loads
// before the first use so that several 16-byte requests per thread are in flight.
template <int U, typename Buf, typename Load, typename Use>
__device__ __forceinline__ void pack_loop(int npacks, Load&& load, Use&& use) {
  const int nt = blockDim.x;
  for (int i0 = threadIdx.x; i0 < npacks; i0 += U * nt) {
    Buf buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i0 + u * nt < npacks) load(i0 + u * nt, buf[u]);
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (i0 + u * nt < npacks) use(i0 + u * nt, buf[u]);
  }
}

// ---- deterministic reductions ----------------------------------------------------------------
// Fixed combination order (butterfly within a warp, warps in index order, cluster ranks in
// order), no atomics: the same inputs give bitwise the same result on every run.

template <int K>
struct ReduceSmem {
  float warp[kMaxWarps][K];
  float slot[K];   // this CTA's result, read by the other CTAs of its cluster
  float bcast[K];  // the cluster's result, broadcast to this CTA's threads
};

// Every thread of the block ends with the block's result. Call from block-uniform code.
template <int K, typename Op>
__device__ __forceinline__ void block_allreduce(float (&v)[K], ReduceSmem<K>& sm, Op op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    float o[K];
#pragma unroll
    for (int k = 0; k < K; ++k) o[k] = __shfl_xor_sync(0xffffffffu, v[k], off);
    op(v, o);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sm.warp[warp][k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = sm.warp[0][k];
  for (int w = 1; w < nwarps; ++w) {
    float o[K];
#pragma unroll
    for (int k = 0; k < K; ++k) o[k] = sm.warp[w][k];
    op(v, o);
  }
  __syncthreads();  // sm.warp may be reused by the next reduction
}

// Combines the block results of the `csize` CTAs of this block's cluster through distributed
// shared memory (sm_90). Every thread of every CTA ends with the same value. The caller must
// cluster_sync() before `sm` is written again (the peers may still be reading sm.slot).
template <int K, typename Op>
__device__ __forceinline__ void cluster_allreduce(float (&v)[K], ReduceSmem<K>& sm, int csize, Op op) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) sm.slot[k] = v[k];
  }
  cluster.sync();
  if (threadIdx.x == 0) {
    float acc[K];
    const float* r0 = cluster.map_shared_rank(sm.slot, 0);
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = r0[k];
    for (int r = 1; r < csize; ++r) {
      const float* rr = cluster.map_shared_rank(sm.slot, r);
      float o[K];
#pragma unroll
      for (int k = 0; k < K; ++k) o[k] = rr[k];
      op(acc, o);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) sm.bcast[k] = acc[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < K; ++k) v[k] = sm.bcast[k];
#else
  (void)v; (void)sm; (void)csize; (void)op;
  __trap();  // the host never launches a cluster on a binary without sm_90 code
#endif
}

__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#else
  __trap();
#endif
}

__device__ __forceinline__ int cluster_rank(int csize) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (csize > 1) return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
  (void)csize;
  return 0;
}

}  // namespace kdk
