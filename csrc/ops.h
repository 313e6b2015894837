// Fused alignment ops of megatron-dga: declarations shared by the C++/OpenMP kernels
// (grad_dot_cpu.cpp, simplex_cpu.cpp), the CUDA kernels (grad_dot_cuda.cu) and the
// pybind11 bindings (bindings.cpp).
//
// The Python wrapper (megatron_dga/ops/__init__.py) validates every argument and
// raises megatron-dga's own errors; the checks here are internal invariants only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace megatron_dga {

// Element types the kernels read. Anything else is rejected by the Python wrapper.
enum class ElemType : int { kNone = 0, kFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Maps a tensor's dtype to ElemType; throws (TORCH_CHECK) for any other dtype.
ElemType elem_type_of(const at::Tensor& t);

// Writes into out[index] (float64) the sum over j of
//     sum_e grads[j][e] * targets[j][e]                               (exp_avg_sq empty)
//     sum_e grads[j][e] * targets[j][e] / (sqrt(v[e] / bc2) + eps)    (v = exp_avg_sq[j])
// Every tensor must be contiguous and on the device of `out`. When fp64 is true,
// products and sums are in float64; otherwise products and sums over fixed-size
// chunks are in float32 and the chunk partials are combined in float64.
// The result is deterministic: it does not depend on the number of threads.
void grad_dot_cpu(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& targets,
                  const std::vector<at::Tensor>& exp_avg_sq, double bias_correction2, double eps,
                  bool fp64, at::Tensor& out, int64_t index);

#ifdef WITH_CUDA
// CUDA counterpart of grad_dot_cpu: multi-tensor launches on the current stream, a
// deterministic two-pass reduction, no host synchronisation.
void grad_dot_cuda(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& targets,
                   const std::vector<at::Tensor>& exp_avg_sq, double bias_correction2, double eps,
                   bool fp64, at::Tensor& out, int64_t index);
#endif

// Mirror-descent step on the simplex for contiguous float64 CPU tensors (see
// megatron_dga/ops/reference.py for the formula and the handling of zeros and
// overflow). Returns a new tensor; alpha is not modified.
at::Tensor simplex_update_cpu(const at::Tensor& alpha, const at::Tensor& alignment, double eta,
                              double beta, double floor);

}  // namespace megatron_dga
