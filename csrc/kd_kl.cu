// Kernel instantiations for divergence "kl" (one translation unit per divergence: parallel builds).
#include "kd_fused.cuh"

namespace kdk {

cudaError_t kd_run_kl(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch) {
  return kd_run_divergence<kKL>(a, stream, plan, launch);
}

}  // namespace kdk
