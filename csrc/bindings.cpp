// pybind11 module megatron_dga._C: the fused alignment ops. Call them through
// megatron_dga.ops, which validates arguments and raises megatron-dga's errors.
#include <torch/extension.h>

#include "ops.h"
#include "sampler.h"

namespace {

void grad_dot_into(at::Tensor out, int64_t index, const std::vector<at::Tensor>& grads,
                   const std::vector<at::Tensor>& targets, const std::vector<at::Tensor>& exp_avg_sq,
                   double bias_correction2, double eps, bool fp64) {
  if (out.is_cuda()) {
#ifdef WITH_CUDA
    megatron_dga::grad_dot_cuda(grads, targets, exp_avg_sq, bias_correction2, eps, fp64, out, index);
#else
    TORCH_CHECK(false, "megatron_dga._C was built without CUDA kernels");
#endif
  } else {
    megatron_dga::grad_dot_cpu(grads, targets, exp_avg_sq, bias_correction2, eps, fp64, out, index);
  }
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron-dga fused alignment ops (use megatron_dga.ops, which validates inputs)";
  m.def("grad_dot_into", &grad_dot_into,
        "out[index] = sum_j <grads[j], targets[j]> (Adam-preconditioned when exp_avg_sq is "
        "non-empty); contiguous tensors on out's device, float64 out",
        py::arg("out"), py::arg("index"), py::arg("grads"), py::arg("targets"),
        py::arg("exp_avg_sq"), py::arg("bias_correction2"), py::arg("eps"), py::arg("fp64"),
        py::call_guard<py::gil_scoped_release>());
  m.def("simplex_update", &megatron_dga::simplex_update_cpu,
        "alpha_new from float64 CPU alpha and alignment (see megatron_dga.ops.simplex_update)",
        py::arg("alpha"), py::arg("alignment"), py::arg("eta"), py::arg("beta"), py::arg("floor"),
        py::call_guard<py::gil_scoped_release>());
  m.def("has_cuda", &has_cuda, "whether the CUDA kernels were compiled in");
  // Host index kernels of megatron_dga.data.sampler, its only implementation (checked bit for bit
  // against the numpy oracle tests/helpers/sampler_oracle.py).
  m.def("sampler_global_batches", &megatron_dga::sampler_global_batches,
        "num global batches (int64 num x B x 2); updates carry and consumed in place",
        py::arg("weights"), py::arg("carry"), py::arg("consumed"), py::arg("access"), py::arg("sizes"),
        py::arg("limited"), py::arg("train_keys"), py::arg("subset_keys"), py::arg("num"),
        py::arg("batch_size"), py::arg("step"), py::arg("phi"), py::arg("sqrt2_frac"));
  m.def("sampler_stream_samples", &megatron_dga::sampler_stream_samples,
        "sample index at stream position pos of source dom", py::arg("dom"), py::arg("pos"),
        py::arg("access"), py::arg("sizes"), py::arg("limited"), py::arg("keys"), py::arg("subset_keys"));
  m.def("sampler_permute", &megatron_dga::sampler_permute,
        "element-wise keyed bijection of [0, n) (6-round Feistel with cycle walking)", py::arg("x"),
        py::arg("n"), py::arg("keys"));
  m.def("sampler_allocate_counts", &megatron_dga::sampler_allocate_counts,
        "water-filling allocation of total samples on a deficit vector", py::arg("deficit"),
        py::arg("total"));
}
