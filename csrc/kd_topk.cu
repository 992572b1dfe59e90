// Fused KD forward + backward against an offline top-k teacher (kdkernels.ops.kd_topk_fused).
// Same math as torch_backend.kd_topk_forward (the reference semantics) and the same design as
// triton_kernels._kd_topk_kernel. The teacher is p = softmax(logprobs / T) over the k ids of a
// row and 0 on every other vocabulary entry; the student keeps its full-vocabulary
// q = softmax(s / T). Divergences kl, soft_ce and jsd (reverse_kl is infinite here: rejected
// by the API).
//
// One CTA per row (rows strided over the grid). Per row:
//   1      online max / sum of s/T (and of s for the hard term at T != 1) over the row in
//          16-byte packs, and of the k tempered teacher log-probabilities; one block reduction
//   ids    thread j % blockDim.x takes entry j: log p, log q at the id, the divergence's row
//          sums (a second block reduction); the entries stay in shared memory
//   2      the dense student gradient coef * q * soft_scale / T (+ hard term) over the row,
//          written once in packs; then, after __syncthreads, each thread overwrites the
//          gradient at its own ids with their exact values, and writes the teacher gradient.
// HBM traffic: the student row read twice (the second read often from L2) and the gradient
// written once, 6 B/element in bf16; the teacher is O(k) per row.
#include "kd_common.cuh"
#include "kd_launch.h"

