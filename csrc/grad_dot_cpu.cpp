// C++/OpenMP kernel of grad_dot: the (optionally Adam-preconditioned) dot product of a
// gradient split over many tensors with a saved target gradient.
//
// Work is cut into fixed chunks of kChunk elements over all tensors; OpenMP threads take
// chunks (static schedule) and write one partial per chunk; the partials are then summed
// in chunk order in float64. The result is therefore bitwise identical for any thread
// count, which keeps the mixture weights reproducible across machines.
#include <omp.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "ops.h"

namespace megatron_dga {

ElemType elem_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElemType::kFloat32;
    case at::kBFloat16: return ElemType::kBFloat16;
    case at::kHalf: return ElemType::kFloat16;
    default:
      TORCH_CHECK(false, "megatron_dga._C: unsupported dtype ", t.scalar_type(),
                  " (supported: float32, bfloat16, float16)");
  }
}

namespace {

// Work unit of the thread team: large enough that scheduling costs are negligible.
constexpr int64_t kChunk = int64_t{1} << 14;
// Elements summed in the accumulation type (kLanes lanes of kBlock / kLanes terms) before the
// block sum is added to a float64 total. With float32 accumulation this bounds the error by
// ~(kBlock / kLanes + 8) * 2^-24 * sum |terms| (~2.3e-6), however large n is.
constexpr int64_t kBlock = 256;
// Independent accumulators: break the add dependency chain so the compiler can keep them in
// SIMD registers; the summation order stays fixed (no -ffast-math), hence reproducible.
constexpr int kLanes = 8;
// Below this many elements, starting the thread team costs more than it saves.
constexpr int64_t kMinParallel = int64_t{1} << 16;

// Element readers: bf16 and fp16 widen exactly to float.
struct F32 {
  using S = float;
  static inline float get(float x) { return x; }
};
struct BF16 {
  using S = uint16_t;
  static inline float get(uint16_t x) {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
};
struct F16 {
  using S = uint16_t;
  // Branch-free IEEE half -> float (exact, denormals/Inf/NaN included), written with
  // integer and float ops only so that the loops over fp16 data vectorise; c10::Half's
  // conversion does not without -mf16c.
  static inline float get(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;  // exponent and mantissa, sign shifted out
    // Normal numbers: move exponent+mantissa into place, rebias by 2^-112 (15 -> 127).
    const float normal = from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    // Denormals: the mantissa as the low bits of 0.5f's mantissa, minus 0.5.
    const float denormal = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t is_denormal = 0u - static_cast<uint32_t>(two_w < (1u << 27));  // all ones or 0
    const uint32_t bits = (to_bits(denormal) & is_denormal) | (to_bits(normal) & ~is_denormal);
    return from_bits(sign | bits);
  }
  static inline float from_bits(uint32_t b) {
    float f;
    std::memcpy(&f, &b, sizeof(f));
    return f;
  }
  static inline uint32_t to_bits(float f) {
    uint32_t b;
    std::memcpy(&b, &f, sizeof(b));
    return b;
  }
};
// No preconditioner: the v pointer is never read.
struct NoV {
  using S = uint8_t;
  static inline float get(uint8_t) { return 0.f; }
};

template <typename Acc, typename V>
inline Acc term(float g, float t, float v, Acc inv_bc2, Acc eps) {
  Acc p = static_cast<Acc>(g) * static_cast<Acc>(t);
  if constexpr (!std::is_same<V, NoV>::value) {
    // Adam's denominator sqrt(v / bc2) + eps, applied on the fly (never materialised).
    p /= std::sqrt(static_cast<Acc>(v) * inv_bc2) + eps;
  }
  return p;
}

using ChunkFn = double (*)(const void*, const void*, const void*, int64_t, int64_t, double, double);

template <typename Acc, typename G, typename T, typename V>
double chunk_dot(const void* gp, const void* tp, const void* vp, int64_t begin, int64_t end,
                 double inv_bc2, double eps) {
  const auto* __restrict__ g = static_cast<const typename G::S*>(gp);
  const auto* __restrict__ t = static_cast<const typename T::S*>(tp);
  const auto* __restrict__ v = static_cast<const typename V::S*>(vp);
  const Acc ib = static_cast<Acc>(inv_bc2);
  const Acc ep = static_cast<Acc>(eps);
  constexpr bool kPrecond = !std::is_same<V, NoV>::value;
  double total = 0.0;
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t stop = std::min(end, block + kBlock);
    Acc acc[kLanes] = {};
    int64_t i = block;
    for (; i + kLanes <= stop; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float vv = kPrecond ? V::get(v[i + l]) : 0.f;
        acc[l] += term<Acc, V>(G::get(g[i + l]), T::get(t[i + l]), vv, ib, ep);
      }
    }
    for (int l = 0; i < stop; ++i, ++l) {
      const float vv = kPrecond ? V::get(v[i]) : 0.f;
      acc[l] += term<Acc, V>(G::get(g[i]), T::get(t[i]), vv, ib, ep);
    }
    // Pairwise combination of the lanes.
    for (int width = kLanes / 2; width > 0; width /= 2) {
      for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
    }
    total += static_cast<double>(acc[0]);
  }
  return total;
}

