// Tempered (log-)softmax forward and backward along rows: one CTA per row, two passes
// (statistics, then the output), 16-byte packs, deterministic block reductions.
//   forward   y = softmax(x / T)              or  log_softmax(x / T), computed centred:
//             log y = (x - max x) / T - log d, d = sum exp((x - max x) / T) (kd_common.cuh)
//   backward  gx = y * (gy - sum(gy * y)) / T  or  (gy - exp(y) * sum(gy)) / T
#include "kd_common.cuh"
#include "kd_launch.h"

namespace kdk {
namespace {

template <typename T, bool LOG>
__global__ void __launch_bounds__(kMaxThreads)
softmax_fwd_kernel(const T* __restrict__ x, int64_t x_stride, T* __restrict__ y, int64_t N, int V, float inv_t) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ ReduceSmem<2> red;
  const int npacks = (V + VEC - 1) / VEC;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const T* xr = x + row * x_stride;
    T* yr = y + row * static_cast<int64_t>(V);
    const bool al_x = is_aligned(xr, sizeof(Pack<T, VEC>)), al_y = is_aligned(yr, sizeof(Pack<T, VEC>));
    float st[2] = {-INFINITY, -1.f};  // (m, r) of the raw x at scale 1/T
    for (int i = threadIdx.x; i < npacks; i += blockDim.x) {
      const int k = i * VEC, n = min(VEC, V - k);
      const Pack<T, VEC> px = load_pack<VEC>(xr + k, n, al_x);
      float v[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_float(px.v[j]);
      maxsum_add<VEC>(st[0], st[1], v, n, inv_t);
    }
    block_allreduce(st, red, MaxSumOp<2>{{inv_t}});
    const float m = st[0], log_d = log1pf(st[1]);
    for (int i = threadIdx.x; i < npacks; i += blockDim.x) {
      const int k = i * VEC, n = min(VEC, V - k);
      const Pack<T, VEC> px = load_pack<VEC>(xr + k, n, al_x);
      float v[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float l = (to_float(px.v[j]) - m) * inv_t - log_d;
        v[j] = LOG ? l : __expf(l);
      }
      store_pack<VEC>(yr + k, v, n, al_y);
    }
  }
}

template <typename T, bool LOG>
__global__ void __launch_bounds__(kMaxThreads)
softmax_bwd_kernel(const T* __restrict__ y, int64_t y_stride, const T* __restrict__ gy, int64_t gy_stride,
                   T* __restrict__ gx, int64_t N, int V, float inv_t) {
  constexpr int VEC = 16 / sizeof(T);
  __shared__ ReduceSmem<1> red;
  const int npacks = (V + VEC - 1) / VEC;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const T* yr = y + row * y_stride;
    const T* gr = gy + row * gy_stride;
    T* xr = gx + row * static_cast<int64_t>(V);
    const bool al_in = is_aligned(yr, sizeof(Pack<T, VEC>)) && is_aligned(gr, sizeof(Pack<T, VEC>));
    const bool al_out = is_aligned(xr, sizeof(Pack<T, VEC>));
    float sum[1] = {0.f};  // sum(gy) for log_softmax, sum(gy * y) for softmax
    for (int i = threadIdx.x; i < npacks; i += blockDim.x) {
      const int k = i * VEC, n = min(VEC, V - k);
      const Pack<T, VEC> py = load_pack<VEC>(yr + k, n, al_in), pg = load_pack<VEC>(gr + k, n, al_in);
#pragma unroll
      for (int j = 0; j < VEC; ++j)
        if (j < n) sum[0] += LOG ? to_float(pg.v[j]) : to_float(pg.v[j]) * to_float(py.v[j]);
    }
    block_allreduce(sum, red, SumOp<1>());
    for (int i = threadIdx.x; i < npacks; i += blockDim.x) {
      const int k = i * VEC, n = min(VEC, V - k);
      const Pack<T, VEC> py = load_pack<VEC>(yr + k, n, al_in), pg = load_pack<VEC>(gr + k, n, al_in);
      float v[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float yv = to_float(py.v[j]), g = to_float(pg.v[j]);
        v[j] = (LOG ? g - __expf(yv) * sum[0] : yv * (g - sum[0])) * inv_t;
      }
      store_pack<VEC>(xr + k, v, n, al_out);
    }
  }
}

int softmax_threads(int64_t V) { return V >= 16384 ? 512 : V >= 2048 ? 256 : 128; }
unsigned softmax_grid(int64_t N) { return static_cast<unsigned>(N < (int64_t{1} << 30) ? N : (int64_t{1} << 30)); }

template <typename T>
cudaError_t fwd_typed(const void* x, int64_t xs, void* y, int64_t N, int64_t V, float inv_t, bool log,
                      cudaStream_t stream) {
  auto* k = log ? &softmax_fwd_kernel<T, true> : &softmax_fwd_kernel<T, false>;
  k<<<softmax_grid(N), softmax_threads(V), 0, stream>>>(static_cast<const T*>(x), xs, static_cast<T*>(y), N,
                                                        static_cast<int>(V), inv_t);
  return cudaGetLastError();
}

template <typename T>
cudaError_t bwd_typed(const void* y, int64_t ys, const void* gy, int64_t gs, void* gx, int64_t N, int64_t V,
                      float inv_t, bool log, cudaStream_t stream) {
  auto* k = log ? &softmax_bwd_kernel<T, true> : &softmax_bwd_kernel<T, false>;
  k<<<softmax_grid(N), softmax_threads(V), 0, stream>>>(static_cast<const T*>(y), ys, static_cast<const T*>(gy),
                                                        gs, static_cast<T*>(gx), N, static_cast<int>(V), inv_t);
  return cudaGetLastError();
}

}  // namespace

cudaError_t softmax_forward_launch(const void* x, int64_t x_stride, void* y, int dtype, int64_t N, int64_t V,
                                   double temperature, bool log, cudaStream_t stream) {
  if (N == 0 || V == 0) return cudaSuccess;
  const float inv_t = static_cast<float>(1.0 / temperature);
  switch (dtype) {
    case kFloat32: return fwd_typed<float>(x, x_stride, y, N, V, inv_t, log, stream);
    case kFloat16: return fwd_typed<__half>(x, x_stride, y, N, V, inv_t, log, stream);
    case kBFloat16: return fwd_typed<__nv_bfloat16>(x, x_stride, y, N, V, inv_t, log, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t softmax_backward_launch(const void* y, int64_t y_stride, const void* grad_y, int64_t gy_stride,
                                    void* grad_x, int dtype, int64_t N, int64_t V, double temperature, bool log,
                                    cudaStream_t stream) {
  if (N == 0 || V == 0) return cudaSuccess;
  const float inv_t = static_cast<float>(1.0 / temperature);
  switch (dtype) {
    case kFloat32: return bwd_typed<float>(y, y_stride, grad_y, gy_stride, grad_x, N, V, inv_t, log, stream);
    case kFloat16: return bwd_typed<__half>(y, y_stride, grad_y, gy_stride, grad_x, N, V, inv_t, log, stream);
    case kBFloat16:
      return bwd_typed<__nv_bfloat16>(y, y_stride, grad_y, gy_stride, grad_x, N, V, inv_t, log, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kdk
