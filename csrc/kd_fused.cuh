// Fused knowledge-distillation forward + backward: one kernel template, compile-time switches
// for the dtypes, the divergence and the teacher kind. Included by kd_<divergence>.cu only.
//
// One row pair (student s, teacher t, V entries) is handled by a cluster of C CTAs (C = 1 off
// sm_90), CTA r owning the slice [r * slice, (r + 1) * slice). Passes over the slice:
//   1  stats     online max of s, t and sum of exp((x - max) / T) (and of s - max for the hard
//                term at T != 1), combined across the cluster through distributed shared memory
//   2  divergence (reverse_kl, jsd, or any teacher gradient: the gradient needs D first)
//   3  gradient  d loss / d s (and d loss / d t), plus D for kl / soft_ce without teacher grad
// "Resident" plans copy the slice into shared memory during pass 1, so passes 2-3 read it from
// chip: HBM traffic is one read of s and t and one write of the gradient (6 B/element in bf16).
// Otherwise passes 2-3 re-read global memory (L2 if the row is still there).
// Elements of a slice go to threads in 16-byte packs, pack i to thread i % blockDim.x in every
// pass, so a thread re-reads in shared memory only what it wrote itself.
// Numerics (docs/numerics.md, as kdkernels/backends/torch_math.py): logits are centred before
// they are tempered, log q = (s - max s) / T - log d_s; the log-ratio u = log p - log q is formed
// from the centred logits and one per-row constant; KL, reverse KL and jsd are summed in their
// cancellation-free forms (w_phi below), which stay accurate when teacher and student are close.
#pragma once

#include <cstdio>

#include "kd_common.cuh"
#include "kd_launch.h"

