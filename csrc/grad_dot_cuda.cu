// CUDA kernels of grad_dot: one multi-tensor launch per (dtype combination, up to
// kMaxTensorsPerLaunch tensors); tensor addresses travel in the kernel arguments, so no
// host-to-device copy and no host synchronisation is needed.
//
// Each block walks every tensor of its launch with a grid-stride loop (vectorised loads of
// kVec elements when all pointers are aligned, scalar loads for the rest), reduces its
// threads' sums with warp shuffles and writes ONE partial to a float64 workspace. A second
// single-block kernel sums the workspace in a fixed order into out[index]. No atomics:
// the result is bitwise reproducible run to run.
// Only c10 CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers
// that slim toolkits lack and that this file does not need.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <tuple>
#include <type_traits>

#include "ops.h"

namespace megatron_dga {
namespace {

// 3 pointer arrays + 1 size array of 8-byte entries: 64 tensors use 2 KiB of the
// 4 KiB kernel-argument space.
constexpr int kMaxTensorsPerLaunch = 64;
constexpr int kThreads = 256;
constexpr int kVec = 4;
constexpr int kFinalThreads = 1024;
// Blocks per SM: enough resident warps to saturate HBM for a streaming kernel.
constexpr int kBlocksPerSm = 8;

struct TensorBatch {
  const void* g[kMaxTensorsPerLaunch];
  const void* t[kMaxTensorsPerLaunch];
  const void* v[kMaxTensorsPerLaunch];
  int64_t n[kMaxTensorsPerLaunch];
  int count;
};

// Element readers: bf16 and fp16 widen exactly to float.
struct F32 {
  using S = float;
  __device__ __forceinline__ static float get(float x) { return x; }
};
struct BF16 {
  using S = uint16_t;
  __device__ __forceinline__ static float get(uint16_t x) {
    return __uint_as_float(static_cast<unsigned int>(x) << 16);
  }
};
struct F16 {
  using S = uint16_t;
  __device__ __forceinline__ static float get(uint16_t x) { return __half2float(__ushort_as_half(x)); }
};
// No preconditioner: the v pointer is never read.
struct NoV {
  using S = uint8_t;
  __device__ __forceinline__ static float get(uint8_t) { return 0.f; }
};

template <typename S>
struct alignas(sizeof(S) * kVec) Pack {
  S x[kVec];
};

template <typename S>
__device__ __forceinline__ bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(S) * kVec) == 0;
}

template <typename Acc, typename V>
__device__ __forceinline__ Acc term(float g, float t, float v, Acc inv_bc2, Acc eps) {
  Acc p = static_cast<Acc>(g) * static_cast<Acc>(t);
  if constexpr (!std::is_same<V, NoV>::value) {
    // Adam's denominator sqrt(v / bc2) + eps, applied on the fly (never materialised).
    p = p / (sqrt(static_cast<Acc>(v) * inv_bc2) + eps);
  }
  return p;
}

// Sum over the block; the result is valid in thread 0. blockDim.x must be a multiple of 32.
template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc x) {
  __shared__ Acc warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  if (lane == 0) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = blockDim.x >> 5;
    x = lane < nwarps ? warp_sums[lane] : Acc(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_down_sync(0xffffffffu, x, off);
  }
  return x;
}

