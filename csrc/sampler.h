// Index computation of the dynamic mixture sampler (megatron_dga/data/sampler.py), its only
// implementation: allocation by water-filling, keyed Feistel permutations with cycle walking,
// and the low-discrepancy order inside a global batch. Host-only C++17.
//
// tests/helpers/sampler_oracle.py re-implements every function here in numpy (same names and
// arguments), and tests/data/test_sampler.py checks that both compute the same bits (same wrapping
// uint32/uint64 arithmetic, same float64 operations in the same order, numpy's pairwise
// summation for the carry re-centring, same tie-breaking). Call them through
// DynamicMixtureSampler, which validates everything and never passes an empty domain; the
// checks here are internal invariants only (a size of 0 is refused with invalid_argument
// before any work, never divided by).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace megatron_dga {

namespace py = pybind11;

// Draws `num` global batches of `batch_size` samples over the k domains of `weights` (the
// sampler's non-empty domains, numbered 0..k-1). Updates `carry` (float64, k) and `consumed`
// (int64, k) in place, exactly as `num` calls with num = 1 would.
// Per-source arrays (`access`, `sizes`, `limited`, `train_keys`, `subset_keys`) have
// S >= k entries. `step` is the number of batches drawn before this call; `phi` and
// `sqrt2_frac` are the order offsets' constants. Returns int64 (num, batch_size, 2).
py::array_t<int64_t> sampler_global_batches(
    py::array_t<double, py::array::c_style | py::array::forcecast> weights, py::array carry,
    py::array consumed, py::array_t<int64_t, py::array::c_style | py::array::forcecast> access,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> sizes,
    py::array_t<bool, py::array::c_style | py::array::forcecast> limited,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> train_keys,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> subset_keys, int64_t num,
    int64_t batch_size, int64_t step, double phi, double sqrt2_frac);

// Sample index at stream position pos[j] of source dom[j]:
// epoch pos // access[d], permuted with the key mix64(keys[d] + epoch * golden), then,
// for a token-limited source, through its fixed subset order (key mix64(subset_keys[d]))
// over all sizes[d] samples.
py::array_t<int64_t> sampler_stream_samples(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> dom,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> pos,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> access,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> sizes,
    py::array_t<bool, py::array::c_style | py::array::forcecast> limited,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> subset_keys);

// Element-wise keyed bijection of [0, n[j]) applied to x[j] with key keys[j]
// (6 Feistel rounds; all three arrays of one length).
py::array_t<int64_t> sampler_permute(py::array_t<int64_t, py::array::c_style | py::array::forcecast> x,
                                     py::array_t<int64_t, py::array::c_style | py::array::forcecast> n,
                                     py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys);

// `total` samples over domains by water-filling `deficit` (exposed for the tests).
py::array_t<int64_t> sampler_allocate_counts(
    py::array_t<double, py::array::c_style | py::array::forcecast> deficit, int64_t total);

}  // namespace megatron_dga
