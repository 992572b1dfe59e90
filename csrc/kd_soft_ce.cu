// Kernel instantiations for divergence "soft_ce" (one translation unit per divergence: parallel builds).
#include "kd_fused.cuh"

namespace kdk {

cudaError_t kd_run_soft_ce(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch) {
  return kd_run_divergence<kSoftCE>(a, stream, plan, launch);
}

}  // namespace kdk
