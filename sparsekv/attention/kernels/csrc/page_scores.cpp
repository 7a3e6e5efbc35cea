// Page scores for decode-time selection, each a single call per layer (their PyTorch forms took
// about twenty small ops per layer, more than the attention they saved below ~4K tokens on a
// 2-core CPU):
// - quest_select: Quest's page selection for a decode step: per (sequence, KV head) the upper bound
// of q.k over each page's keys from the element-wise key bounds (max over the GQA group's query
// heads of sum_d max(q_d kmin_d, q_d kmax_d)), grouped into selection pages of `ratio` pool
// pages (max), the last `recent` selection pages forced, the `budget` best kept in page order
// and written out as logical pool pages (the rule of quest.py with page_select.select_pages).
// - delta_page_mass: DELTA's page mass at a Δ-layer: per page, the sum over its tokens of the
// token's largest softmax probability over the query heads (all, or each KV group's), from the
// keys and the log-sum-exp the dense decode returned (delta.py's page_mass).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "decode_common.h"

namespace {

using namespace sparsekv_decode;

// Upper bound of q.k over one page for each of the G query heads, max over them.
template <typename T, int D>
inline float page_bound(const float* qf, int G, const T* lo, const T* hi) {
  constexpr int V = D / kLanes;
  alignas(64) float kl[D], kh[D];
  for (int d = 0; d < D; ++d) kl[d] = widen(lo[d]), kh[d] = widen(hi[d]);
  float best = -std::numeric_limits<float>::infinity();
  for (int g = 0; g < G; ++g) {
    vf acc = {};
    for (int c = 0; c < V; ++c) {
      const vf qv = loadv(qf + g * D + c * kLanes);
      const vf a = qv * loadv(kl + c * kLanes), b = qv * loadv(kh + c * kLanes);
      acc += a > b ? a : b;
    }
    best = std::max(best, lanes_sum(acc));
  }
  return best;
}

}  // namespace

// q [B, Hq, D]; kmin, kmax [num_pages, Hkv, D] (any page/head strides, unit stride over D);
// block_table int32 [B, max_pages]; seq_lens int32 [B] (each sequence must have more than
// `budget` selection pages). Returns page lists int32 [B, Hkv, budget * ratio] of logical pool
// pages in order (-1 past the context) and the listed tokens per sequence, summed over KV heads.
std::vector<at::Tensor> quest_select(const at::Tensor& q, const at::Tensor& kmin, const at::Tensor& kmax,
                                     const at::Tensor& block_table, const at::Tensor& seq_lens, int64_t page_size,
                                     int64_t ratio, int64_t budget, int64_t recent) {
  TORCH_CHECK(q.dim() == 3 && kmin.dim() == 3 && kmin.sizes() == kmax.sizes(), "q [B, Hq, D], bounds [pages, Hkv, D]");
  TORCH_CHECK(q.stride(2) == 1 && kmin.stride(2) == 1 && kmax.stride(2) == 1 && kmin.strides() == kmax.strides(),
              "unit stride over D, kmin and kmax alike");
  TORCH_CHECK(kmin.scalar_type() == kmax.scalar_type() && q.scalar_type() == kmin.scalar_type(), "dtypes differ");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1 && seq_lens.scalar_type() == at::kInt &&
              seq_lens.is_contiguous(), "int32 tables");
  TORCH_CHECK(ratio >= 1 && budget >= 1 && recent >= 0 && page_size >= 1, "bad selection sizes");
  const int64_t B = q.size(0), hq = q.size(1), D = q.size(2), hkv = kmin.size(1), width = budget * ratio;
  TORCH_CHECK(kmin.size(2) == D && hq % hkv == 0 && hq / hkv <= kMaxG && block_table.size(0) == B, "shapes");
  const int G = static_cast<int>(hq / hkv);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  at::Tensor lists = at::empty({B, hkv, width}, block_table.options());
  at::Tensor tokens = at::zeros({B, hkv}, block_table.options().dtype(at::kLong));
  int32_t* out = lists.data_ptr<int32_t>();
  int64_t* tok = tokens.data_ptr<int64_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  std::atomic<bool> ok{true};
  auto run = [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int Dc = decltype(dim)::value;
    const T *lo = kmin.data_ptr<T>(), *hi = kmax.data_ptr<T>();
    at::parallel_for(0, B * hkv, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float qf[kMaxG * Dc];
      std::vector<float> coarse;
      std::vector<int32_t> order;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / hkv, h = bh % hkv, len = lens[b];
        const int64_t pages = (len + page_size - 1) / page_size, sel = (pages + ratio - 1) / ratio;
        if (sel <= budget || pages > block_table.size(1)) {
          ok = false;
          continue;
        }
        load_queries<T, Dc>(q.data_ptr<T>(), q.stride(0), q.stride(1), Item{int32_t(b), int32_t(h), 0, 0}, G, 1.f, qf);
        coarse.assign(sel, -std::numeric_limits<float>::infinity());
        for (int64_t p = 0; p < pages; ++p) {
          const int64_t phys = bt[b * block_table.stride(0) + p];
          const int64_t off = phys * kmin.stride(0) + h * kmin.stride(1);
          coarse[p / ratio] = std::max(coarse[p / ratio], page_bound<T, Dc>(qf, G, lo + off, hi + off));
        }
        for (int64_t c = std::max<int64_t>(0, sel - recent); c < sel; ++c) coarse[c] = std::numeric_limits<float>::infinity();
        order.resize(sel);
        std::iota(order.begin(), order.end(), 0);
        std::nth_element(order.begin(), order.begin() + budget, order.end(), [&](int32_t a, int32_t b2) {
          return coarse[a] > coarse[b2] || (coarse[a] == coarse[b2] && a < b2);
        });
        std::sort(order.begin(), order.begin() + budget);
        int32_t* row = out + bh * width;
        int64_t n_tok = 0;
        for (int64_t i = 0; i < budget; ++i) {
          for (int64_t r = 0; r < ratio; ++r) {
            const int64_t p = int64_t(order[i]) * ratio + r;
            row[i * ratio + r] = p < pages ? static_cast<int32_t>(p) : -1;
            if (p < pages) n_tok += std::min<int64_t>(page_size, len - p * page_size);
          }
        }
        tok[bh] = n_tok;
      }
    });
  };
  dispatch_dtype_dim(q.scalar_type(), D, "quest_select", run);
  TORCH_CHECK(ok.load(), "quest_select: every sequence needs more than `budget` selection pages within its block table");
  return {lists, tokens.sum(1)};
}

