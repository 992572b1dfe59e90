// Host side of the fused KD kernel: how a launch runs (cluster size, residency, threads) and
// the dispatch to the per-divergence translation units. Host code only; no device syncs.
#include <algorithm>
#include <mutex>
#include <set>
#include <utility>

#include "kd_launch.h"

namespace kdk {
namespace {

struct DeviceInfo {
  int major = 0;
  int smem_optin = 0;   // max shared memory one block may opt into, bytes
  int smem_per_sm = 0;  // shared memory per multiprocessor, bytes
};

cudaError_t device_info(int dev, DeviceInfo* out) {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool have[64] = {};
  std::lock_guard<std::mutex> lock(mu);
  if (dev >= 0 && dev < 64 && have[dev]) {
    *out = cache[dev];
    return cudaSuccess;
  }
  DeviceInfo d;
  cudaError_t err = cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < 64) {
    cache[dev] = d;
    have[dev] = true;
  }
  *out = d;
  return cudaSuccess;
}

// Raises a kernel's dynamic shared memory limit once per (kernel, device).
cudaError_t allow_dynamic_smem(const void* kernel, int dev, int bytes) {
  static std::mutex mu;
  static std::set<std::pair<const void*, int>> done;
  std::lock_guard<std::mutex> lock(mu);
  if (done.count({kernel, dev})) return cudaSuccess;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done.insert({kernel, dev});
  return err;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

int64_t slice_for(int64_t V, int C) { return round_up(ceil_div(V, C), 8); }
int64_t smem_for(int64_t slice, int es_s, int es_t) {
  return round_up(slice * es_s, 16) + round_up(slice * es_t, 16);
}
int threads_for(int64_t slice) { return slice >= 16384 ? 512 : slice >= 4096 ? 256 : 128; }

}  // namespace

cudaError_t kd_choose_plan(const void* kernel, const KdArgs& a, int es_s, int es_t, KdPlan* plan) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  DeviceInfo di;
  if ((err = device_info(dev, &di)) != cudaSuccess) return err;
  cudaFuncAttributes fa;
  if ((err = cudaFuncGetAttributes(&fa, kernel)) != cudaSuccess) return err;

  const int64_t V = std::max<int64_t>(a.V, 1);
  const int64_t max_dyn = static_cast<int64_t>(di.smem_optin) - static_cast<int64_t>(fa.sharedSizeBytes);
  // Prefer slices small enough for two CTAs per SM, so that one CTA's loads overlap another's
  // arithmetic; failing that, the smallest cluster whose slices fit at all.
  const int64_t target = di.smem_per_sm / 2 - static_cast<int64_t>(fa.sharedSizeBytes) - 1024;
  // A cluster needs sm_90 hardware *and* sm_90 code in the binary (PTX for an older target
  // JIT-compiled on Hopper would trap in the cluster path).
  const bool clusters = a.max_cluster > 1 && di.major >= 9 && fa.binaryVersion >= 90;
  const int cmax = clusters ? std::min(a.max_cluster, 8) : 1;

  KdPlan p;
  int chosen = 0;
  if (a.max_cluster >= 1) {
    for (int round = 0; round < 2 && !chosen; ++round) {
      const int64_t limit = round == 0 ? target : max_dyn;
      for (int C = 1; C <= cmax; C *= 2)
        if (smem_for(slice_for(V, C), es_s, es_t) <= limit) {
          chosen = C;
          break;
        }
    }
  }
  if (chosen) {
    p.cluster = chosen;
    p.resident = 1;
    p.slice = slice_for(V, chosen);
    p.smem = static_cast<size_t>(smem_for(p.slice, es_s, es_t));
    p.threads = threads_for(p.slice);
    bool fits = false;
    // Raised for every on-chip plan: static + dynamic may pass the 48 KB default even when
    // the dynamic part alone does not.
    if (allow_dynamic_smem(kernel, dev, static_cast<int>(max_dyn)) == cudaSuccess) {
      if (chosen > 1) {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(static_cast<unsigned>(chosen));
        cfg.blockDim = dim3(static_cast<unsigned>(p.threads));
        cfg.dynamicSmemBytes = p.smem;
        cudaLaunchAttribute attr[1];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = static_cast<unsigned>(chosen);
        attr[0].val.clusterDim.y = 1;
        attr[0].val.clusterDim.z = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
        int n = 0;
        fits = cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess && n > 0;
      } else {
        int n = 0;
        fits = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, p.threads, p.smem) == cudaSuccess && n > 0;
      }
    }
    if (!fits) {
      (void)cudaGetLastError();  // a refused query must not surface as this launch's error
      chosen = 0;
    }
  }
  if (!chosen) {  // stream the row from global memory in every pass
    p = KdPlan();
    p.cluster = 1;
    p.resident = 0;
    p.slice = slice_for(V, 1);
    p.smem = 0;
    p.threads = threads_for(p.slice);
  }
  // Rows are strided over the grid's clusters; cap the grid well inside gridDim.x's range.
  p.rows_per_launch = std::max<int64_t>(1, std::min<int64_t>(a.N, (int64_t{1} << 30) / p.cluster));
  *plan = p;
  return cudaSuccess;
}

namespace {
cudaError_t kd_dispatch(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch) {
  switch (a.divergence) {
    case kKL: return kd_run_kl(a, stream, plan, launch);
    case kSoftCE: return kd_run_soft_ce(a, stream, plan, launch);
    case kReverseKL: return kd_run_reverse_kl(a, stream, plan, launch);
    case kJSD: return kd_run_jsd(a, stream, plan, launch);
    default: return cudaErrorInvalidValue;
  }
}
}  // namespace

cudaError_t kd_plan(const KdArgs& a, KdPlan* plan) { return kd_dispatch(a, nullptr, plan, false); }

cudaError_t kd_launch(const KdArgs& a, cudaStream_t stream, KdPlan* plan) {
  return kd_dispatch(a, stream, plan, true);
}

}  // namespace kdk
