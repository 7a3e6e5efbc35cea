// What the CPU decode kernels share (paged_decode.cpp over dense pages, compressed_decode.cpp
// over Mustafar records): split-K work items, the online softmax over a page of fp32 rows, and
// the log-sum-exp merge of the splits. A kernel only says how a page becomes fp32 rows in L1.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace sparsekv_decode {

constexpr int64_t kItemsPerThread = 8;  // enough items that dynamic scheduling balances
constexpr int64_t kMinSplitTokens = 256;  // below this the merge costs more than it saves
constexpr int64_t kMergeGrain = 64;  // (sequence, KV head) groups per merge task: runs inline when small
constexpr int kMaxG = 32, kMaxPageSize = 256;
constexpr float kEmpty = -1e30f;  // running max before any token (finite: exp() gives 0)

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// One vector register of floats: 16 lanes (zmm) where the CPU has AVX-512, 8 (ymm) otherwise.
// Written as 16-lane vectors on AVX2, GCC lowered the shuffle trees lane by lane through
// general registers and spilled every accumulator (the decode kernel at 0.2 of the bandwidth).
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef float vfu __attribute__((vector_size(4 * kLanes), aligned(4)));  // for loads from any row
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

inline vf loadv(const float* src) { return *reinterpret_cast<const vfu*>(src); }
inline vf splat(float x) { return vf{} + x; }

// e^x for x <= 0 on a vector's lanes in plain arithmetic (libm's expf is a call, and the compiler left
// a scalar version of this unvectorised): 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f
// by a degree-6 Taylor series (rel. err ~1e-7); below -87 it flushes towards 0.
inline vf exp_neg(vf x) {
  const vf t = (x > -87.f ? x : splat(-87.f)) * 1.4426950409f;
  const vi n = -__builtin_convertvector(0.5f - t, vi);  // 0.5 - t > 0: truncation is floor
  const vf f = (t - __builtin_convertvector(n, vf)) * 0.6931471806f;
  const vf p = 1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720))))));
  return p * reinterpret_cast<vf>((n + 127) << 23);
}

// Max and sum over a vector's lanes by halving trees (a scalar chain costs kLanes latencies).
constexpr int kLaneLevels = __builtin_ctz(kLanes);  // log2

inline vf swap_halves(vf x, int level) {
#ifdef __AVX512F__
  switch (level) {
    case 0: return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 1: return __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    case 2: return __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    default: return __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
  }
#else
  switch (level) {
    case 0: return __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3);
    case 1: return __builtin_shufflevector(x, x, 2, 3, 0, 1, 6, 7, 4, 5);
    default: return __builtin_shufflevector(x, x, 1, 0, 3, 2, 5, 4, 7, 6);
  }
#endif
}

inline float lanes_max(vf x) {
  for (int level = 0; level < kLaneLevels; ++level) {
    const vf y = swap_halves(x, level);
    x = x > y ? x : y;
  }
  return x[0];
}

inline float lanes_sum(vf x) {
  for (int level = 0; level < kLaneLevels; ++level) x += swap_halves(x, level);
  return x[0];
}

