// Fused knowledge-distillation forward + backward: one kernel template, compile-time switches
// for the dtypes, the divergence and the teacher kind. Included by kd_<divergence>.cu only.
//
// One row pair (student s, teacher t, V entries) is handled by a cluster of C CTAs (C = 1 off
// sm_90), CTA r owning the slice [r * slice, (r + 1) * slice). Passes over the slice:
//   1  stats     online max / sum of s/T, t/T (and of s for the hard term at T != 1)
//                -> log-sum-exps, combined across the cluster through distributed shared memory
//   2  divergence (reverse_kl, jsd, or any teacher gradient: the gradient needs D first)
//   3  gradient  d loss / d s (and d loss / d t), plus D for kl / soft_ce without teacher grad
// "Resident" plans copy the slice into shared memory during pass 1, so passes 2-3 read it from
// chip: HBM traffic is one read of s and t and one write of the gradient (6 B/element in bf16).
// Otherwise passes 2-3 re-read global memory (L2 if the row is still there).
// Elements of a slice go to threads in 16-byte packs, pack i to thread i % blockDim.x in every
// pass, so a thread re-reads in shared memory only what it wrote itself.
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

template <typename TS, typename TT, int DIV, bool PROBS>
__global__ void __launch_bounds__(kMaxThreads) kd_fwd_bwd_kernel(const KdParams p) {
  constexpr int VEC = 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
  using PS = Pack<TS, VEC>;
  using PT = Pack<TT, VEC>;
  struct PackPair { PS s; PT t; };
  struct Elem { float log_q, q, log_p, p; };
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

  // Tempered teacher logit: t / T, or log(P) / T with log(0) = -inf (p = 0, never NaN).
  auto teacher_logit = [&](float t) -> float {
    if constexpr (PROBS) return t == 0.f ? -INFINITY : logf(t) * inv_t;
    else return t * inv_t;
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
    float st[6] = {-INFINITY, 0.f, -INFINITY, 0.f, -INFINITY, 0.f};  // (m, d) of s', t', s
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
            xs[j] = to_float(pp.s.v[j]) * inv_t;
            xt[j] = teacher_logit(to_float(pp.t.v[j]));
          }
          maxsum_add<VEC>(st[0], st[1], xs, n);
          maxsum_add<VEC>(st[2], st[3], xt, n);
          if (p.use_u) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) xs[j] = to_float(pp.s.v[j]);
            maxsum_add<VEC>(st[4], st[5], xs, n);
          }
        });
    block_allreduce(st, red_stats, MaxSumOp<6>());
    if (C > 1) cluster_allreduce(st, red_stats, C, MaxSumOp<6>());
    const float lse_s = lse_of(st[0], st[1]);
    const float lse_t = lse_of(st[2], st[3]);
    const float lse_h = p.use_u ? lse_of(st[4], st[5]) : lse_s;  // at T == 1, s' == s

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
      e.log_q = s * inv_t - lse_s;
      e.q = __expf(e.log_q);
      e.log_p = teacher_logit(t) - lse_t;
      e.p = __expf(e.log_p);
      return e;
    };
    auto log_mix = [&](const Elem& e) {  // log(beta p + (1 - beta) q)
      return logaddexp(e.log_p + p.log_beta, e.log_q + p.log1m_beta);
    };
    // Terms that are exactly 0 where the weighting probability is 0 (0 * -inf is 0, not NaN).
    float dsum[2] = {0.f, 0.f};  // D (kl, soft_ce, reverse_kl) or (KL(p||m), KL(q||m)) for jsd
    auto add_terms = [&](const Elem& e) {
      if constexpr (DIV == kKL) {
        dsum[0] += e.p == 0.f ? 0.f : e.p * (e.log_p - e.log_q);
      } else if constexpr (DIV == kSoftCE) {
        dsum[0] -= e.p == 0.f ? 0.f : e.p * e.log_q;
      } else if constexpr (DIV == kReverseKL) {
        dsum[0] += e.q == 0.f ? 0.f : e.q * (e.log_q - e.log_p);
      } else {
        const float lm = log_mix(e);
        dsum[0] += e.p == 0.f ? 0.f : e.p * (e.log_p - lm);
        dsum[1] += e.q == 0.f ? 0.f : e.q * (e.log_q - lm);
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
          dt = e.p == 0.f ? 0.f : e.p * (e.log_p - e.log_q - D0);
        } else if constexpr (DIV == kSoftCE) {
          ds = e.q - e.p;
          dt = e.p == 0.f ? 0.f : -e.p * (e.log_q + D0);
        } else if constexpr (DIV == kReverseKL) {
          ds = e.q == 0.f ? 0.f : e.q * (e.log_q - e.log_p - D0);
          dt = e.p - e.q;
        } else {
          const float lm = log_mix(e);
          ds = (1.f - p.beta) * (e.q == 0.f ? 0.f : e.q * (e.log_q - lm - D1));
          dt = p.beta * (e.p == 0.f ? 0.f : e.p * (e.log_p - lm - D0));
        }
        if (!need_d_first) add_terms(e);
        ds *= p.g_scale;
        if (p.hard) {
          ds += p.hard_weight * (p.use_u ? __expf(s - lse_h) : e.q);
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
      if (p.hard && !bad) l += p.hard_weight * (lse_h - to_float(s_row[y - b]));
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