namespace kdk {
namespace {

struct TopkParams {
  const void* s;            // [N, V] student logits, row stride s_stride, last dim contiguous
  int64_t s_stride;
  const int64_t* ids;       // [N, k] contiguous: distinct per row, in [0, V)
  const void* lp;           // [N, k] contiguous teacher log-probabilities (T = 1), dtype lp_dtype
  int lp_dtype;
  const int64_t* labels;    // [N] (stride label_stride) or null
  int64_t label_stride;
  float* loss;              // [N]
  void* gs;                 // [N, V] contiguous, student dtype
  void* gt;                 // [N, k] contiguous, lp dtype, or null (no teacher gradient)
  int64_t N;
  int V, k;
  float inv_t, beta, log_beta, log1m_beta;
  float soft_scale;         // soft_weight * (T^2 or 1)
  float g_scale;            // soft_scale / T
  float hard_weight;
  int64_t ignore_index;
  int hard;                 // hard-label cross-entropy term present
  int use_u;                // hard term at T != 1: needs the untempered log-sum-exp too
};

// The teacher side is O(k) scalar accesses per row: its dtype is a runtime switch (uniform
// branch), not a template parameter (a third of the instantiations).
__device__ __forceinline__ float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kFloat16: return to_float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return to_float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* p, int dtype, int64_t i, float v) {
  switch (dtype) {
    case kFloat16: static_cast<__half*>(p)[i] = from_float<__half>(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = from_float<__nv_bfloat16>(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

template <typename TS, int DIV>
__global__ void __launch_bounds__(kMaxThreads) kd_topk_kernel(const TopkParams p) {
  static_assert(DIV == kKL || DIV == kSoftCE || DIV == kJSD, "reverse_kl is infinite for a top-k teacher");
  constexpr int VEC = 16 / sizeof(TS);
  using PS = Pack<TS, VEC>;
  constexpr int kLoadUnroll = 4;  // 16-byte loads in flight per thread in pass 1 (one input here)

  __shared__ ReduceSmem<6> red_stats;
  __shared__ ReduceSmem<4> red_ids;
  // Entry j belongs to thread j % blockDim.x in both loops over the ids, so a thread reads back
  // only what it wrote itself (no barrier needed for these arrays).
  __shared__ int sm_id[kTopkMaxK];      // the id, or -1 if out of [0, V) (never dereferenced)
  __shared__ float sm_lp[kTopkMaxK];    // tempered teacher log-probability, then log p
  __shared__ float sm_s[kTopkMaxK];     // the student logit at the id

  const int V = p.V, K = p.k;
  const int npacks = (V + VEC - 1) / VEC;
  const float inv_t = p.inv_t;

  for (int64_t row = blockIdx.x; row < p.N; row += gridDim.x) {
    const TS* s_row = static_cast<const TS*>(p.s) + row * p.s_stride;
    TS* gs_row = static_cast<TS*>(p.gs) + row * static_cast<int64_t>(V);
    const int64_t kbase = row * K;  // row start in ids, logprobs and the teacher gradient
    const bool in_al = is_aligned(s_row, sizeof(PS)), out_al = is_aligned(gs_row, sizeof(PS));

    bool ignored = false, bad = false;
    int64_t y = -1;
    if (p.labels) {
      y = p.labels[row * p.label_stride];
      ignored = y == p.ignore_index;
      bad = !ignored && (y < 0 || y >= V);  // NaN row, never an out-of-bounds read
    }
    if (ignored) {  // loss 0, gradients 0, nothing read (block-uniform branch)
      const float zero[VEC] = {};
      for (int i = threadIdx.x; i < npacks; i += blockDim.x) {
        const int c = i * VEC;
        store_pack<VEC>(gs_row + c, zero, min(VEC, V - c), out_al);
      }
      if (p.gt)
        for (int j = threadIdx.x; j < K; j += blockDim.x) store_from_float(p.gt, p.lp_dtype, kbase + j, 0.f);
      if (threadIdx.x == 0) p.loss[row] = 0.f;
      continue;
    }

    // ---- pass 1: (m, r) of s', s (hard term at T != 1) and the tempered teacher entries ----
    // (already scaled here: scale 1; kd_common.cuh: d = 1 + r, empty (-inf, -1))
    float st[6] = {-INFINITY, -1.f, -INFINITY, -1.f, -INFINITY, -1.f};
    pack_loop<kLoadUnroll, PS>(
        npacks, [&](int i, PS& ps) { const int c = i * VEC; ps = load_pack<VEC>(s_row + c, min(VEC, V - c), in_al); },
        [&](int i, const PS& ps) {
          const int n = min(VEC, V - i * VEC);
          float x[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) x[j] = to_float(ps.v[j]) * inv_t;
          maxsum_add<VEC>(st[0], st[1], x, n, 1.f);
          if (p.use_u) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) x[j] = to_float(ps.v[j]);
            maxsum_add<VEC>(st[2], st[3], x, n, 1.f);
          }
        });
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const float x[1] = {load_as_float(p.lp, p.lp_dtype, kbase + j) * inv_t};
      sm_lp[j] = x[0];
      maxsum_add<1>(st[4], st[5], x, 1, 1.f);
    }
    block_allreduce(st, red_stats, MaxSumOp<6>{{1.f, 1.f, 1.f}});
    const float lse_s = lse_of(st[0], st[1]);
    const float lse_h = p.use_u ? lse_of(st[2], st[3]) : lse_s;  // at T == 1, s' == s
    const float lse_t = lse_of(st[4], st[5]);

    // ---- the k entries: the divergence's row sums ----
    // acc: kl / soft_ce: D; jsd: KL(p||m), sum over the ids of q log(q/m), sum of q at the ids.
    // acc[3] counts ids outside [0, V) (undefined input): they make the row NaN.
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const int64_t id = p.ids[kbase + j];
      const bool id_ok = id >= 0 && id < V;
      const float s_k = id_ok ? to_float(s_row[id]) : NAN;
      const float log_p = sm_lp[j] - lse_t;
      sm_lp[j] = log_p;
      sm_s[j] = s_k;
      sm_id[j] = id_ok ? static_cast<int>(id) : -1;
      const float pk = __expf(log_p), lq = s_k * inv_t - lse_s;
      if constexpr (DIV == kKL) {
        acc[0] += mul0(pk, log_p - lq);
      } else if constexpr (DIV == kSoftCE) {
        acc[0] -= mul0(pk, lq);
      } else {
        const float qk = __expf(lq);
        const float lm = logaddexp(log_p + p.log_beta, lq + p.log1m_beta);  // log m
        acc[0] += mul0(pk, log_p - lm);
        acc[1] += mul0(qk, lq - lm);
        acc[2] += qk;
      }
      acc[3] += id_ok ? 0.f : 1.f;
    }
    block_allreduce(acc, red_ids, SumOp<4>());
    bad = bad || acc[3] != 0.f;

    // Outside the ids p = 0: the student gradient there is coef * q (times g_scale). For jsd,
    // m = (1 - beta) q there, so log(q / m) = c = -log(1 - beta) on that mass.
    float D, coef = 1.f, kl_pm = 0.f, kl_qm = 0.f;
    if constexpr (DIV == kJSD) {
      const float c = -p.log1m_beta;
      const float q_out = nan_max(1.f - acc[2], 0.f);  // student mass outside the ids
      kl_pm = acc[0];
      kl_qm = acc[1] + c * q_out;
      D = p.beta * kl_pm + (1.f - p.beta) * kl_qm;
      coef = (1.f - p.beta) * (c - kl_qm);
    } else {
      D = acc[0];
    }

    // ---- pass 2: the dense student gradient, every column once ----
    const float dense = coef * p.g_scale;
    pack_loop<2, PS>(
        npacks, [&](int i, PS& ps) { const int c = i * VEC; ps = load_pack<VEC>(s_row + c, min(VEC, V - c), in_al); },
        [&](int i, const PS& ps) {
          const int c = i * VEC, n = min(VEC, V - c);
          float g[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            const float s = to_float(ps.v[j]);
            const float q = __expf(s * inv_t - lse_s);
            float v = dense * q;
            if (p.hard) {
              v += p.hard_weight * (p.use_u ? __expf(s - lse_h) : q);
              if (c + j == y) v -= p.hard_weight;
            }
            g[j] = bad ? NAN : v;
          }
          store_pack<VEC>(gs_row + c, g, n, out_al);
        });
    // Every thread's dense stores land before any thread overwrites an id's entry.
    __syncthreads();

    // ---- the ids: exact student gradient entries and the teacher gradient ----
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const int id = sm_id[j];
      const float log_p = sm_lp[j], s_k = sm_s[j];
      const float pk = __expf(log_p), lq = s_k * inv_t - lse_s, qk = __expf(lq);
      float g, dt;  // dD/ds' at the id, dD/d(lp / T)
      if constexpr (DIV == kKL) {
        g = qk - pk;
        dt = mul0(pk, log_p - lq - D);
      } else if constexpr (DIV == kSoftCE) {
        g = qk - pk;
        dt = -mul0(pk, lq + D);
      } else {
        const float lm = logaddexp(log_p + p.log_beta, lq + p.log1m_beta);
        g = (1.f - p.beta) * mul0(qk, lq - lm - kl_qm);
        dt = p.beta * mul0(pk, log_p - lm - kl_pm);
      }
      g *= p.g_scale;
      if (p.hard) {
        g += p.hard_weight * (p.use_u ? __expf(s_k - lse_h) : qk);
        if (id == y) g -= p.hard_weight;
      }
      if (id >= 0) gs_row[id] = from_float<TS>(bad ? NAN : g);
      // d loss / d logprobs = dD/d(lp / T) * soft_scale / T; not NaN on a bad label (as torch)
      if (p.gt) store_from_float(p.gt, p.lp_dtype, kbase + j, dt * p.g_scale);
    }

    if (threadIdx.x == 0) {
      float l = p.soft_scale * D;
      if (p.hard && !bad) l += p.hard_weight * (lse_h - to_float(s_row[y]));
      p.loss[row] = bad ? NAN : l;
    }
  }
}

