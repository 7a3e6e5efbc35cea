// Paged decode attention on CPU: one query token per sequence, the whole batch in one call.
//
// Work items are (sequence, KV head, split) ranges of pages (flash-decoding split-K): each
// item runs an online softmax over its pages and writes an unnormalised partial output with
// its max and sum; a merge pass combines the splits. Threads pull items from an atomic
// counter, so sequences of unequal length still balance. The GQA group's G query heads
// share every page while it sits in L1; scores are computed 16 keys at a time into one vector
// (a lane-sum tree instead of a horizontal sum per key) and the weighted values accumulate in
// registers, in 16-float vectors that are AVX-512 registers or pairs of AVX2 ones. bf16 pages
// widen to fp32 once per page. Optional row lengths [B, Hkv] let each KV head read only the
// last row_len of its sequence's seq_len positions (token eviction with per-head budgets):
// pages wholly before them are skipped unread.
// A torch op (torch.ops.sparsekv_cpu.paged_decode) with light ATen headers: the JIT build
// takes seconds, where torch/extension.h alone costs half a minute.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kItemsPerThread = 8;  // enough items that dynamic scheduling balances
constexpr int64_t kMinSplitTokens = 256;  // below this the merge costs more than it saves
constexpr int64_t kMergeGrain = 64;  // (sequence, KV head) groups per merge task: runs inline when small
constexpr int kPrefetchPages = 2;  // how far ahead rows are requested (two pages ~ 1 us of work)
constexpr int kMaxG = 32, kMaxPageSize = 256;
constexpr float kEmpty = -1e30f;  // running max before any token (finite: exp() gives 0)

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// e^x for x <= 0 in plain arithmetic, so the softmax loops vectorise (libm's expf is a call):
// 2^n * 2^f with n = round(x log2 e), |f| <= 1/2, 2^f by a degree-6 Taylor series (rel. err ~1e-7).
inline float exp_neg(float x) {
  const float t = std::max(x, -87.f) * 1.4426950409f;
  const float n = std::floor(t + 0.5f);
  const float f = (t - n) * 0.6931471806f;
  const float p = 1.f + f * (1.f + f * (0.5f + f * (1.f / 6 + f * (1.f / 24 + f * (1.f / 120 + f * (1.f / 720))))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// 16 floats: AVX-512 registers where the CPU has them, pairs of AVX2 registers otherwise.
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // for loads from any row
constexpr int kLanes = 16;

inline v16 load16(const float* src) { return *reinterpret_cast<const v16u*>(src); }

// Lane sums of 16 vectors as one vector (out[t] = sum of x[t]'s lanes): a shuffle tree that
// halves the lanes of each pair per level, 15 adds for 16 dot products where 16 horizontal
// sums would take 64 operations.
inline v16 lane_sums(const v16* x) {
  v16 a[8], b[4], c[2];
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

// A page's n rows of D values as fp32 with row stride `stride`: in place for fp32, widened
// into `buf` (stride D) otherwise.
template <typename T, int D>
inline const float* page_f32(const T* src, int64_t stride, int n, float* buf, int64_t& out_stride) {
  if constexpr (std::is_same_v<T, float>) {
    out_stride = stride;
    return src;
  } else {
    for (int t = 0; t < n; ++t) {
      for (int d = 0; d < D; ++d) buf[t * D + d] = widen(src[t * stride + d]);
    }
    out_stride = D;
    return buf;
  }
}

// Requests the page kPrefetchPages ahead while this one is computed: memory stays busy
// during the arithmetic, also where a fragmented block table defeats the hardware prefetcher.
template <typename T, int D>
inline void prefetch_page(const T* page, int64_t stride, int n) {
  if (!page) return;
  for (int t = 0; t < n; ++t) {
    const char* c = reinterpret_cast<const char*>(page + t * stride);
    for (int off = 0; off < D * static_cast<int>(sizeof(T)); off += 64) __builtin_prefetch(c + off);
  }
}

struct Item {
  int32_t b, h, lo, hi;  // pages [lo, hi) of the dense range or of the page list
};

template <typename T>
struct Params {
  const T *q, *k, *v;
  const int32_t *bt, *lens, *pl, *rl;
  int64_t sq_b, sq_h, sk_p, sk_h, sk_t, sv_p, sv_h, sv_t, sbt, spl_b, spl_h, spl_n;
  int64_t num_pages, max_pages, H;  // H: KV heads, the row stride of rl
  int G, page_size;
  float scale;
};

constexpr int64_t kSkipPage = -1, kBadPage = -2;

// Physical page of entry i of the item's range and its readable rows [lo, n); kSkipPage for
// padding and pages outside [first, len), kBadPage for a page id outside the pool.
template <typename T>
inline int64_t find_page(const Params<T>& p, const Item& it, int i, int64_t first, int64_t len, int& lo, int& n) {
  const int64_t lp = p.pl ? p.pl[it.b * p.spl_b + it.h * p.spl_h + i * p.spl_n] : i;
  if (lp < 0 || lp >= p.max_pages) return kSkipPage;  // pages past the table are past len
  n = static_cast<int>(std::min<int64_t>(p.page_size, len - lp * p.page_size));
  lo = static_cast<int>(std::max<int64_t>(0, first - lp * p.page_size));
  if (n <= lo) return kSkipPage;
  const int64_t phys = p.bt[it.b * p.sbt + lp];
  return phys >= 0 && phys < p.num_pages ? phys : kBadPage;
}

// Online softmax of one item's pages; acc [G, D] unnormalised, m/l [G] max and sum. Per page
// and query head, scores of 16 rows at a time (q in registers, one lane-sum tree), then the
// weighted V rows into register accumulators: the page stays in L1 across the G heads.
template <typename T, int D>
bool run_item(const Params<T>& p, const Item& it, float* __restrict__ acc, float* __restrict__ m,
              float* __restrict__ l) {
  constexpr int V = D / kLanes;
  const int G = p.G;
  const int64_t len = p.lens[it.b];
  const int64_t first = p.rl ? len - p.rl[it.b * p.H + it.h] : 0;  // the row's first readable position
  alignas(64) float qf[kMaxG * D];
  alignas(64) float s[kMaxPageSize + kLanes];
  alignas(64) float kbuf[std::is_same_v<T, float> ? 1 : kMaxPageSize * D];
  alignas(64) float vbuf[std::is_same_v<T, float> ? 1 : kMaxPageSize * D];
  for (int g = 0; g < G; ++g) {
    const T* qr = p.q + it.b * p.sq_b + (it.h * G + g) * p.sq_h;
    for (int d = 0; d < D; ++d) qf[g * D + d] = widen(qr[d]) * p.scale;
    for (int d = 0; d < D; ++d) acc[g * D + d] = 0.f;
    m[g] = kEmpty;
    l[g] = 0.f;
  }
  bool ok = true;
  for (int i = it.lo; i < it.hi; ++i) {
    int lo = 0, n = 0, lo_ahead = 0, n_ahead = 0;
    const int64_t phys = find_page(p, it, i, first, len, lo, n);
    if (phys == kBadPage) ok = false;
    if (phys < 0) continue;
    const int64_t ahead =
        i + kPrefetchPages < it.hi ? find_page(p, it, i + kPrefetchPages, first, len, lo_ahead, n_ahead) : kSkipPage;
    if (ahead >= 0) {
      prefetch_page<T, D>(p.k + ahead * p.sk_p + it.h * p.sk_h + lo_ahead * p.sk_t, p.sk_t, n_ahead - lo_ahead);
      prefetch_page<T, D>(p.v + ahead * p.sv_p + it.h * p.sv_h + lo_ahead * p.sv_t, p.sv_t, n_ahead - lo_ahead);
    }
    n -= lo;
    int64_t ks, vs;
    const float* kp = page_f32<T, D>(p.k + phys * p.sk_p + it.h * p.sk_h + lo * p.sk_t, p.sk_t, n, kbuf, ks);
    const float* vp = page_f32<T, D>(p.v + phys * p.sv_p + it.h * p.sv_h + lo * p.sv_t, p.sv_t, n, vbuf, vs);
    for (int g = 0; g < G; ++g) {
      v16 qv[V];
      for (int c = 0; c < V; ++c) qv[c] = load16(qf + g * D + c * kLanes);
      for (int t0 = 0; t0 < n; t0 += kLanes) {
        v16 part[kLanes];
        const int rows = std::min(kLanes, n - t0);
        for (int t = 0; t < kLanes; ++t) {
          v16 a = {};
          if (t < rows) {
            const float* kr = kp + (t0 + t) * ks;
            for (int c = 0; c < V; ++c) a += qv[c] * load16(kr + c * kLanes);
          }
          part[t] = a;
        }
        *reinterpret_cast<v16u*>(s + t0) = lane_sums(part);
      }
      float mx = m[g];
      for (int t = 0; t < n; ++t) mx = std::max(mx, s[t]);
      const float alpha = exp_neg(m[g] - mx);
      float sum = 0.f;
      for (int t = 0; t < n; ++t) {
        s[t] = exp_neg(s[t] - mx);
        sum += s[t];
      }
      l[g] = l[g] * alpha + sum;
      m[g] = mx;
      v16 o[V];
      for (int c = 0; c < V; ++c) o[c] = load16(acc + g * D + c * kLanes) * alpha;
      for (int t = 0; t < n; ++t) {
        const float* vr = vp + t * vs;
        for (int c = 0; c < V; ++c) o[c] += s[t] * load16(vr + c * kLanes);
      }
      for (int c = 0; c < V; ++c) *reinterpret_cast<v16u*>(acc + g * D + c * kLanes) = o[c];
    }
  }
  return ok;
}

// Splits per (sequence, KV head): about kItemsPerThread items per thread, none shorter than
// kMinSplitTokens, pages shared out evenly within a sequence.
std::vector<Item> plan(const std::vector<int64_t>& count, int64_t hkv, int64_t page_size,
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

template <typename T, int D>
void decode(const Params<T>& p, const std::vector<Item>& items, const std::vector<int64_t>& group_begin,
            int64_t B, int64_t hkv, T* out, int64_t so_b, int64_t so_h, float* lse) {
  const int G = p.G;
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<float> pacc(std::max<int64_t>(1, n_items) * G * D), pm(n_items * G + 1), pl(n_items * G + 1);
  std::atomic<int64_t> next{0};
  std::atomic<bool> ok{true};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1)) < n_items;) {
      if (!run_item<T, D>(p, items[i], pacc.data() + i * G * D, pm.data() + i * G, pl.data() + i * G)) {
        ok = false;
      }
    }
  });
  TORCH_CHECK(ok.load(), "paged_decode_cpu: block_table holds a page id outside the KV pool");
  at::parallel_for(0, B * hkv, kMergeGrain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / hkv, h = bh % hkv;
      for (int g = 0; g < G; ++g) {
        float mx = kEmpty, sum = 0.f;
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
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        T* dst = out + b * so_b + (h * G + g) * so_h;
        for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(o[d] * inv);
        if (lse) {
          lse[b * hkv * G + h * G + g] = sum > 0.f ? mx + std::log(sum) : -std::numeric_limits<float>::infinity();
        }
      }
    }
  });
}

}  // namespace

