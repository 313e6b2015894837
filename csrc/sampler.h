// Index computation of the dynamic mixture sampler (megatron_dga/data/sampler.py):
// allocation by water-filling, keyed Feistel permutations with cycle walking, and the
// low-discrepancy order inside a global batch. Host-only C++17.
//
// Every function computes bit for bit what the numpy reference in sampler.py computes
// (same wrapping uint32/uint64 arithmetic, same float64 operations in the same order,
// numpy's pairwise summation for the carry re-centring, same tie-breaking); the tests in
// tests/test_sampler.py compare the two. Call them through DynamicMixtureSampler, which
// validates everything; the checks here are internal invariants only.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace megatron_dga {

namespace py = pybind11;

// Draws `num` global batches of `batch_size` samples. Updates `carry` (float64, k) and
// `consumed` (int64, k) in place, exactly as `num` calls of the numpy global_batch do.
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

// Sample index at stream position pos[j] of source dom[j] (the numpy _stream_samples):
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
// (the numpy keyed_permutation with 6 rounds; all three arrays of one length).
py::array_t<int64_t> sampler_permute(py::array_t<int64_t, py::array::c_style | py::array::forcecast> x,
                                     py::array_t<int64_t, py::array::c_style | py::array::forcecast> n,
                                     py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys);

// The numpy allocate_counts: `total` samples over domains by water-filling `deficit`.
py::array_t<int64_t> sampler_allocate_counts(
    py::array_t<double, py::array::c_style | py::array::forcecast> deficit, int64_t total);

}  // namespace megatron_dga