template <typename Acc, typename G, typename T, typename V>
__global__ void __launch_bounds__(kThreads)
    grad_dot_kernel(const TensorBatch batch, double* __restrict__ partials, double inv_bc2, double eps) {
  using GS = typename G::S;
  using TS = typename T::S;
  using VS = typename V::S;
  constexpr bool kPrecond = !std::is_same<V, NoV>::value;
  const Acc ib = static_cast<Acc>(inv_bc2);
  const Acc ep = static_cast<Acc>(eps);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // Products (and, with fp32 accumulation, the kVec-term pack sums) are in Acc; each
  // thread's running sum is float64 so the error does not grow with n / threads.
  double acc = 0.0;
  for (int j = 0; j < batch.count; ++j) {
    const GS* __restrict__ g = static_cast<const GS*>(batch.g[j]);
    const TS* __restrict__ t = static_cast<const TS*>(batch.t[j]);
    const VS* __restrict__ v = static_cast<const VS*>(batch.v[j]);
    const int64_t n = batch.n[j];
    const bool aligned = is_aligned<GS>(g) && is_aligned<TS>(t) && (!kPrecond || is_aligned<VS>(v));
    const int64_t n_vec = aligned ? n / kVec : 0;
    for (int64_t i = tid; i < n_vec; i += stride) {
      const Pack<GS> gp = reinterpret_cast<const Pack<GS>*>(g)[i];
      const Pack<TS> tp = reinterpret_cast<const Pack<TS>*>(t)[i];
      Pack<VS> vp{};
      if constexpr (kPrecond) vp = reinterpret_cast<const Pack<VS>*>(v)[i];
      Acc pack = Acc(0);
#pragma unroll
      for (int l = 0; l < kVec; ++l) {
        pack += term<Acc, V>(G::get(gp.x[l]), T::get(tp.x[l]), V::get(vp.x[l]), ib, ep);
      }
      acc += static_cast<double>(pack);
    }
    for (int64_t i = n_vec * kVec + tid; i < n; i += stride) {
      const float vv = kPrecond ? V::get(v[i]) : 0.f;
      acc += static_cast<double>(term<Acc, V>(G::get(g[i]), T::get(t[i]), vv, ib, ep));
    }
  }
  const double s = block_sum<double>(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

__global__ void __launch_bounds__(kFinalThreads)
    sum_partials_kernel(const double* __restrict__ partials, int64_t count, double* __restrict__ out) {
  double x = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) x += partials[i];
  x = block_sum<double>(x);
  if (threadIdx.x == 0) *out = x;
}

using Launcher = void (*)(const TensorBatch&, double*, int, double, double, cudaStream_t);

template <typename Acc, typename G, typename T, typename V>
void launch(const TensorBatch& batch, double* partials, int blocks, double inv_bc2, double eps,
            cudaStream_t stream) {
  grad_dot_kernel<Acc, G, T, V><<<blocks, kThreads, 0, stream>>>(batch, partials, inv_bc2, eps);
}

template <typename Acc, typename G, typename T>
Launcher pick_v(ElemType v) {
  switch (v) {
    case ElemType::kNone: return &launch<Acc, G, T, NoV>;
    case ElemType::kFloat32: return &launch<Acc, G, T, F32>;
    case ElemType::kBFloat16: return &launch<Acc, G, T, BF16>;
    case ElemType::kFloat16: return &launch<Acc, G, T, F16>;
  }
  return nullptr;
}

template <typename Acc, typename G>
Launcher pick_t(ElemType t, ElemType v) {
  switch (t) {
    case ElemType::kFloat32: return pick_v<Acc, G, F32>(v);
    case ElemType::kBFloat16: return pick_v<Acc, G, BF16>(v);
    case ElemType::kFloat16: return pick_v<Acc, G, F16>(v);
    default: return nullptr;
  }
}

template <typename Acc>
Launcher pick_g(ElemType g, ElemType t, ElemType v) {
  switch (g) {
    case ElemType::kFloat32: return pick_t<Acc, F32>(t, v);
    case ElemType::kBFloat16: return pick_t<Acc, BF16>(t, v);
    case ElemType::kFloat16: return pick_t<Acc, F16>(t, v);
    default: return nullptr;
  }
}

struct Launch {
  Launcher fn;
  TensorBatch batch;
  int blocks;
  int64_t offset;  // first slot of this launch in the partials workspace
};

}  // namespace

