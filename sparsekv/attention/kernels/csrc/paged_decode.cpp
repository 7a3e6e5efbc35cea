// Paged decode attention on CPU: one query token per sequence, the whole batch in one call.
//
// Work items are (sequence, KV head, split) ranges of pages (flash-decoding split-K): each
// item runs an online softmax over its pages and writes an unnormalised partial output with
// its max and sum; a merge pass combines the splits. Threads pull items from an atomic
// counter, so sequences of unequal length still balance. The GQA group's G query heads
// share every page while it sits in L1; scores are computed one vector's worth of keys at a time
// (a lane-sum tree instead of a horizontal sum per key) and the weighted values accumulate in
// registers (16-float zmm with AVX-512, 8-float ymm otherwise: decode_common.h). bf16 pages
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
#include <cstdint>
#include <type_traits>
#include <vector>

#include "decode_common.h"

namespace {

using namespace sparsekv_decode;

// How far ahead rows are requested, only where the block table jumps: on consecutive pages
// software prefetches only took fill buffers from the hardware prefetcher (Zen 4: 0.6x).
constexpr int kPrefetchPages = 2;

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

template <typename T, int D>
inline void prefetch_page(const T* page, int64_t stride, int n) {
  for (int t = 0; t < n; ++t) prefetch_bytes(page + t * stride, D * static_cast<int64_t>(sizeof(T)));
}

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

// Online softmax of one item's pages (fp32 pages read in place, bf16 ones widened once).
template <typename T, int D>
bool run_item(const Params<T>& p, const Item& it, float* __restrict__ acc, float* __restrict__ m,
              float* __restrict__ l) {
  const int64_t len = p.lens[it.b];
  const int64_t first = p.rl ? len - p.rl[it.b * p.H + it.h] : 0;  // the row's first readable position
  alignas(64) float qf[kMaxG * D];
  alignas(64) float kbuf[std::is_same_v<T, float> ? 1 : kMaxPageSize * D];
  alignas(64) float vbuf[std::is_same_v<T, float> ? 1 : kMaxPageSize * D];
  load_queries<T, D>(p.q, p.sq_b, p.sq_h, it, p.G, p.scale, qf);
  reset_state<D>(p.G, acc, m, l);
  bool ok = true;
  for (int i = it.lo; i < it.hi; ++i) {
    int lo = 0, n = 0, lo_ahead = 0, n_ahead = 0;
    const int64_t phys = find_page(p, it, i, first, len, lo, n);
    if (phys == kBadPage) ok = false;
    if (phys < 0) continue;
    const int64_t ahead =
        i + kPrefetchPages < it.hi ? find_page(p, it, i + kPrefetchPages, first, len, lo_ahead, n_ahead) : kSkipPage;
    if (ahead >= 0 && ahead != phys + kPrefetchPages) {  // a consecutive run is the hardware prefetcher's
      prefetch_page<T, D>(p.k + ahead * p.sk_p + it.h * p.sk_h + lo_ahead * p.sk_t, p.sk_t, n_ahead - lo_ahead);
      prefetch_page<T, D>(p.v + ahead * p.sv_p + it.h * p.sv_h + lo_ahead * p.sv_t, p.sv_t, n_ahead - lo_ahead);
    }
    n -= lo;
    int64_t ks, vs;
    const float* kp = page_f32<T, D>(p.k + phys * p.sk_p + it.h * p.sk_h + lo * p.sk_t, p.sk_t, n, kbuf, ks);
    const float* vp = page_f32<T, D>(p.v + phys * p.sv_p + it.h * p.sv_h + lo * p.sv_t, p.sv_t, n, vbuf, vs);
    attend_rows<D>(qf, p.G, kp, ks, vp, vs, n, acc, m, l);
  }
  return ok;
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
    constexpr int Dc = decltype(dim)::value;
    const bool ok = run_and_merge<T, Dc>(
        items, group_begin, B, hkv, p.G,
        [&](const Item& it, float* acc, float* m, float* l) { return run_item<T, Dc>(p, it, acc, m, l); },
        Extra<T>{}, out.data_ptr<T>(), out.stride(0), out.stride(1), return_lse ? lse.data_ptr<float>() : nullptr);
    TORCH_CHECK(ok, "paged_decode_cpu: block_table holds a page id outside the KV pool");
  };
  dispatch_dtype_dim(q.scalar_type(), D, "paged_decode_cpu", run);
  return {out, lse};
}

TORCH_LIBRARY(sparsekv_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k, Tensor v, Tensor block_table, Tensor seq_lens, Tensor? page_lists, "
        "Tensor? row_lens, float scale, bool return_lse) -> Tensor[]", &paged_decode);
}
