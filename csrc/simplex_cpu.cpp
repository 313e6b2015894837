// C++ kernel of simplex_update: one exponentiated-gradient (mirror descent) step on the
// probability simplex, followed by the EMA and the floor. The maths, and why it is exact
// for alignments of any finite magnitude, is written out in megatron_dga/ops/reference.py;
// this file and the reference must stay in step (tests/ops/test_ops.py compares them).
#include <cmath>
#include <limits>

#include "ops.h"

namespace megatron_dga {

at::Tensor simplex_update_cpu(const at::Tensor& alpha, const at::Tensor& alignment, double eta,
                              double beta, double floor) {
  TORCH_CHECK(alpha.device().is_cpu() && alignment.device().is_cpu(),
              "simplex_update_cpu: tensors must be on the CPU");
  TORCH_CHECK(alpha.scalar_type() == at::kDouble && alignment.scalar_type() == at::kDouble,
              "simplex_update_cpu: tensors must be float64");
  TORCH_CHECK(alpha.dim() == 1 && alignment.dim() == 1 && alpha.numel() == alignment.numel() &&
                  alpha.numel() >= 1,
              "simplex_update_cpu: alpha and alignment must be 1-D of the same length >= 1");
  TORCH_CHECK(std::isfinite(eta) && beta > 0.0 && beta <= 1.0 && floor >= 0.0 && floor < 1.0,
              "simplex_update_cpu: need finite eta, 0 < beta <= 1, 0 <= floor < 1");
  const at::Tensor a_c = alpha.contiguous();
  const at::Tensor s_c = alignment.contiguous();
  const double* a = a_c.data_ptr<double>();
  const double* s = s_c.data_ptr<double>();
  const int64_t k = a_c.numel();
  for (int64_t i = 0; i < k; ++i) {
    TORCH_CHECK(std::isfinite(s[i]), "simplex_update_cpu: alignment[", i, "] is not finite");
  }

  at::Tensor out = at::empty_like(a_c);
  double* o = out.data_ptr<double>();
  const double inf = std::numeric_limits<double>::infinity();

  // z_i = log(alpha_i) + eta * a_i on the support (alpha_i > 0); off it alpha_hat_i = 0,
  // so log(0) is never formed.
  double m = -inf;
  for (int64_t i = 0; i < k; ++i) {
    if (a[i] > 0.0) m = std::max(m, std::log(a[i]) + eta * s[i]);
  }
  if (std::isfinite(m)) {
    double total = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      o[i] = a[i] > 0.0 ? std::exp(std::log(a[i]) + eta * s[i] - m) : 0.0;
      total += o[i];
    }
    for (int64_t i = 0; i < k; ++i) o[i] /= total;  // total >= 1: the argmax contributes 1
  } else {
    // eta * a_i overflowed. Distinct doubles near the overflow threshold differ by more than
    // 1e292 once multiplied by eta, which dwarfs |log alpha| <= 745, so the exact limit
    // puts all the mass on the maximisers of sign(eta) * a_i, shared in proportion to alpha.
    const double sign = eta >= 0.0 ? 1.0 : -1.0;
    double best = -inf;
    for (int64_t i = 0; i < k; ++i) {
      if (a[i] > 0.0) best = std::max(best, sign * s[i]);
    }
    double mass = 0.0;
    for (int64_t i = 0; i < k; ++i) {
      o[i] = (a[i] > 0.0 && sign * s[i] == best) ? a[i] : 0.0;
      mass += o[i];
    }
    for (int64_t i = 0; i < k; ++i) o[i] /= mass;
  }
  const double floor_share = floor / static_cast<double>(k);
  for (int64_t i = 0; i < k; ++i) {
    const double ema = (1.0 - beta) * a[i] + beta * o[i];
    o[i] = (1.0 - floor) * ema + floor_share;
  }
  return out;
}

}  // namespace megatron_dga