void grad_dot_cuda(const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& targets,
                   const std::vector<at::Tensor>& exp_avg_sq, double bias_correction2, double eps,
                   bool fp64, at::Tensor& out, int64_t index) {
  TORCH_CHECK(grads.size() == targets.size(), "grad_dot_cuda: ", grads.size(), " grads vs ",
              targets.size(), " targets");
  const bool precond = !exp_avg_sq.empty();
  TORCH_CHECK(!precond || exp_avg_sq.size() == grads.size(), "grad_dot_cuda: ", grads.size(),
              " grads vs ", exp_avg_sq.size(), " exp_avg_sq tensors");
  TORCH_CHECK(out.is_cuda() && out.scalar_type() == at::kDouble && out.is_contiguous(),
              "grad_dot_cuda: out must be a contiguous float64 CUDA tensor");
  TORCH_CHECK(index >= 0 && index < out.numel(), "grad_dot_cuda: index ", index,
              " out of range for out of size ", out.numel());
  TORCH_CHECK(bias_correction2 > 0.0, "grad_dot_cuda: bias_correction2 must be > 0");

  const c10::cuda::CUDAGuard guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(out.device().index()).stream();
  int sm_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, out.device().index()));
  const int max_blocks = std::max(1, sm_count) * kBlocksPerSm;

  // Tensors sharing a dtype combination go into the same launches, in input order.
  std::map<std::tuple<int, int, int>, std::vector<size_t>> groups;
  for (size_t j = 0; j < grads.size(); ++j) {
    const at::Tensor& g = grads[j];
    const at::Tensor& t = targets[j];
    TORCH_CHECK(t.numel() == g.numel(), "grad_dot_cuda: tensor ", j, " numel ", g.numel(), " vs ",
                t.numel());
    TORCH_CHECK(g.device() == out.device() && t.device() == out.device(), "grad_dot_cuda: tensor ",
                j, " is not on ", out.device());
    TORCH_CHECK(g.is_contiguous() && t.is_contiguous(), "grad_dot_cuda: tensor ", j,
                " is not contiguous");
    int vt = static_cast<int>(ElemType::kNone);
    if (precond) {
      const at::Tensor& v = exp_avg_sq[j];
      TORCH_CHECK(v.numel() == g.numel() && v.device() == out.device() && v.is_contiguous(),
                  "grad_dot_cuda: exp_avg_sq ", j, " must be a contiguous tensor of ", g.numel(),
                  " elements on ", out.device());
      vt = static_cast<int>(elem_type_of(v));
    }
    if (g.numel() == 0) continue;
    groups[{static_cast<int>(elem_type_of(g)), static_cast<int>(elem_type_of(t)), vt}].push_back(j);
  }

  std::vector<Launch> launches;
  int64_t total_blocks = 0;
  for (const auto& kv : groups) {
    const auto& key = kv.first;
    const Launcher fn =
        fp64 ? pick_g<double>(static_cast<ElemType>(std::get<0>(key)), static_cast<ElemType>(std::get<1>(key)),
                              static_cast<ElemType>(std::get<2>(key)))
             : pick_g<float>(static_cast<ElemType>(std::get<0>(key)), static_cast<ElemType>(std::get<1>(key)),
                             static_cast<ElemType>(std::get<2>(key)));
    TORCH_CHECK(fn != nullptr, "grad_dot_cuda: no kernel for this dtype combination");
    const std::vector<size_t>& members = kv.second;
    for (size_t start = 0; start < members.size(); start += kMaxTensorsPerLaunch) {
      Launch l{};
      l.fn = fn;
      int64_t elems = 0;
      const size_t stop = std::min(members.size(), start + kMaxTensorsPerLaunch);
      for (size_t m = start; m < stop; ++m) {
        const size_t j = members[m];
        const int c = l.batch.count++;
        l.batch.g[c] = grads[j].data_ptr();
        l.batch.t[c] = targets[j].data_ptr();
        l.batch.v[c] = precond ? exp_avg_sq[j].data_ptr() : nullptr;
        l.batch.n[c] = grads[j].numel();
        elems += grads[j].numel();
      }
      const int64_t per_block = static_cast<int64_t>(kThreads) * kVec * 4;
      l.blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_blocks, (elems + per_block - 1) / per_block)));
      l.offset = total_blocks;
      total_blocks += l.blocks;
      launches.push_back(l);
    }
  }

  double* out_ptr = out.data_ptr<double>() + index;
  if (launches.empty()) {
    C10_CUDA_CHECK(cudaMemsetAsync(out_ptr, 0, sizeof(double), stream));
    return;
  }
  // Freed on return; the caching allocator keeps it for this stream until the kernels ran.
  at::Tensor partials = at::empty({total_blocks}, out.options());
  double* partials_ptr = partials.data_ptr<double>();
  const double inv_bc2 = 1.0 / bias_correction2;
  for (const Launch& l : launches) {
    l.fn(l.batch, partials_ptr + l.offset, l.blocks, inv_bc2, eps, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  sum_partials_kernel<<<1, kFinalThreads, 0, stream>>>(partials_ptr, total_blocks, out_ptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace megatron_dga