// Lane sums of kLanes vectors as one vector (out[t] = sum of x[t]'s lanes): a shuffle tree that
// halves the lanes of each pair per level, kLanes - 1 adds where kLanes horizontal sums would
// take kLanes * log2(kLanes) operations.
#ifdef __AVX512F__
inline vf lane_sums(const vf* x) {
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) {
    a[i] = __builtin_shufflevector(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(x[2 * i], x[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i) {
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  }
  for (int i = 0; i < 2; ++i) {
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#else
// vhaddps within each 128-bit half: [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
inline vf pair_sums(vf a, vf b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

inline vf lane_sums(const vf* x) {
  const vf lo = pair_sums(pair_sums(x[0], x[1]), pair_sums(x[2], x[3]));  // halves of x[0..3]'s sums
  const vf hi = pair_sums(pair_sums(x[4], x[5]), pair_sums(x[6], x[7]));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) + __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

// Requests `bytes` from `src` ahead of use: memory stays busy during the arithmetic, also where
// a fragmented block table defeats the hardware prefetcher.
inline void prefetch_bytes(const void* src, int64_t bytes) {
  const char* c = static_cast<const char*>(src);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off);
}

struct Item {
  int32_t b, h, lo, hi;  // pages [lo, hi) of the dense range or of the page list
};

// The G query heads of item (b, h), scaled, as fp32 [G, D].
template <typename T, int D>
inline void load_queries(const T* q, int64_t sq_b, int64_t sq_h, const Item& it, int G, float scale, float* qf) {
  for (int g = 0; g < G; ++g) {
    const T* qr = q + it.b * sq_b + (it.h * G + g) * sq_h;
    for (int d = 0; d < D; ++d) qf[g * D + d] = widen(qr[d]) * scale;
  }
}

// Running softmax state of one item: acc [G, D] unnormalised, m/l [G] max and sum.
template <int D>
inline void reset_state(int G, float* acc, float* m, float* l) {
  for (int i = 0; i < G * D; ++i) acc[i] = 0.f;
  for (int g = 0; g < G; ++g) m[g] = kEmpty, l[g] = 0.f;
}

// Vector registers the V phase may hold as accumulators (the rest: broadcast weights, a row).
#ifdef __AVX512F__
constexpr int kAccRegs = 16;
#else
constexpr int kAccRegs = 12;
#endif

// Columns (in vectors) of V that GB heads accumulate per pass over the page: all V of them where
// GB * V accumulators fit the registers, else the largest power of two that does.
template <int V, int GB>
constexpr int column_block() {
  int cb = V;
  while (cb > 1 && GB * cb > kAccRegs) cb /= 2;
  return cb;
}

// One page of n fp32 rows into the online softmax of GB query heads at once. Each phase runs
// over all GB heads before the next (scores, then max, exp and sum, then V), so the heads'
// dependency chains overlap, and every K and V row is loaded once for all GB heads: the page's
// only pass from memory carries all the arithmetic (a pass per head left the later heads'
// arithmetic waiting behind the first head's cache misses; AVX2, 16 x 4K: 0.55 of a sum's
// bandwidth). Scores of kLanes rows go through one lane-sum tree per head.
template <int D, int GB>
inline void attend_heads(const float* __restrict__ qf, const float* kp, int64_t ks, const float* vp, int64_t vs,
                         int n, float* __restrict__ acc, float* __restrict__ m, float* __restrict__ l) {
  constexpr int V = D / kLanes, CB = column_block<V, GB>();
  alignas(64) float s[GB][kMaxPageSize + kLanes];
  vf lane;
  for (int i = 0; i < kLanes; ++i) lane[i] = static_cast<float>(i);
  float mx[GB], alpha[GB];
  vf top[GB];
  for (int g = 0; g < GB; ++g) top[g] = splat(m[g]);
  for (int t0 = 0; t0 < n; t0 += kLanes) {
    vf part[GB][kLanes];
    const int rows = std::min(kLanes, n - t0);
    for (int t = 0; t < kLanes; ++t) {
      vf a[GB] = {};
      if (t < rows) {
        const float* kr = kp + (t0 + t) * ks;
        for (int c = 0; c < V; ++c) {
          const vf kc = loadv(kr + c * kLanes);
          for (int g = 0; g < GB; ++g) a[g] += kc * loadv(qf + g * D + c * kLanes);
        }
      }
      for (int g = 0; g < GB; ++g) part[g][t] = a[g];
    }
    for (int g = 0; g < GB; ++g) {
      const vf sc = lane < static_cast<float>(rows) ? lane_sums(part[g]) : splat(kEmpty);  // padding weighs 0
      *reinterpret_cast<vfu*>(s[g] + t0) = sc;
      top[g] = top[g] > sc ? top[g] : sc;
    }
  }
  for (int g = 0; g < GB; ++g) {
    mx[g] = lanes_max(top[g]);
    alpha[g] = exp_neg(splat(m[g] - mx[g]))[0];
    vf sum = {};
    for (int t0 = 0; t0 < n; t0 += kLanes) {
      const vf e = exp_neg(loadv(s[g] + t0) - mx[g]);
      *reinterpret_cast<vfu*>(s[g] + t0) = e;
      sum += e;
    }
    l[g] = l[g] * alpha[g] + lanes_sum(sum);
    m[g] = mx[g];
  }
  for (int c0 = 0; c0 < V; c0 += CB) {
    vf o[GB][CB];
    for (int g = 0; g < GB; ++g) {
      for (int c = 0; c < CB; ++c) o[g][c] = loadv(acc + g * D + (c0 + c) * kLanes) * alpha[g];
    }
    for (int t = 0; t < n; ++t) {
      const float* vr = vp + t * vs + c0 * kLanes;
      for (int c = 0; c < CB; ++c) {
        const vf row = loadv(vr + c * kLanes);
        for (int g = 0; g < GB; ++g) o[g][c] += s[g][t] * row;
      }
    }
    for (int g = 0; g < GB; ++g) {
      for (int c = 0; c < CB; ++c) *reinterpret_cast<vfu*>(acc + g * D + (c0 + c) * kLanes) = o[g][c];
    }
  }
}

// One page of n fp32 rows into the online softmax of all G heads (state acc [G, D], m, l [G]),
// up to 4 heads per pass over the page (their V accumulators in column blocks, see above).
template <int D>
inline void attend_rows(const float* __restrict__ qf, int G, const float* kp, int64_t ks, const float* vp,
                        int64_t vs, int n, float* __restrict__ acc, float* __restrict__ m, float* __restrict__ l) {
  constexpr int kMaxChunk = 4;
  for (int g0 = 0; g0 < G;) {
    const int gb = std::min(kMaxChunk, G - g0);
    const float* q = qf + g0 * D;
    float *a = acc + g0 * D, *mg = m + g0, *lg = l + g0;
    switch (gb) {
      case 4: attend_heads<D, 4>(q, kp, ks, vp, vs, n, a, mg, lg); break;
      case 3: attend_heads<D, 3>(q, kp, ks, vp, vs, n, a, mg, lg); break;
      case 2: attend_heads<D, 2>(q, kp, ks, vp, vs, n, a, mg, lg); break;
      default: attend_heads<D, 1>(q, kp, ks, vp, vs, n, a, mg, lg); break;
    }
    g0 += gb;
  }
}

// Splits per (sequence, KV head): about kItemsPerThread items per thread, none shorter than
// kMinSplitTokens, pages shared out evenly within a sequence.
inline std::vector<Item> plan(const std::vector<int64_t>& count, int64_t hkv, int64_t page_size,
                              std::vector<int64_t>& group_begin) {
  int64_t total = 0;
  for (int64_t c : count) total += c * hkv;
  const int64_t target = kItemsPerThread * std::max<int64_t>(1, at::get_num_threads());
  const int64_t min_pages = std::max<int64_t>(1, kMinSplitTokens / page_size);
  const int64_t per_split = std::max(min_pages, (total + target - 1) / target);
  std::vector<Item> items;
  group_begin.assign(count.size() * hkv + 1, 0);
  for (size_t b = 0; b < count.size(); ++b) {
    const int64_t nsplit = std::max<int64_t>(1, (count[b] + per_split - 1) / per_split);
    const int64_t chunk = (count[b] + nsplit - 1) / nsplit;
    for (int64_t h = 0; h < hkv; ++h) {
      group_begin[b * hkv + h] = static_cast<int64_t>(items.size());
      for (int64_t lo = 0; lo < count[b]; lo += chunk) {
        items.push_back({static_cast<int32_t>(b), static_cast<int32_t>(h), static_cast<int32_t>(lo),
                         static_cast<int32_t>(std::min(count[b], lo + chunk))});
      }
    }
  }
  group_begin.back() = static_cast<int64_t>(items.size());
  return items;
}

// A finished attention over other keys, merged as one more split: normalised out [B, Hq, D]
// in the query dtype and its lse [B, Hq] (-inf: nothing), e.g. Mustafar's dense window.
template <typename T>
struct Extra {
  const T* out = nullptr;
  const float* lse = nullptr;
  int64_t so_b = 0, so_h = 0;
};

// Runs every item on the threads (run(item, acc, m, l) -> false on a bad page id), then merges
// each (sequence, KV head)'s splits and `extra` by log-sum-exp into out (q's dtype) and lse.
template <typename T, int D, typename Run>
bool run_and_merge(const std::vector<Item>& items, const std::vector<int64_t>& group_begin, int64_t B,
                   int64_t hkv, int G, const Run& run, const Extra<T>& extra, T* out, int64_t so_b, int64_t so_h,
                   float* lse) {
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<float> pacc(std::max<int64_t>(1, n_items) * G * D), pm(n_items * G + 1), pl(n_items * G + 1);
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1)) < n_items;) {
      if (!run(items[i], pacc.data() + i * G * D, pm.data() + i * G, pl.data() + i * G)) ok = false;
    }
  });
  at::parallel_for(0, B * hkv, kMergeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / hkv, h = bh % hkv;
      for (int g = 0; g < G; ++g) {
        const int64_t head = h * G + g;
        const float e_lse = extra.lse ? extra.lse[b * hkv * G + head] : -std::numeric_limits<float>::infinity();
        float mx = std::isfinite(e_lse) ? e_lse : kEmpty, sum = 0.f;
        alignas(64) float o[D] = {};
        for (int64_t i = group_begin[bh]; i < group_begin[bh + 1]; ++i) {
          if (pl[i * G + g] > 0.f) mx = std::max(mx, pm[i * G + g]);
        }
        for (int64_t i = group_begin[bh]; i < group_begin[bh + 1]; ++i) {
          if (pl[i * G + g] <= 0.f) continue;
          const float w = std::exp(pm[i * G + g] - mx);
          sum += pl[i * G + g] * w;
          const float* a = pacc.data() + (i * G + g) * D;
          for (int d = 0; d < D; ++d) o[d] += w * a[d];
        }
        if (std::isfinite(e_lse)) {  // a normalised output: its acc is out * 1, its sum 1
          const float w = std::exp(e_lse - mx);
          sum += w;
          const T* e = extra.out + b * extra.so_b + head * extra.so_h;
          for (int d = 0; d < D; ++d) o[d] += w * widen(e[d]);
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        T* dst = out + b * so_b + head * so_h;
        for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
        if (lse) lse[b * hkv * G + head] = sum > 0.f ? mx + std::log(sum) : -std::numeric_limits<float>::infinity();
      }
    }
  });
  return ok.load();
}

// Calls fn(T{}, std::integral_constant<int, D>{}) for the tensors' dtype (float32, else bfloat16)
// and one of the compiled head dims: the one dispatch every decode op makes.
template <typename F>
void dispatch_dtype_dim(c10::ScalarType dtype, int64_t D, const char* op, F&& fn) {
  auto by_dim = [&](auto tag) {
    switch (D) {
      case 32: return fn(tag, std::integral_constant<int, 32>{});
      case 64: return fn(tag, std::integral_constant<int, 64>{});
      case 128: return fn(tag, std::integral_constant<int, 128>{});
      default: TORCH_CHECK(false, op, ": head dim ", D, " not compiled (32, 64, 128)");
    }
  };
  if (dtype == c10::ScalarType::Float) {
    by_dim(float{});
  } else {
    by_dim(c10::BFloat16{});
  }
}

}  // namespace sparsekv_decode
