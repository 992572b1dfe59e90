// Kernel instantiations for divergence "reverse_kl" (one translation unit per divergence: parallel builds).
#include "kd_fused.cuh"

namespace kdk {

cudaError_t kd_run_reverse_kl(const KdArgs& a, cudaStream_t stream, KdPlan* plan, bool launch) {
  return kd_run_divergence<kReverseKL>(a, stream, plan, launch);
}

}  // namespace kdk
