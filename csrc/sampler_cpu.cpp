// Host kernels of the dynamic mixture sampler; see sampler.h and megatron_dga/data/README.md.
//
// Bit-identity with the numpy oracle (tests/helpers/sampler_oracle.py) rests on three things:
//   * integers: the same wrapping uint32/uint64 operations (the Feistel rounds use Lemire's
//     exact 32-bit division by multiplication instead of `%` and `/`, which gives the same
//     quotient and remainder for every 32-bit operand);
//   * floats: the same IEEE operations in the same order, no reassociation and no fused
//     multiply-add (setup.py compiles with -std=c++17, i.e. -ffp-contract=off in GCC, and
//     without -ffast-math or -march flags), and numpy's own pairwise summation for the one
//     reduction (the carry's mean);
//   * orders: the oracle's stable argsort is replaced by a per-batch bucket sort on
//     the same keys with ties broken by position, which yields the same permutation.
#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace megatron_dga {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;
constexpr uint32_t kRound[6] = {0x85EBCA6Bu, 0xC2B2AE35u, 0x27D4EB2Fu,
                                0x165667B1u, 0x9E3779B1u, 0x7FEB352Du};
constexpr uint32_t kRoundMul1 = 0x7FEB352Du;
constexpr uint32_t kRoundMul2 = 0x846CA68Bu;
constexpr int64_t kMaxSize = int64_t{1} << 31;  // sizes must be below 2**31 (uint32 arithmetic)

#ifndef __SIZEOF_INT128__
#error "sampler_cpu.cpp needs a compiler with unsigned __int128 (GCC or Clang on a 64-bit target)"
#endif

// splitmix64 finaliser.
inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= kMix1;
  z ^= z >> 27;
  z *= kMix2;
  return z ^ (z >> 31);
}

// 32-bit multiply-xorshift round function.
inline uint32_t round_fn(uint32_t v, uint32_t key, uint32_t rc) {
  uint32_t f = (v ^ key) + rc;
  f *= kRoundMul1;
  f ^= f >> 15;
  f *= kRoundMul2;
  return f ^ (f >> 13);
}

// Keyed bijection of [0, n): 6-round mixed-radix Feistel network on Z_a x Z_{2^w} with
// cycle walking (the oracle's keyed_permutation).
struct Feistel {
  uint32_t n = 1, w = 0, mask = 0, a = 1;
  // ceil(2^64 / a) for a >= 2: q = (magic * y) >> 64 is y / a and ((magic * y mod 2^64) * a)
  // >> 64 is y % a, exactly, for every 32-bit y (Lemire, Kaser & Kurz 2019). For n = 1 the
  // only input is 0 and magic = 0 gives 0 for both, which is right.
  uint64_t magic = 0;
  uint32_t k_lo = 0, k_hi = 0;

  void set_size(uint32_t size) {
    n = size;
    const uint32_t v = size - 1;
    const uint32_t bits = v == 0 ? 0u : 32u - static_cast<uint32_t>(__builtin_clz(v));
    w = bits / 2;
    mask = (1u << w) - 1u;
    a = (size + mask) >> w;
    magic = a >= 2 ? std::numeric_limits<uint64_t>::max() / a + 1 : 0;
  }
  void set_key(uint64_t key) {
    k_lo = static_cast<uint32_t>(key & 0xFFFFFFFFULL);
    k_hi = static_cast<uint32_t>(key >> 32);
  }
  inline uint32_t mod_a(uint32_t y) const {
    const uint64_t low = magic * y;
    return static_cast<uint32_t>((static_cast<unsigned __int128>(low) * a) >> 64);
  }
  inline uint32_t div_a(uint32_t y) const {
    return static_cast<uint32_t>((static_cast<unsigned __int128>(magic) * y) >> 64);
  }
  // L * 2^w + R  ->  R * a + ((L + F(R)) mod a); F mod a + L < 2a, so one subtraction
  // finishes the second modulo.
  inline uint32_t even_round(uint32_t y, int r) const {
    const uint32_t left = y >> w, right = y & mask;
    uint32_t f = mod_a(round_fn(right, k_lo, kRound[r])) + left;
    if (f >= a) f -= a;
    return right * a + f;
  }
  // H * a + L  ->  L * 2^w + (H xor (F(L) & mask))
  inline uint32_t odd_round(uint32_t y, int r) const {
    const uint32_t high = div_a(y);
    const uint32_t low = y - high * a;
    return (low << w) | ((round_fn(low, k_hi, kRound[r]) & mask) ^ high);
  }
  inline uint32_t network(uint32_t y) const {
    for (int r = 0; r < 6; r += 2) y = odd_round(even_round(y, r), r + 1);
    return y;
  }
  // Cycle walking: the network permutes [0, a * 2^w), which exceeds n by < 2^w; re-apply it
  // until the value falls in [0, n) (the oracle re-applies all rounds the same way).
  inline uint32_t walk(uint32_t y) const {
    while (y >= n) y = network(y);
    return y;
  }
  inline uint32_t operator()(uint32_t x) const { return walk(network(x)); }