// q [B, Hq, D]; k [num_pages, Hkv, page_size, D] (any strides, unit stride over D);
// block_table int32 [B, max_pages]; seq_lens int32 [B]; lse float32 [B, Hq] of the scaled
// logits. Returns float32 [B, Hkv if per_group else 1, max_pages] (0 past a sequence's pages).
at::Tensor delta_page_mass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& block_table,
                           const at::Tensor& seq_lens, const at::Tensor& lse, double scale, bool per_group) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && q.stride(2) == 1 && k.stride(3) == 1, "q [B, Hq, D], k [pages, Hkv, ps, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && lse.scalar_type() == at::kFloat && lse.is_contiguous(), "dtypes");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.stride(1) == 1 && seq_lens.scalar_type() == at::kInt &&
              seq_lens.is_contiguous(), "int32 tables");
  const int64_t B = q.size(0), hq = q.size(1), D = q.size(2), hkv = k.size(1), ps = k.size(2), width = block_table.size(1);
  TORCH_CHECK(k.size(3) == D && hq % hkv == 0 && block_table.size(0) == B && lse.size(0) == B && lse.size(1) == hq,
              "shapes");
  const int64_t G = hq / hkv, rows = per_group ? hkv : 1;
  at::Tensor out = at::zeros({B, rows, width}, q.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int32_t *bt = block_table.data_ptr<int32_t>(), *lens = seq_lens.data_ptr<int32_t>();
  const float* ls = lse.data_ptr<float>();
  std::atomic<bool> ok{true};
  auto run = [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int Dc = decltype(dim)::value, V = Dc / kLanes;
    const T* kp = k.data_ptr<T>();
    at::parallel_for(0, B * width, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(hq * Dc);
      alignas(64) float kr[Dc];
      int64_t loaded = -1;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / width, p = i % width, len = lens[b];
        if (p * ps >= len) continue;
        if (b != loaded) {
          load_queries<T, Dc>(q.data_ptr<T>(), q.stride(0), q.stride(1), Item{int32_t(b), 0, 0, 0}, int(hq),
                              static_cast<float>(scale), qf.data());
          loaded = b;
        }
        const int64_t phys = bt[b * block_table.stride(0) + p], n = std::min<int64_t>(ps, len - p * ps);
        if (phys < 0 || phys >= k.size(0)) {
          ok = false;
          continue;
        }
        float* mass = o + b * rows * width + p;
        for (int64_t t = 0; t < n; ++t) {
          float top_all = 0.f;
          for (int64_t h = 0; h < hkv; ++h) {
            const T* row = kp + phys * k.stride(0) + h * k.stride(1) + t * k.stride(2);
            for (int d = 0; d < Dc; ++d) kr[d] = widen(row[d]);
            float top = 0.f;
            for (int64_t g = 0; g < G; ++g) {
              vf acc = {};
              for (int c = 0; c < V; ++c) acc += loadv(qf.data() + (h * G + g) * Dc + c * kLanes) * loadv(kr + c * kLanes);
              top = std::max(top, std::exp(lanes_sum(acc) - ls[b * hq + h * G + g]));
            }
            if (per_group) mass[h * width] += top;
            top_all = std::max(top_all, top);
          }
          if (!per_group) mass[0] += top_all;
        }
      }
    });
  };
  dispatch_dtype_dim(q.scalar_type(), D, "delta_page_mass", run);
  TORCH_CHECK(ok.load(), "delta_page_mass: block_table holds a page id outside the KV pool");
  return out;
}

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("delta_page_mass(Tensor q, Tensor k, Tensor block_table, Tensor seq_lens, Tensor lse, float scale, "
        "bool per_group) -> Tensor", &delta_page_mass);
  m.def("quest_select(Tensor q, Tensor kmin, Tensor kmax, Tensor block_table, Tensor seq_lens, int page_size, "
        "int ratio, int budget, int recent) -> Tensor[]", &quest_select);
}
