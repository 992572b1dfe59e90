// torch binding of the CUDA kernels: ops in the torch.library namespace kdkernels_cuda
// (fake functions are registered from Python, kdkernels/backends/cuda_backend.py; autograd
// lives one level up, at kdkernels::kd_fused / kdkernels::tempered_softmax).
// Only this file includes torch headers; it is compiled only against a CUDA build of torch.
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "kd_launch.h"

namespace {

int dtype_code(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return kdk::kFloat32;
    case at::kHalf: return kdk::kFloat16;
    case at::kBFloat16: return kdk::kBFloat16;
    default: TORCH_CHECK(false, "kdkernels_cuda: ", name, " must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
  return -1;
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), "kdkernels_cuda: ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 2, "kdkernels_cuda: ", name, " must be 2-D [N, V], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, "kdkernels_cuda: ", name, " needs a contiguous last dim");
  TORCH_CHECK(x.size(1) < (int64_t{1} << 31) - 64, "kdkernels_cuda: ", name, " has V >= 2**31");
}

kdk::KdArgs make_args(const at::Tensor& student, const at::Tensor& teacher, bool teacher_is_probs,
                      int64_t divergence, int64_t max_cluster) {
  check_rows(student, "student");
  check_rows(teacher, "teacher");
  TORCH_CHECK(teacher.sizes() == student.sizes(), "kdkernels_cuda: teacher shape ", teacher.sizes(),
              " != student shape ", student.sizes());
  TORCH_CHECK(teacher.device() == student.device(), "kdkernels_cuda: teacher and student on different devices");
  TORCH_CHECK(divergence >= 0 && divergence <= 3, "kdkernels_cuda: divergence code must be 0..3, got ", divergence);
  kdk::KdArgs a;
  a.student = student.data_ptr();
  a.s_stride = student.size(0) > 1 ? student.stride(0) : student.size(1);
  a.s_dtype = dtype_code(student, "student");
  a.teacher = teacher.data_ptr();
  a.t_stride = teacher.size(0) > 1 ? teacher.stride(0) : teacher.size(1);
  a.t_dtype = dtype_code(teacher, "teacher");
  a.teacher_is_probs = teacher_is_probs;
  a.N = student.size(0);
  a.V = student.size(1);
  a.divergence = static_cast<int>(divergence);
  a.max_cluster = static_cast<int>(max_cluster);
  return a;
}

// Checks the optional labels ([N] int64, any stride, on the student's device) and points at them.
void set_labels(const std::optional<at::Tensor>& labels, const at::Tensor& student, const int64_t** ptr,
                int64_t* stride) {
  if (!labels.has_value()) return;
  const at::Tensor& y = *labels;
  const int64_t N = student.size(0);
  TORCH_CHECK(y.scalar_type() == at::kLong, "kdkernels_cuda: labels must be int64, got ", y.scalar_type());
  TORCH_CHECK(y.dim() == 1 && y.size(0) == N, "kdkernels_cuda: labels must have shape [", N, "]");
  TORCH_CHECK(y.device() == student.device(), "kdkernels_cuda: labels on ", y.device(), ", student on ",
              student.device());
  *ptr = y.data_ptr<int64_t>();
  *stride = y.stride(0);
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "kdkernels_cuda: ", what, " failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fused(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
    bool teacher_is_probs, double temperature, int64_t divergence, double beta, double soft_scale,
    double hard_weight, int64_t ignore_index, bool teacher_grad, int64_t max_cluster) {
  kdk::KdArgs a = make_args(student, teacher, teacher_is_probs, divergence, max_cluster);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t N = a.N, V = a.V;
  at::Tensor loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad_s = at::empty({N, V}, student.options());
  at::Tensor grad_t = teacher_grad ? at::empty({N, V}, teacher.options()) : at::empty({0}, teacher.options());
  set_labels(labels, student, &a.labels, &a.label_stride);
  a.loss = loss.data_ptr<float>();
  a.grad_s = grad_s.data_ptr();
  a.grad_t = teacher_grad ? grad_t.data_ptr() : nullptr;
  a.temperature = temperature;
  a.beta = beta;
  a.soft_scale = soft_scale;
  a.hard_weight = hard_weight;
  a.ignore_index = ignore_index;
  if (N > 0) check_cuda(kdk::kd_launch(a, c10::cuda::getCurrentCUDAStream(), nullptr), "kd_fused launch");
  return {loss, grad_s, grad_t};
}