  // out[i] = perm(in(i)) for i < count. Eight elements at a time, round by round: one
  // element's rounds form a long chain of dependent multiplies, eight independent chains
  // keep the multipliers busy (about 3x the throughput of one element after another).
  template <typename In>
  void apply(In in, uint32_t* out, int64_t count) const {
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
      uint32_t y[8];
      for (int l = 0; l < 8; ++l) y[l] = in(i + l);
      for (int r = 0; r < 6; r += 2) {
        for (int l = 0; l < 8; ++l) y[l] = even_round(y[l], r);
        for (int l = 0; l < 8; ++l) y[l] = odd_round(y[l], r + 1);
      }
      for (int l = 0; l < 8; ++l) out[i + l] = walk(y[l]);
    }
    for (; i < count; ++i) out[i] = (*this)(in(i));
  }
};

// numpy's pairwise summation of a contiguous float64 array (np.add.reduce), operation for
// operation: blocks of up to 128 summed in 8 interleaved lanes, halves split at multiples of 8.
double pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = 0.;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8) {
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// Reused buffers: a steady stream of calls allocates nothing but its output array.
struct Scratch {
  std::vector<int64_t> fl, cand, hist, counts, dom, order;
  std::vector<double> frac, vals, deficit, target, key, sorted_key;
  std::vector<uint32_t> samp, bucket, bucket_pos;
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// `total` repetitions of "serve the largest remaining deficit,
// lowest index on ties", by finding the level of the total-th largest candidate value.
void allocate_counts(const double* deficit, int64_t k, int64_t total, int64_t* counts, Scratch& s) {
  s.fl.resize(k);
  s.frac.resize(k);
  int64_t positive_sum = 0, max_fl = 0;
  for (int64_t i = 0; i < k; ++i) {
    const double f = std::floor(deficit[i]);
    s.frac[i] = deficit[i] - f;
    const int64_t v = static_cast<int64_t>(f);
    s.fl[i] = v;
    if (v >= 1) {
      positive_sum += v;
      max_fl = std::max(max_fl, v);
    }
  }
  int64_t level = 0;
  if (positive_sum >= total) {
    // count(L) = sum_{fl_i >= L} (fl_i - L + 1) falls as L grows: the largest L with
    // count(L) >= total is the first one found scanning down from the top.
    s.hist.assign(static_cast<size_t>(max_fl) + 1, 0);
    for (int64_t i = 0; i < k; ++i) {
      if (s.fl[i] >= 1) ++s.hist[s.fl[i]];
    }
    int64_t s0 = 0, s1 = 0;
    for (int64_t v = max_fl; v >= 1; --v) {
      s0 += s.hist[v];
      s1 += s.hist[v] * v;
      if (s1 - (v - 1) * s0 >= total) {
        level = v;
        break;
      }
    }
  }
  int64_t given = 0;
  s.cand.clear();
  for (int64_t i = 0; i < k; ++i) {
    const int64_t c = std::max<int64_t>(s.fl[i] - level, 0);
    counts[i] = c;
    given += c;
    if (s.fl[i] >= level) s.cand.push_back(i);
  }
  const int64_t remaining = total - given;
  const int64_t nc = static_cast<int64_t>(s.cand.size());
  if (remaining < 0 || remaining > nc) {
    throw std::logic_error("allocation invariant broken: remaining=" + std::to_string(remaining) +
                           ", candidates=" + std::to_string(nc));
  }
  if (remaining == nc) {
    for (int64_t i : s.cand) ++counts[i];
  } else if (remaining > 0) {
    s.vals.resize(nc);
    for (int64_t j = 0; j < nc; ++j) s.vals[j] = s.frac[s.cand[j]];
    std::nth_element(s.vals.begin(), s.vals.begin() + (nc - remaining), s.vals.end());
    const double thr = s.vals[nc - remaining];
    int64_t above = 0;
    for (int64_t i : s.cand) {
      if (s.frac[i] > thr) {
        ++counts[i];
        ++above;
      }
    }
    int64_t ties = remaining - above;  // lowest indices first
    for (int64_t i : s.cand) {
      if (ties == 0) break;
      if (s.frac[i] == thr) {
        ++counts[i];
        --ties;
      }
    }
  }
}

// Writes into s.order the permutation that a stable argsort of key[0..n) gives, knowing that
// every key lies in [t, t + 1]. Positions are scattered into n + 1 buckets of a monotone
// function of the key, in position order (about one per bucket), then one stable insertion
// pass over the whole (key, position) sequence finishes: an element only moves within its
// bucket, since earlier buckets hold smaller keys and equal keys share a bucket. Equal keys
// keep their positions' order, as in numpy's stable sort.
void stable_order(const double* key, int64_t n, double t, Scratch& s) {
  s.bucket.resize(n);
  s.bucket_pos.assign(static_cast<size_t>(n) + 2, 0);
  s.order.resize(n);
  s.sorted_key.resize(n);
  const double scale = static_cast<double>(n);
  for (int64_t j = 0; j < n; ++j) {
    // (key - t) * n is monotone in key (each rounded operation is), so buckets follow keys.
    const double x = (key[j] - t) * scale;
    int64_t b = x <= 0.0 ? 0 : static_cast<int64_t>(x);
    if (b > n) b = n;
    s.bucket[j] = static_cast<uint32_t>(b);
    ++s.bucket_pos[b + 1];
  }
  for (int64_t b = 0; b <= n; ++b) s.bucket_pos[b + 1] += s.bucket_pos[b];
  int64_t* order = s.order.data();
  double* sorted_key = s.sorted_key.data();
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t dst = s.bucket_pos[s.bucket[j]]++;
    order[dst] = j;
    sorted_key[dst] = key[j];
  }
  for (int64_t i = 1; i < n; ++i) {
    const double kv = sorted_key[i];
    if (!(kv < sorted_key[i - 1])) continue;  // the usual case: already in place
    const int64_t v = order[i];
    int64_t h = i;
    while (h > 0 && kv < sorted_key[h - 1]) {
      sorted_key[h] = sorted_key[h - 1];
      order[h] = order[h - 1];
      --h;
    }
    sorted_key[h] = kv;
    order[h] = v;
  }
}

template <typename T>
const T* checked_data(const py::array_t<T, py::array::c_style | py::array::forcecast>& a, int64_t size,
                      const char* what) {
  if (a.ndim() != 1 || a.shape(0) < size) {
    throw std::invalid_argument(std::string(what) + ": expected a 1-D array of at least " +
                                std::to_string(size) + " entries");
  }
  return a.data();
}

// In/out arrays are written in place, so a silent converting copy would lose the update.
template <typename T>
T* inout_data(py::array& a, int64_t size, const char* what) {
  if (!py::isinstance<py::array_t<T, py::array::c_style>>(a) || a.ndim() != 1 || a.shape(0) != size) {
    throw std::invalid_argument(std::string(what) + ": expected a C-contiguous 1-D array of " +
                                std::to_string(size) + " entries of the right dtype");
  }
  return static_cast<T*>(a.mutable_data());  // throws if the array is read-only
}

inline uint32_t checked_size(int64_t n, const char* what) {
  if (n < 1 || n >= kMaxSize) {
    throw std::invalid_argument(std::string(what) + " " + std::to_string(n) +
                                " is outside [1, 2**31)");
  }
  return static_cast<uint32_t>(n);
}

}  // namespace