template <typename TS, int DIV>
cudaError_t topk_typed(const TopkParams& p, cudaStream_t stream) {
  // Threads per row as for the other row kernels: enough packs per thread to keep loads in flight.
  const int threads = p.V >= 16384 ? 512 : p.V >= 4096 ? 256 : 128;
  const auto grid = static_cast<unsigned>(p.N < (int64_t{1} << 30) ? p.N : (int64_t{1} << 30));
  kd_topk_kernel<TS, DIV><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename TS>
cudaError_t topk_divergence(const TopkParams& p, int divergence, cudaStream_t stream) {
  switch (divergence) {
    case kKL: return topk_typed<TS, kKL>(p, stream);
    case kSoftCE: return topk_typed<TS, kSoftCE>(p, stream);
    case kJSD: return topk_typed<TS, kJSD>(p, stream);
    default: return cudaErrorInvalidValue;  // reverse_kl: infinite for a top-k teacher
  }
}

}  // namespace

cudaError_t kd_topk_launch(const KdTopkArgs& a, cudaStream_t stream) {
  // V - 64 bound as in the binding (check_rows): the kernel's int arithmetic V + VEC - 1 (npacks)
  // would overflow for V within VEC of 2**31.
  if (a.k < 1 || a.k > kTopkMaxK || a.k > a.V || a.V >= (int64_t{1} << 31) - 64) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  TopkParams p;
  p.s = a.student;
  p.s_stride = a.s_stride;
  p.ids = a.ids;
  p.lp = a.logprobs;
  p.lp_dtype = a.lp_dtype;
  p.labels = a.labels;
  p.label_stride = a.label_stride;
  p.loss = a.loss;
  p.gs = a.grad_s;
  p.gt = a.grad_t;
  p.N = a.N;
  p.V = static_cast<int>(a.V);
  p.k = static_cast<int>(a.k);
  const bool jsd = a.divergence == kJSD;
  p.inv_t = static_cast<float>(1.0 / a.temperature);
  p.beta = static_cast<float>(a.beta);
  p.log_beta = jsd ? static_cast<float>(log(a.beta)) : 0.f;
  p.log1m_beta = jsd ? static_cast<float>(log1p(-a.beta)) : 0.f;
  p.soft_scale = static_cast<float>(a.soft_scale);
  p.g_scale = static_cast<float>(a.soft_scale / a.temperature);
  p.hard_weight = static_cast<float>(a.hard_weight);
  p.ignore_index = a.ignore_index;
  p.hard = a.labels != nullptr && a.hard_weight != 0.0;
  p.use_u = p.hard && a.temperature != 1.0;
  switch (a.s_dtype) {
    case kFloat32: return topk_divergence<float>(p, a.divergence, stream);
    case kFloat16: return topk_divergence<__half>(p, a.divergence, stream);
    case kBFloat16: return topk_divergence<__nv_bfloat16>(p, a.divergence, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kdk