namespace kdk {

struct KdParams {
  const void* s;           // [N, V] student logits, row stride s_stride
  const void* t;           // [N, V] teacher logits / probabilities, row stride t_stride
  int64_t s_stride, t_stride;
  const int64_t* labels;   // [N] (stride label_stride) or null
  int64_t label_stride;
  float* loss;             // [N]
  void* gs;                // [N, V] contiguous, student dtype
  void* gt;                // [N, V] contiguous, teacher dtype, or null
  int64_t N;
  int V;
  int slice;               // elements per CTA, multiple of kMaxVec
  int cluster;             // CTAs per row
  int resident;            // slice kept in dynamic shared memory between passes
  float inv_t, beta, log_beta, log1m_beta;
  float soft_scale;        // soft_weight * (T^2 or 1)
  float g_scale;           // soft_scale / T: d(soft_scale * D)/ds = g_scale * dD/ds'
  float hard_weight;
  int64_t ignore_index;
  int hard;                // hard-label cross-entropy term present
  int use_u;               // hard term at T != 1: needs the untempered log-sum-exp too
};

// w phi(x) with phi(x) = x - 1 + exp(-x) >= 0, given em = expm1(-x) and v = w exp(-x); v where
// w == 0 (a zero weight contributes the other side's mass, never NaN). KL(w || v) is the row sum
// of these with x = log w/v (docs/numerics.md): x + expm1(-x) above -1 carries eps |x| instead of
// the plain sum's eps |log w|; w x - w + v below (em, possibly inf there, is not read). NaN x
// (with w > 0) gives NaN.
__device__ __forceinline__ float w_phi(float w, float x, float em, float v) {
  return w == 0.f ? v : x > -1.f ? w * (x + em) : w * x - w + v;
}

// The entry's terms of KL(p||m) and KL(q||m), m = beta p + (1 - beta) q, from u = log p - log q.
// One side's log-ratio in its near form: where u > -1, log p/m = -log1p(A), A = (1 - beta)
// expm1(-u) (exact for small u); otherwise log q/m = -log1p(A), A = beta expm1(u). Then
// expm1(-log w/m) = A for that side, and for the other side (x_other = x -+ u, a difference that
// does not cancel on this branch) expm1(-x_other) = -(1 - a) E / (1 + E), E the expm1 above, a
// the weight in A. One expm1f, one log1pf and one division for both terms; no overflow (E <= e - 1).
__device__ __forceinline__ void jsd_terms(float pw, float qw, float u, float beta, float& tp, float& tq) {
  const bool near_p = u > -1.f;
  const float a = near_p ? 1.f - beta : beta;
  const float E = expm1f(near_p ? -u : u);  // in [-1, e - 1]
  const float A = a * E;
  const float x = -log1pf(A);                                 // log p/m (near_p) or log q/m
  const float em_other = -(1.f - a) * __fdividef(E, 1.f + E);  // read only where x_other > -1
  const float x_other = near_p ? x - u : x + u;
  const float mix = beta * pw + (1.f - beta) * qw;
  tp = w_phi(pw, near_p ? x : x_other, near_p ? A : em_other, mix);
  tq = w_phi(qw, near_p ? x_other : x, near_p ? em_other : A, mix);
}

template <typename TS, typename TT, int DIV, bool PROBS>
__global__ void __launch_bounds__(kMaxThreads) kd_fwd_bwd_kernel(const KdParams p) {
  constexpr int VEC = 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
  using PS = Pack<TS, VEC>;
  using PT = Pack<TT, VEC>;
  struct PackPair { PS s; PT t; };
  struct Elem { float log_q, q, log_p, p, u; };  // u = log p - log q
  // Packs per thread in flight in pass 1: 64 B of each input for 4-wide packs, 32 B for 8-wide
  // ones (more spills registers under the 128-register cap of 512 threads).
  constexpr int kLoadUnroll = VEC == 8 ? 2 : 4;

  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ ReduceSmem<6> red_stats;
  __shared__ ReduceSmem<2> red_div;

  const int C = p.cluster;
  const int rank = cluster_rank(C);
  const int b = rank * p.slice;                       // first element of this CTA's slice
  const int L = max(0, min(p.V - b, p.slice));        // its length (0 for trailing CTAs at small V)
  const int npacks = (L + VEC - 1) / VEC;
  PS* sm_s = reinterpret_cast<PS*>(dyn_smem);
  PT* sm_t = reinterpret_cast<PT*>(dyn_smem + ((static_cast<size_t>(p.slice) * sizeof(TS) + 15) & ~size_t(15)));
  const bool resident = p.resident != 0;
  const bool need_d_first = DIV == kReverseKL || DIV == kJSD || p.gt != nullptr;
  const float inv_t = p.inv_t;

  // Raw teacher value, centred and tempered like a logit: t, or log(P) with log(0) = -inf (p = 0,
  // never NaN).
  auto teacher_raw = [&](float t) -> float {
    if constexpr (PROBS) return t == 0.f ? -INFINITY : logf(t);
    else return t;
  };

  for (int64_t row = blockIdx.x / C; row < p.N; row += gridDim.x / C) {
    const TS* s_row = static_cast<const TS*>(p.s) + row * p.s_stride + b;
    const TT* t_row = static_cast<const TT*>(p.t) + row * p.t_stride + b;
    TS* gs_row = static_cast<TS*>(p.gs) + row * static_cast<int64_t>(p.V) + b;
    TT* gt_row = p.gt ? static_cast<TT*>(p.gt) + row * static_cast<int64_t>(p.V) + b : nullptr;
    const bool in_al = is_aligned(s_row, sizeof(PS)) && is_aligned(t_row, sizeof(PT));
    const bool out_al_s = is_aligned(gs_row, sizeof(PS));
    const bool out_al_t = gt_row != nullptr && is_aligned(gt_row, sizeof(PT));

    bool ignored = false, bad = false;
    int64_t y = -1;
    if (p.labels) {
      y = p.labels[row * p.label_stride];
      ignored = y == p.ignore_index;
      bad = !ignored && (y < 0 || y >= p.V);  // NaN row, never an out-of-bounds read
    }
    if (ignored) {  // loss 0, gradients 0, nothing read (uniform across the cluster: no sync)
      const float zero[VEC] = {};
      for (int i = threadIdx.x; i < npacks; i += blockDim.x) {
        const int k = i * VEC, n = min(VEC, L - k);
        store_pack<VEC>(gs_row + k, zero, n, out_al_s);
        if (gt_row) store_pack<VEC>(gt_row + k, zero, n, out_al_t);
      }
      if (rank == 0 && threadIdx.x == 0) p.loss[row] = 0.f;
      continue;
    }

    // ---- pass 1: statistics (and the copy on chip) ----
    // (m, r) of s and of the raw teacher at scale 1/T, of s at scale 1 (hard term at T != 1):
    // m the raw max, d = 1 + r = sum exp((x - m) scale) (kd_common.cuh)
    float st[6] = {-INFINITY, -1.f, -INFINITY, -1.f, -INFINITY, -1.f};
    pack_loop<kLoadUnroll, PackPair>(
        npacks,
        [&](int i, PackPair& pp) {
          const int k = i * VEC, n = min(VEC, L - k);
          pp.s = load_pack<VEC>(s_row + k, n, in_al);
          pp.t = load_pack<VEC>(t_row + k, n, in_al);
        },
        [&](int i, const PackPair& pp) {
          const int n = min(VEC, L - i * VEC);
          if (resident) {
            sm_s[i] = pp.s;
            sm_t[i] = pp.t;
          }
          float xs[VEC], xt[VEC];
#pragma unroll
          for (int j = 0; j < VEC; ++j) {
            xs[j] = to_float(pp.s.v[j]);
            xt[j] = teacher_raw(to_float(pp.t.v[j]));
          }
          maxsum_add<VEC>(st[0], st[1], xs, n, inv_t);
          maxsum_add<VEC>(st[2], st[3], xt, n, inv_t);
          if (p.use_u) maxsum_add<VEC>(st[4], st[5], xs, n, 1.f);
        });
    const MaxSumOp<6> stats_op{{inv_t, inv_t, 1.f}};
    block_allreduce(st, red_stats, stats_op);
    if (C > 1) cluster_allreduce(st, red_stats, C, stats_op);
    // log q = z_s - ld_s with z_s = (s - m_s) / T; log p likewise; the hard term's log-softmax is
    // (s - m_h) - ld_h (at T == 1 the student's own statistics)
    const float m_s = st[0], ld_s = log1pf(st[1]);
    const float m_t = st[2], ld_t = log1pf(st[3]);
    const float m_h = p.use_u ? st[4] : m_s, ld_h = p.use_u ? log1pf(st[5]) : ld_s;
    const float c_u = ld_t - ld_s;  // u = (z_t - z_s) - c_u: one rounding of a per-row constant

    auto load_src = [&](int i, PackPair& pp) {
      if (resident) {
        pp.s = sm_s[i];
        pp.t = sm_t[i];
      } else {
        const int k = i * VEC, n = min(VEC, L - k);
        pp.s = load_pack<VEC>(s_row + k, n, in_al);
        pp.t = load_pack<VEC>(t_row + k, n, in_al);
      }
    };
    auto elem = [&](float s, float t) {
      Elem e;
      const float zs = (s - m_s) * inv_t, zt = (teacher_raw(t) - m_t) * inv_t;
      e.log_q = zs - ld_s;
      e.q = __expf(e.log_q);
      e.log_p = zt - ld_t;
      e.p = __expf(e.log_p);
      e.u = (zt - zs) - c_u;  // not log_p - log_q: that carries eps |log p| per entry
      return e;
    };
    auto log_mix = [&](const Elem& e) {  // log(beta p + (1 - beta) q)
      return logaddexp(e.log_p + p.log_beta, e.log_q + p.log1m_beta);
    };
    // Per-entry terms of D, each >= 0 except soft_ce's (a zero weight gives the other side's
    // mass, or 0 for soft_ce: never 0 * -inf = NaN). The sums are the accurate D that the loss and
    // the gradient's (r - D) coefficients use.
    float dsum[2] = {0.f, 0.f};  // D (kl, soft_ce, reverse_kl) or (KL(p||m), KL(q||m)) for jsd
    auto add_terms = [&](const Elem& e) {
      if constexpr (DIV == kKL) {
        dsum[0] += w_phi(e.p, e.u, expm1f(-e.u), e.q);
      } else if constexpr (DIV == kSoftCE) {
        dsum[0] -= e.p == 0.f ? 0.f : e.p * e.log_q;
      } else if constexpr (DIV == kReverseKL) {
        dsum[0] += w_phi(e.q, -e.u, expm1f(e.u), e.p);
      } else {
        float tp, tq;
        jsd_terms(e.p, e.q, e.u, p.beta, tp, tq);
        dsum[0] += tp;
        dsum[1] += tq;
      }
    };

    // ---- pass 2: the divergence, when the gradient needs it ----
    if (need_d_first) {
      pack_loop<2, PackPair>(npacks, load_src, [&](int i, const PackPair& pp) {
        const int n = min(VEC, L - i * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
          if (j < n) add_terms(elem(to_float(pp.s.v[j]), to_float(pp.t.v[j])));
      });
      block_allreduce(dsum, red_div, SumOp<2>());
      if (C > 1) cluster_allreduce(dsum, red_div, C, SumOp<2>());
    }
    const float D0 = dsum[0], D1 = dsum[1];

    // ---- pass 3: gradients ----
    pack_loop<2, PackPair>(npacks, load_src, [&](int i, const PackPair& pp) {
      const int k = i * VEC, n = min(VEC, L - k);
      float gs[VEC], gt[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        gs[j] = 0.f;
        gt[j] = 0.f;
        if (j >= n) continue;
        const float s = to_float(pp.s.v[j]), t = to_float(pp.t.v[j]);
        const Elem e = elem(s, t);
        float ds, dt;  // dD/ds', dD/dt'
        if constexpr (DIV == kKL) {
          ds = e.q - e.p;
          dt = e.p == 0.f ? 0.f : e.p * (e.u - D0);
        } else if constexpr (DIV == kSoftCE) {
          ds = e.q - e.p;
          dt = e.p == 0.f ? 0.f : -e.p * (e.log_q + D0);
        } else if constexpr (DIV == kReverseKL) {
          ds = e.q == 0.f ? 0.f : e.q * (-e.u - D0);
          dt = e.p - e.q;
        } else {
          const float lm = log_mix(e);
          ds = (1.f - p.beta) * (e.q == 0.f ? 0.f : e.q * (e.log_q - lm - D1));
          dt = p.beta * (e.p == 0.f ? 0.f : e.p * (e.log_p - lm - D0));
        }
        if (!need_d_first) add_terms(e);
        ds *= p.g_scale;
        if (p.hard) {
          ds += p.hard_weight * (p.use_u ? __expf((s - m_h) - ld_h) : e.q);
          if (b + k + j == y) ds -= p.hard_weight;
        }
        gs[j] = bad ? NAN : ds;
        dt *= p.g_scale;
        if constexpr (PROBS) dt = t == 0.f ? 0.f : dt / t;  // chain rule through log(P)
        gt[j] = dt;
      }
      store_pack<VEC>(gs_row + k, gs, n, out_al_s);
      if (gt_row) store_pack<VEC>(gt_row + k, gt, n, out_al_t);
    });
    if (!need_d_first) {
      block_allreduce(dsum, red_div, SumOp<2>());
      if (C > 1) cluster_allreduce(dsum, red_div, C, SumOp<2>());
    }

    if (rank == 0 && threadIdx.x == 0) {
      const float D = DIV == kJSD ? p.beta * dsum[0] + (1.f - p.beta) * dsum[1] : dsum[0];
      float l = p.soft_scale * D;
      if (p.hard && !bad) l += p.hard_weight * ((m_h - to_float(s_row[y - b])) + ld_h);
      p.loss[row] = bad ? NAN : l;
    }
    if (C > 1) cluster_sync();  // peers are done reading this CTA's reduction slots
  }
}

// ---- host side -----------------------------------------------------------------------------

template <typename TS, typename TT, int DIV, bool PROBS>
cudaError_t kd_run_typed(const KdArgs& a, cudaStream_t stream, KdPlan* plan_out, bool launch) {
  auto* kernel = &kd_fwd_bwd_kernel<TS, TT, DIV, PROBS>;
  KdPlan plan;
  cudaError_t err = kd_choose_plan(reinterpret_cast<const void*>(kernel), a, sizeof(TS), sizeof(TT), &plan);
  if (err != cudaSuccess) return err;
  if (plan_out) *plan_out = plan;
  if (!launch || a.N == 0) return cudaSuccess;

  KdParams p;
  p.s = a.student;
  p.t = a.teacher;
  p.s_stride = a.s_stride;
  p.t_stride = a.t_stride;
  p.labels = a.labels;
  p.label_stride = a.label_stride;
  p.loss = a.loss;
  p.gs = a.grad_s;
  p.gt = a.grad_t;
  p.N = a.N;
  p.V = static_cast<int>(a.V);
  p.slice = static_cast<int>(plan.slice);
  p.cluster = plan.cluster;
  p.resident = plan.resident;
  p.inv_t = static_cast<float>(1.0 / a.temperature);
  p.beta = static_cast<float>(a.beta);
  p.log_beta = DIV == kJSD ? static_cast<float>(log(a.beta)) : 0.f;
  p.log1m_beta = DIV == kJSD ? static_cast<float>(log1p(-a.beta)) : 0.f;
  p.soft_scale = static_cast<float>(a.soft_scale);
  p.g_scale = static_cast<float>(a.soft_scale / a.temperature);
  p.hard_weight = static_cast<float>(a.hard_weight);
  p.ignore_index = a.ignore_index;
  p.hard = a.labels != nullptr && a.hard_weight != 0.0;
  p.use_u = p.hard && a.temperature != 1.0;

  const dim3 grid(static_cast<unsigned>(plan.rows_per_launch * plan.cluster));
  const dim3 block(static_cast<unsigned>(plan.threads));
  if (plan.cluster > 1) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = plan.smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(plan.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    const cudaError_t cerr = cudaLaunchKernelEx(&cfg, kernel, p);
    if (cerr == cudaSuccess) return cudaSuccess;
    // A refused cluster launch (a configuration error, not sticky) falls back to one CTA per
    // row: the same numbers by the other path, said once on stderr.
    (void)cudaGetLastError();
    static bool warned = false;
    if (!warned) {
      warned = true;
      fprintf(stderr, "kdkernels: cluster launch refused (%s); using one CTA per row\n", cudaGetErrorString(cerr));
    }
    KdArgs single = a;
    single.max_cluster = 1;
    return kd_run_typed<TS, TT, DIV, PROBS>(single, stream, plan_out, launch);
  }
  kernel<<<grid, block, plan.smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T> struct TypeTag { using type = T; };

template <typename F>
cudaError_t dispatch_dtype(int code, F&& f) {
  switch (code) {
    case kFloat32: return f(TypeTag<float>{});
    case kFloat16: return f(TypeTag<__half>{});
    case kBFloat16: return f(TypeTag<__nv_bfloat16>{});
    default: return cudaErrorInvalidValue;
  }
}

// Instantiates the kernel for every (student dtype, teacher dtype, teacher kind) of one divergence.
template <int DIV>
cudaError_t kd_run_divergence(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch) {
  return dispatch_dtype(a.s_dtype, [&](auto s_tag) {
    return dispatch_dtype(a.t_dtype, [&](auto t_tag) {
      using TS = typename decltype(s_tag)::type;
      using TT = typename decltype(t_tag)::type;
      return a.teacher_is_probs ? kd_run_typed<TS, TT, DIV, true>(a, stream, plan, launch)
                                : kd_run_typed<TS, TT, DIV, false>(a, stream, plan, launch);
    });
  });
}

}  // namespace kdk