py::array_t<int64_t> sampler_global_batches(
    py::array_t<double, py::array::c_style | py::array::forcecast> weights, py::array carry,
    py::array consumed, py::array_t<int64_t, py::array::c_style | py::array::forcecast> access,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> sizes,
    py::array_t<bool, py::array::c_style | py::array::forcecast> limited,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> train_keys,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> subset_keys, int64_t num,
    int64_t batch_size, int64_t step, double phi, double sqrt2_frac) {
  if (weights.ndim() != 1 || weights.shape(0) < 1) {
    throw std::invalid_argument("weights: expected a non-empty 1-D array");
  }
  if (num < 1 || batch_size < 1 || batch_size >= kMaxSize || step < 0) {
    throw std::invalid_argument("num and batch_size must be >= 1 (batch_size < 2**31), step >= 0");
  }
  const int64_t k = weights.shape(0);
  const double* w = weights.data();
  double* c = inout_data<double>(carry, k, "carry");
  int64_t* consumed_p = inout_data<int64_t>(consumed, k, "consumed");
  const int64_t* acc = checked_data(access, k, "access");
  const int64_t* sz = checked_data(sizes, k, "sizes");
  const bool* lim = checked_data(limited, k, "limited");
  const uint64_t* tkeys = checked_data(train_keys, k, "train_keys");
  const uint64_t* skeys = checked_data(subset_keys, k, "subset_keys");
  for (int64_t d = 0; d < k; ++d) {
    checked_size(acc[d], "accessible size");
    checked_size(sz[d], "source size");
  }
  py::array_t<int64_t> out({num, batch_size, int64_t{2}});
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    Scratch& s = scratch();
    const int64_t B = batch_size;
    s.target.resize(k);
    s.deficit.resize(k);
    s.counts.resize(k);
    s.dom.resize(B);
    s.samp.resize(B);
    s.key.resize(B);
    const double bd = static_cast<double>(B), kd = static_cast<double>(k);
    for (int64_t i = 0; i < k; ++i) s.target[i] = bd * w[i];
    Feistel perm, subset;
    for (int64_t t = 0; t < num; ++t) {
      // Allocation on the carried deficit, then re-centre the carry (oracle: carry -= carry.sum() / k).
      for (int64_t i = 0; i < k; ++i) s.deficit[i] = c[i] + s.target[i];
      allocate_counts(s.deficit.data(), k, B, s.counts.data(), s);
      for (int64_t i = 0; i < k; ++i) c[i] = s.deficit[i] - static_cast<double>(s.counts[i]);
      const double mean = pairwise_sum(c, k) / kd;
      for (int64_t i = 0; i < k; ++i) c[i] -= mean;

      // Samples in (domain ascending, rank ascending) order, with their order keys.
      const double td = static_cast<double>(t);
      const double step_off = static_cast<double>(step + t) * sqrt2_frac;
      int64_t j = 0;
      for (int64_t d = 0; d < k; ++d) {
        const int64_t cnt = s.counts[d];
        if (cnt == 0) continue;
        const double u = std::fmod(static_cast<double>(d + 1) * phi + step_off, 1.0);
        const double cd = static_cast<double>(cnt);
        const uint32_t m = static_cast<uint32_t>(acc[d]);
        const int64_t start = consumed_p[d];
        uint64_t epoch = static_cast<uint64_t>(start / m);
        uint32_t local = static_cast<uint32_t>(start % m);
        uint32_t* samp = s.samp.data() + j;
        perm.set_size(m);
        // Stream positions start .. start + cnt - 1, in segments of one epoch each (an epoch
        // ending inside the batch starts a new order).
        for (int64_t done = 0; done < cnt;) {
          const int64_t seg = std::min<int64_t>(cnt - done, static_cast<int64_t>(m - local));
          perm.set_key(mix64(tkeys[d] + epoch * kGolden));
          const uint32_t first = local;
          perm.apply([first](int64_t i) { return first + static_cast<uint32_t>(i); }, samp + done, seg);
          done += seg;
          local += static_cast<uint32_t>(seg);
          if (local == m) {
            local = 0;
            ++epoch;
          }
        }
        if (lim[d]) {  // a token-limited domain: map into its fixed subset
          subset.set_size(static_cast<uint32_t>(sz[d]));
          subset.set_key(mix64(skeys[d]));
          subset.apply([samp](int64_t i) { return samp[i]; }, samp, cnt);
        }
        for (int64_t r = 0; r < cnt; ++r, ++j) {
          s.dom[j] = d;
          s.key[j] = (static_cast<double>(r) + u) / cd + td;
        }
        consumed_p[d] = start + cnt;
      }
      stable_order(s.key.data(), B, td, s);
      int64_t* row = o + t * B * 2;
      for (int64_t i = 0; i < B; ++i) {
        const int64_t src = s.order[i];
        row[2 * i] = s.dom[src];
        row[2 * i + 1] = static_cast<int64_t>(s.samp[src]);
      }
    }
  }
  return out;
}