// q [B, Hq, D]; k, v [num_pages, Hkv, page_size, D] (any strides, unit stride over D);
// block_table int32 [B, max_pages]; seq_lens int32 [B]; page_lists int32 [B, Hkv, n] or empty;
// row_lens int32 [B, Hkv] (contiguous) or empty: head h reads positions [seq_len - row_len, seq_len).
// Returns out [B, Hq, D] in q's dtype and lse float32 [B, Hq] (empty unless asked).
std::vector<at::Tensor> paged_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& block_table, const at::Tensor& seq_lens,
                                     const std::optional<at::Tensor>& page_lists,
                                     const std::optional<at::Tensor>& row_lens, double scale, bool return_lse) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q must be [B, Hq, D], k/v [pages, Hkv, page, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dim must have unit stride");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && seq_lens.scalar_type() == at::kInt, "int32 tables");
  TORCH_CHECK(block_table.dim() == 2 && block_table.stride(1) == 1 && seq_lens.is_contiguous(), "table layout");
  const int64_t B = q.size(0), hq = q.size(1), D = q.size(2), hkv = k.size(1), ps = k.size(2);
  TORCH_CHECK(k.size(3) == D && hq % hkv == 0 && hq / hkv <= kMaxG, "head shapes");
  TORCH_CHECK(ps <= kMaxPageSize && block_table.size(0) == B && seq_lens.size(0) == B, "table shapes");
  const bool sparse = page_lists.has_value() && page_lists->defined();
  if (sparse) {
    TORCH_CHECK(page_lists->scalar_type() == at::kInt && page_lists->dim() == 3, "page_lists int32 [B, Hkv, n]");
    TORCH_CHECK(page_lists->size(0) == B && page_lists->size(1) == hkv, "page_lists shape");
  }
  const bool rows = row_lens.has_value() && row_lens->defined();
  if (rows) {
    TORCH_CHECK(row_lens->scalar_type() == at::kInt && row_lens->is_contiguous(), "row_lens int32, contiguous");
    TORCH_CHECK(row_lens->dim() == 2 && row_lens->size(0) == B && row_lens->size(1) == hkv, "row_lens [B, Hkv]");
  }
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  std::vector<int64_t> count(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pages = (std::max<int32_t>(lens[b], 0) + ps - 1) / ps;
    TORCH_CHECK(sparse || pages <= block_table.size(1), "seq_lens exceed the block table");
    count[b] = sparse ? page_lists->size(2) : pages;
  }
  std::vector<int64_t> group_begin;
  const std::vector<Item> items = plan(count, hkv, ps, group_begin);
  at::Tensor out = at::empty({B, hq, D}, q.options());
  at::Tensor lse = return_lse ? at::empty({B, hq}, q.options().dtype(at::kFloat)) : at::Tensor();
  auto run = [&](auto tag, auto dim) {
    using T = decltype(tag);
    Params<T> p{q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), block_table.data_ptr<int32_t>(), lens,
                sparse ? page_lists->data_ptr<int32_t>() : nullptr, rows ? row_lens->data_ptr<int32_t>() : nullptr,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                block_table.stride(0), sparse ? page_lists->stride(0) : 0, sparse ? page_lists->stride(1) : 0,
                sparse ? page_lists->stride(2) : 0, k.size(0), block_table.size(1), hkv,
                static_cast<int>(hq / hkv), static_cast<int>(ps), static_cast<float>(scale)};
    decode<T, decltype(dim)::value>(p, items, group_begin, B, hkv, out.data_ptr<T>(), out.stride(0), out.stride(1),
                                    return_lse ? lse.data_ptr<float>() : nullptr);
  };
  auto by_dim = [&](auto tag) {
    switch (D) {
      case 32: return run(tag, std::integral_constant<int, 32>{});
      case 64: return run(tag, std::integral_constant<int, 64>{});
      case 128: return run(tag, std::integral_constant<int, 128>{});
      default: TORCH_CHECK(false, "paged_decode_cpu: head dim ", D, " not compiled (32, 64, 128)");
    }
  };
  if (q.scalar_type() == at::kFloat) {
    by_dim(float{});
  } else {
    by_dim(c10::BFloat16{});
  }
  return {out, lse};
}

TORCH_LIBRARY(sparsekv_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k, Tensor v, Tensor block_table, Tensor seq_lens, Tensor? page_lists, "
        "Tensor? row_lens, float scale, bool return_lse) -> Tensor[]", &paged_decode);
}