// Offline top-k teacher: ids [N, k] int64 and logprobs [N, k] (any float dtype of the three),
// both contiguous (cuda_backend makes them so), 1 <= k <= min(V, kTopkMaxK).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_topk(
    const at::Tensor& student, const at::Tensor& ids, const at::Tensor& logprobs,
    const std::optional<at::Tensor>& labels, double temperature, int64_t divergence, double beta,
    double soft_scale, double hard_weight, int64_t ignore_index, bool teacher_grad) {
  check_rows(student, "student");
  const int64_t N = student.size(0), V = student.size(1);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "kdkernels_cuda: ids must be int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 2 && ids.size(0) == N, "kdkernels_cuda: ids must have shape [", N, ", k], got ",
              ids.sizes());
  TORCH_CHECK(logprobs.sizes() == ids.sizes(), "kdkernels_cuda: logprobs shape ", logprobs.sizes(),
              " != ids shape ", ids.sizes());
  const int64_t k = ids.size(1);
  TORCH_CHECK(k >= 1 && k <= V && k <= kdk::kTopkMaxK, "kdkernels_cuda: top-k needs 1 <= k <= min(V, ",
              kdk::kTopkMaxK, "), got k = ", k, ", V = ", V);
  for (const at::Tensor* x : {&ids, &logprobs}) {
    const char* name = x == &ids ? "ids" : "logprobs";
    TORCH_CHECK(x->device() == student.device(), "kdkernels_cuda: ", name, " on ", x->device(), ", student on ",
                student.device());
    TORCH_CHECK(x->is_contiguous(), "kdkernels_cuda: ", name, " must be contiguous");
  }
  TORCH_CHECK(divergence == kdk::kKL || divergence == kdk::kSoftCE || divergence == kdk::kJSD,
              "kdkernels_cuda: top-k divergence code must be kl (0), soft_ce (1) or jsd (3), got ", divergence);
  TORCH_CHECK(divergence != kdk::kJSD || (beta > 0.0 && beta < 1.0), "kdkernels_cuda: jsd needs 0 < beta < 1, got ",
              beta);
  kdk::KdTopkArgs a;
  a.student = student.data_ptr();
  a.s_stride = N > 1 ? student.stride(0) : V;
  a.s_dtype = dtype_code(student, "student");
  a.ids = ids.data_ptr<int64_t>();
  a.logprobs = logprobs.data_ptr();
  a.lp_dtype = dtype_code(logprobs, "logprobs");
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor loss = at::empty({N}, student.options().dtype(at::kFloat));
  at::Tensor grad_s = at::empty({N, V}, student.options());
  at::Tensor grad_t = teacher_grad ? at::empty(ids.sizes(), logprobs.options()) : at::empty({0}, logprobs.options());
  set_labels(labels, student, &a.labels, &a.label_stride);
  a.loss = loss.data_ptr<float>();
  a.grad_s = grad_s.data_ptr();
  a.grad_t = teacher_grad ? grad_t.data_ptr() : nullptr;
  a.N = N;
  a.V = V;
  a.k = k;
  a.temperature = temperature;
  a.divergence = static_cast<int>(divergence);
  a.beta = beta;
  a.soft_scale = soft_scale;
  a.hard_weight = hard_weight;
  a.ignore_index = ignore_index;
  if (N > 0) check_cuda(kdk::kd_topk_launch(a, c10::cuda::getCurrentCUDAStream()), "kd_topk launch");
  return {loss, grad_s, grad_t};
}

// The launch plan kd_fused would use for these inputs: [cluster, threads, resident, slice,
// smem bytes, rows per launch]. Host-only, for tests, benchmarks and `kdkernels info`.
std::vector<int64_t> kd_plan(const at::Tensor& student, const at::Tensor& teacher, bool teacher_is_probs,
                             int64_t divergence, int64_t max_cluster) {
  kdk::KdArgs a = make_args(student, teacher, teacher_is_probs, divergence, max_cluster);
  const c10::cuda::CUDAGuard guard(student.device());
  kdk::KdPlan p;
  check_cuda(kdk::kd_plan(a, &p), "kd_plan");
  return {p.cluster, p.threads, p.resident, p.slice, static_cast<int64_t>(p.smem), p.rows_per_launch};
}

at::Tensor softmax_forward(const at::Tensor& x, double temperature, bool log) {
  check_rows(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t stride = x.size(0) > 1 ? x.stride(0) : x.size(1);
  check_cuda(kdk::softmax_forward_launch(x.data_ptr(), stride, y.data_ptr(), dtype_code(x, "x"), x.size(0),
                                         x.size(1), temperature, log, c10::cuda::getCurrentCUDAStream()),
             "softmax_forward launch");
  return y;
}

at::Tensor softmax_backward(const at::Tensor& y, const at::Tensor& grad_y, double temperature, bool log) {
  check_rows(y, "y");
  check_rows(grad_y, "grad_y");
  TORCH_CHECK(y.sizes() == grad_y.sizes() && y.scalar_type() == grad_y.scalar_type(),
              "kdkernels_cuda: y and grad_y must have the same shape and dtype");
  const c10::cuda::CUDAGuard guard(y.device());
  at::Tensor gx = at::empty(y.sizes(), y.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t ys = y.size(0) > 1 ? y.stride(0) : y.size(1);
  const int64_t gs = grad_y.size(0) > 1 ? grad_y.stride(0) : grad_y.size(1);
  check_cuda(kdk::softmax_backward_launch(y.data_ptr(), ys, grad_y.data_ptr(), gs, gx.data_ptr(), dtype_code(y, "y"),
                                          y.size(0), y.size(1), temperature, log, c10::cuda::getCurrentCUDAStream()),
             "softmax_backward launch");
  return gx;
}

}  // namespace

TORCH_LIBRARY(kdkernels_cuda, m) {
  // The fake (meta) functions live in Python; torch imports this module when it needs them.
  m.set_python_module("kdkernels.backends.cuda_backend");
  m.def("kd_fused(Tensor student, Tensor teacher, Tensor? labels, bool teacher_is_probs, float temperature, "
        "int divergence, float beta, float soft_scale, float hard_weight, int ignore_index, bool teacher_grad, "
        "int max_cluster) -> (Tensor, Tensor, Tensor)");
  m.def("kd_topk(Tensor student, Tensor ids, Tensor logprobs, Tensor? labels, float temperature, int divergence, "
        "float beta, float soft_scale, float hard_weight, int ignore_index, bool teacher_grad) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("kd_plan(Tensor student, Tensor teacher, bool teacher_is_probs, int divergence, int max_cluster) -> int[]");
  m.def("softmax_forward(Tensor x, float temperature, bool log) -> Tensor");
  m.def("softmax_backward(Tensor y, Tensor grad_y, float temperature, bool log) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdkernels_cuda, CUDA, m) {
  m.impl("kd_fused", &kd_fused);
  m.impl("kd_topk", &kd_topk);
  m.impl("kd_plan", &kd_plan);
  m.impl("softmax_forward", &softmax_forward);
  m.impl("softmax_backward", &softmax_backward);
}