py::array_t<int64_t> sampler_stream_samples(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> dom,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> pos,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> access,
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> sizes,
    py::array_t<bool, py::array::c_style | py::array::forcecast> limited,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys,
    py::array_t<uint64_t, py::array::c_style | py::array::forcecast> subset_keys) {
  const int64_t n = dom.size();
  if (pos.size() != n) throw std::invalid_argument("dom and pos must have the same length");
  const int64_t S = access.size();
  const int64_t* dp = dom.data();
  const int64_t* pp = pos.data();
  const int64_t* acc = checked_data(access, S, "access");
  const int64_t* sz = checked_data(sizes, S, "sizes");
  const bool* lim = checked_data(limited, S, "limited");
  const uint64_t* k1 = checked_data(keys, S, "keys");
  const uint64_t* k2 = checked_data(subset_keys, S, "subset_keys");
  for (int64_t j = 0; j < n; ++j) {
    if (dp[j] < 0 || dp[j] >= S || pp[j] < 0) throw std::invalid_argument("source id or position out of range");
    checked_size(acc[dp[j]], "accessible size");
    checked_size(sz[dp[j]], "source size");
  }
  py::array_t<int64_t> out(n);
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    Feistel perm, subset;
    int64_t cur_dom = -1, cur_epoch = -1;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t d = dp[j];
      const int64_t m = acc[d];
      const int64_t epoch = pp[j] / m;
      if (d != cur_dom) {
        perm.set_size(static_cast<uint32_t>(m));
        if (lim[d]) {
          subset.set_size(static_cast<uint32_t>(sz[d]));
          subset.set_key(mix64(k2[d]));
        }
        cur_epoch = -1;
      }
      if (d != cur_dom || epoch != cur_epoch) {
        perm.set_key(mix64(k1[d] + static_cast<uint64_t>(epoch) * kGolden));
        cur_dom = d;
        cur_epoch = epoch;
      }
      const uint32_t x = perm(static_cast<uint32_t>(pp[j] % m));
      o[j] = lim[d] ? subset(x) : x;
    }
  }
  return out;
}

