// Host interface of the CUDA kernels: raw pointers, sizes, strides and a stream.
// No torch and no CUDA device code here, so that the torch binding (bindings.cpp) and the
// nvcc-only translation units (*.cu) share it.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace kdk {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum Divergence : int { kKL = 0, kSoftCE = 1, kReverseKL = 2, kJSD = 3 };  // kdkernels.backends.DIVERGENCES

struct KdArgs {
  const void* student = nullptr;  // [N, V] logits, row stride s_stride elements, last dim contiguous
  int64_t s_stride = 0;
  int s_dtype = kFloat32;
  const void* teacher = nullptr;  // [N, V] logits or probabilities, row stride t_stride
  int64_t t_stride = 0;
  int t_dtype = kFloat32;
  bool teacher_is_probs = false;
  const int64_t* labels = nullptr;  // [N] int64 with stride label_stride, or null
  int64_t label_stride = 1;
  float* loss = nullptr;  // [N] float32 out
  void* grad_s = nullptr; // [N, V] student dtype out, contiguous
  void* grad_t = nullptr; // [N, V] teacher dtype out, contiguous, or null (no teacher gradient)
  int64_t N = 0, V = 0;
  double temperature = 1.0;
  int divergence = kKL;
  double beta = 0.5;        // jsd only, 0 < beta < 1
  double soft_scale = 1.0;  // soft_weight * (T**2 or 1)
  double hard_weight = 0.0;
  int64_t ignore_index = -100;
  // Largest thread-block cluster a row may be spread over with its data kept in shared memory:
  // 0 = never keep the row on chip (two/three-pass streaming from global memory),
  // 1 = on chip only if it fits one block, 2..8 = clusters up to that size (sm_90 builds).
  int max_cluster = 8;
};

// How one launch runs (chosen by kd_plan from the device, V, the dtypes and max_cluster).
struct KdPlan {
  int cluster = 1;      // CTAs per row
  int threads = 0;      // per CTA
  int resident = 0;     // 1: each CTA keeps its slice of the row pair in shared memory
  int64_t slice = 0;    // elements of a row per CTA (a multiple of 8)
  size_t smem = 0;      // dynamic shared memory per CTA, bytes
  int64_t rows_per_launch = 0;  // clusters in the grid (rows are strided over them)
};

// Offline top-k teacher (kdkernels.ops.kd_topk_fused): p = softmax(logprobs / T) over the k ids
// of a row, 0 elsewhere. The k entries of a row live in shared memory: 1 <= k <= kTopkMaxK
// (kdkernels.backends.cuda_backend.TOPK_MAX_K; above it the torch backend runs instead).
constexpr int kTopkMaxK = 1024;

struct KdTopkArgs {
  const void* student = nullptr;   // [N, V] logits, row stride s_stride elements, last dim contiguous
  int64_t s_stride = 0;
  int s_dtype = kFloat32;
  const int64_t* ids = nullptr;    // [N, k] contiguous: distinct per row, in [0, V)
  const void* logprobs = nullptr;  // [N, k] contiguous teacher log-probabilities at the ids (T = 1)
  int lp_dtype = kFloat32;
  const int64_t* labels = nullptr; // [N] int64 with stride label_stride, or null
  int64_t label_stride = 1;
  float* loss = nullptr;   // [N] float32 out
  void* grad_s = nullptr;  // [N, V] student dtype out, contiguous
  void* grad_t = nullptr;  // [N, k] logprobs dtype out, contiguous, or null (no teacher gradient)
  int64_t N = 0, V = 0, k = 0;
  double temperature = 1.0;
  int divergence = kKL;     // kKL, kSoftCE or kJSD (0 < beta < 1); kReverseKL is invalid
  double beta = 0.5;
  double soft_scale = 1.0;  // soft_weight * (T**2 or 1)
  double hard_weight = 0.0;
  int64_t ignore_index = -100;
};

// Plans without launching (no device synchronisation, no stream work).
cudaError_t kd_plan(const KdArgs& a, KdPlan* plan);
// Fused forward + backward: loss, grad_s and (if non-null) grad_t. plan may be null.
cudaError_t kd_launch(const KdArgs& a, cudaStream_t stream, KdPlan* plan);

// Fused forward + backward against a top-k teacher: loss, grad_s and (if non-null) grad_t.
// One CTA per row; cudaErrorInvalidValue for k outside [1, min(V, kTopkMaxK)], V >= 2**31 - 64
// or reverse_kl.
cudaError_t kd_topk_launch(const KdTopkArgs& a, cudaStream_t stream);

// y = softmax(x / T) or log_softmax(x / T) along rows; y contiguous [N, V] of x's dtype.
cudaError_t softmax_forward_launch(const void* x, int64_t x_stride, void* y, int dtype, int64_t N,
                                   int64_t V, double temperature, bool log, cudaStream_t stream);
// grad_x of the above from y (row stride y_stride) and grad_y (row stride gy_stride).
cudaError_t softmax_backward_launch(const void* y, int64_t y_stride, const void* grad_y,
                                    int64_t gy_stride, void* grad_x, int dtype, int64_t N, int64_t V,
                                    double temperature, bool log, cudaStream_t stream);

// ---- internal: per-divergence entry points (one translation unit each, built in parallel) ----
cudaError_t kd_run_kl(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch);
cudaError_t kd_run_soft_ce(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch);
cudaError_t kd_run_reverse_kl(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch);
cudaError_t kd_run_jsd(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch);

// Chooses the plan for a kernel (host only; caches device properties and kernel attributes).
cudaError_t kd_choose_plan(const void* kernel, const KdArgs& a, int es_s, int es_t, KdPlan* plan);

}  // namespace kdk