template <typename Acc, typename G, typename T>
ChunkFn pick_v(ElemType v) {
  switch (v) {
    case ElemType::kNone: return &chunk_dot<Acc, G, T, NoV>;
    case ElemType::kFloat32: return &chunk_dot<Acc, G, T, F32>;
    case ElemType::kBFloat16: return &chunk_dot<Acc, G, T, BF16>;
    case ElemType::kFloat16: return &chunk_dot<Acc, G, T, F16>;
  }
  return nullptr;
}

template <typename Acc, typename G>
ChunkFn pick_t(ElemType t, ElemType v) {
  switch (t) {
    case ElemType::kFloat32: return pick_v<Acc, G, F32>(v);
    case ElemType::kBFloat16: return pick_v<Acc, G, BF16>(v);
    case ElemType::kFloat16: return pick_v<Acc, G, F16>(v);
    default: return nullptr;
  }
}

template <typename Acc>
ChunkFn pick_g(ElemType g, ElemType t, ElemType v) {
  switch (g) {
    case ElemType::kFloat32: return pick_t<Acc, F32>(t, v);
    case ElemType::kBFloat16: return pick_t<Acc, BF16>(t, v);
    case ElemType::kFloat16: return pick_t<Acc, F16>(t, v);
    default: return nullptr;
  }
}

ChunkFn pick(bool fp64, ElemType g, ElemType t, ElemType v) {
  return fp64 ? pick_g<double>(g, t, v) : pick_g<float>(g, t, v);
}

struct Work {
  ChunkFn fn;
  const void* g;
  const void* t;
  const void* v;
  int64_t begin;
  int64_t end;
};

}  // namespace

void grad_dot_cpu(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& targets,
                  const std::vector<at::Tensor>& exp_avg_sq, double bias_correction2, double eps,
                  bool fp64, at::Tensor& out, int64_t index) {
  TORCH_CHECK(grads.size() == targets.size(), "grad_dot_cpu: ", grads.size(), " grads vs ",
              targets.size(), " targets");
  const bool precond = !exp_avg_sq.empty();
  TORCH_CHECK(!precond || exp_avg_sq.size() == grads.size(), "grad_dot_cpu: ", grads.size(),
              " grads vs ", exp_avg_sq.size(), " exp_avg_sq tensors");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kDouble && out.is_contiguous(),
              "grad_dot_cpu: out must be a contiguous float64 CPU tensor");
  TORCH_CHECK(index >= 0 && index < out.numel(), "grad_dot_cpu: index ", index,
              " out of range for out of size ", out.numel());
  TORCH_CHECK(bias_correction2 > 0.0, "grad_dot_cpu: bias_correction2 must be > 0");

  std::vector<Work> work;
  int64_t total = 0;
  for (size_t j = 0; j < grads.size(); ++j) {
    const at::Tensor& g = grads[j];
    const at::Tensor& t = targets[j];
    const int64_t n = g.numel();
    TORCH_CHECK(t.numel() == n, "grad_dot_cpu: tensor ", j, " numel ", n, " vs ", t.numel());
    TORCH_CHECK(g.device().is_cpu() && t.device().is_cpu(), "grad_dot_cpu: tensor ", j,
                " is not on the CPU");
    TORCH_CHECK(g.is_contiguous() && t.is_contiguous(), "grad_dot_cpu: tensor ", j,
                " is not contiguous");
    const void* vp = nullptr;
    ElemType vt = ElemType::kNone;
    if (precond) {
      const at::Tensor& v = exp_avg_sq[j];
      TORCH_CHECK(v.numel() == n && v.device().is_cpu() && v.is_contiguous(), "grad_dot_cpu: exp_avg_sq ",
                  j, " must be a contiguous CPU tensor of ", n, " elements");
      vp = v.data_ptr();
      vt = elem_type_of(v);
    }
    if (n == 0) continue;
    const ChunkFn fn = pick(fp64, elem_type_of(g), elem_type_of(t), vt);
    TORCH_CHECK(fn != nullptr, "grad_dot_cpu: no kernel for tensor ", j);
    for (int64_t b = 0; b < n; b += kChunk) {
      work.push_back(Work{fn, g.data_ptr(), t.data_ptr(), vp, b, std::min(n, b + kChunk)});
    }
    total += n;
  }

  const double inv_bc2 = 1.0 / bias_correction2;
  const int64_t nwork = static_cast<int64_t>(work.size());
  std::vector<double> partial(work.size(), 0.0);
  // Follow torch.set_num_threads(); the extension shares torch's libgomp.
  const int threads = total >= kMinParallel ? std::max(1, at::get_num_threads()) : 1;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t w = 0; w < nwork; ++w) {
    const Work& it = work[w];
    partial[w] = it.fn(it.g, it.t, it.v, it.begin, it.end, inv_bc2, eps);
  }
  double sum = 0.0;
  for (double p : partial) sum += p;
  out.data_ptr<double>()[index] = sum;
}

}  // namespace megatron_dga