py::array_t<int64_t> sampler_permute(py::array_t<int64_t, py::array::c_style | py::array::forcecast> x,
                                     py::array_t<int64_t, py::array::c_style | py::array::forcecast> n,
                                     py::array_t<uint64_t, py::array::c_style | py::array::forcecast> keys) {
  const int64_t len = x.size();
  if (n.size() != len || keys.size() != len) {
    throw std::invalid_argument("x, n and keys must have the same length");
  }
  const int64_t* xp = x.data();
  const int64_t* np_ = n.data();
  const uint64_t* kp = keys.data();
  for (int64_t j = 0; j < len; ++j) {
    checked_size(np_[j], "permutation size");
    if (xp[j] < 0 || xp[j] >= np_[j]) throw std::invalid_argument("position outside [0, n)");
  }
  py::array_t<int64_t> out(len);
  int64_t* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    Feistel perm;
    int64_t cur_n = -1;
    uint64_t cur_key = 0;
    for (int64_t j = 0; j < len; ++j) {
      if (np_[j] != cur_n) {
        cur_n = np_[j];
        perm.set_size(static_cast<uint32_t>(cur_n));
        cur_key = ~kp[j];  // force set_key below
      }
      if (kp[j] != cur_key) {
        cur_key = kp[j];
        perm.set_key(cur_key);
      }
      o[j] = perm(static_cast<uint32_t>(xp[j]));
    }
  }
  return out;
}

py::array_t<int64_t> sampler_allocate_counts(
    py::array_t<double, py::array::c_style | py::array::forcecast> deficit, int64_t total) {
  if (deficit.ndim() != 1 || deficit.shape(0) < 1 || total < 1) {
    throw std::invalid_argument("deficit must be a non-empty 1-D array and total >= 1");
  }
  const int64_t k = deficit.shape(0);
  py::array_t<int64_t> out(k);
  int64_t* o = out.mutable_data();
  const double* d = deficit.data();
  {
    py::gil_scoped_release release;
    allocate_counts(d, k, total, o, scratch());
  }
  return out;
}

}  // namespace megatron_dga
