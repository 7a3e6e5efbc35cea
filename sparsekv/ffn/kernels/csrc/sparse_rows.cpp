// Input-sparse products on CPU for activation-sparse FFNs (TEAL, WINA, CHESS): read only the
// weight rows of active channels.
//
// sparse_matvec: y = (x ⊙ mask) @ Wt with Wt [K, N] (an input channel's weights contiguous)
// and mask[b, k] = |x[b, k]| * scale[k] > thr[k], or, with topk > 0, each row's top-k scores
// (ties at the k-th all kept). The batch reads the union of its rows' active channels, each
// row adds only its own: a row's result is the one it gets alone.
// gated_sparse_down: CHESS's MLP tail, y = (act ⊙ [|act| > thr] ⊙ (x @ Wup^T)) @ Wt_down, the
// up projection computed only on the union of active channels (output-sparse) and the down
// projection reading only their rows; one call instead of a dozen small ATen ops per layer.
// Both end in accumulate(): the active rows are split between the threads, each streaming
// whole contiguous rows into its own accumulator eight rows per pass: a chunk of the eight
// rows is loaded once and meets every batch row, whose accumulator is loaded and stored once
// per eight weight rows; the partial sums are added at the end. Skipped rows break the hardware prefetcher's streams, so each pass also requests
// the same columns of the rows two passes ahead.
// Built into the one CPU kernel library (attention/kernels/cpu_build.py), with light ATen headers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "../../../attention/kernels/csrc/decode_common.h"

namespace {

using sparsekv_decode::kLanes;
using sparsekv_decode::loadv;
using sparsekv_decode::splat;
using sparsekv_decode::vf;
using sparsekv_decode::vfu;

constexpr int kRowBlock = 8;  // weight rows per pass over the accumulator
constexpr int64_t kMinThreadFloats = 16384;  // weight floats per thread at least (64 KiB): fewer run on one
constexpr int64_t kDotGrain = 64;  // up-projection rows per task

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be contiguous with ", dim, " dims");
}

// The union of a batch's active channels: idx[j] the channel, xs[j * B + b] row b's value
// there (0 where that row is inactive).
struct Active {
  std::unique_ptr<int64_t[]> idx;
  std::unique_ptr<float[]> xs;
  int64_t nnz = 0;
  Active(int64_t K, int64_t B) : idx(new int64_t[K]), xs(new float[K * B]) {}
};

const float* checked(const at::Tensor& t, const char* name, int64_t dim) {
  check(t, name, dim);
  return t.data_ptr<float>();
}

// Which inputs row b keeps: |x| * scale > thr per channel, or with topk > 0 the row's top-k
// scores (ties at the k-th all kept; a zero input adds nothing, so its row is never read).
struct InputRule {
  const float* x;
  const float* scale = nullptr;
  const float* thr;
  int64_t B, K;
  std::vector<float> cut;  // topk: the k-th largest score of each row

  InputRule(const at::Tensor& xt, const c10::optional<at::Tensor>& st, const at::Tensor& tt, int64_t topk)
      : x(checked(xt, "x", 2)), thr(checked(tt, "thr", 1)), B(xt.size(0)), K(xt.size(1)) {
    TORCH_CHECK(tt.size(0) == K, "x and thr disagree on the input size");
    TORCH_CHECK(topk >= 0 && topk <= K, "topk must be in [0, ", K, "]");
    if (st.has_value()) {
      scale = checked(*st, "scale", 1);
      TORCH_CHECK(st->size(0) == K, "scale must have one entry per input channel");
    }
    if (topk == 0) return;
    cut.resize(B);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {  // a selection per row: rows in parallel
      std::vector<float> row(K);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t k = 0; k < K; ++k) row[k] = score(b, k);
        std::nth_element(row.begin(), row.begin() + (K - topk), row.end());
        cut[b] = row[K - topk];
      }
    });
  }
  float score(int64_t b, int64_t k) const { return std::fabs(x[b * K + k]) * (scale ? scale[k] : 1.0f); }
  bool on(int64_t b, int64_t k) const {
    return cut.empty() ? score(b, k) > thr[k] : score(b, k) >= cut[b] && x[b * K + k] != 0.0f;
  }
};

// Compacted without branches (a mispredicted branch per channel cost as much as its row).
// value(b, k) is what row b adds for channel k when on(b, k).
template <typename On, typename Value>
Active select(int64_t B, int64_t K, On on, Value value) {
  Active a(K, B);
  for (int64_t k = 0; k < K; ++k) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      const bool keep = on(b, k);
      a.xs[a.nnz * B + b] = keep ? value(b, k) : 0.0f;
      any |= keep;
    }
    a.idx[a.nnz] = k;
    a.nnz += any;
  }
  return a;
}

at::Tensor accumulate(const Active& a, int64_t B, const at::Tensor& wt) {
  const int64_t N = wt.size(1), nnz = a.nnz;
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), nnz * N / kMinThreadFloats));
  // thread 0 sums into the output, the others into their own rows of `part`, added at the end
  at::Tensor out = at::empty({B, N}, wt.options());
  std::unique_ptr<float[]> part(new float[(threads - 1) * B * N]);
  float* op = out.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const int64_t* idx = a.idx.get();
  const float* xs = a.xs.get();
  const int64_t nv = N - N % kLanes;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = nnz * t / threads, j1 = nnz * (t + 1) / threads;
      float* acc = t == 0 ? op : part.get() + (t - 1) * B * N;
      std::fill(acc, acc + B * N, 0.0f);
      std::vector<float> c(B * kRowBlock);  // the block's input values, row-major per batch row
      for (int64_t j = j0; j < j1; j += kRowBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, j1 - j));
        const float* w[kRowBlock];
        const float* ahead[kRowBlock];
        for (int r = 0; r < kRowBlock; ++r) {
          w[r] = wp + idx[j + std::min(r, rows - 1)] * N;  // a short block repeats its last row with weight 0
          ahead[r] = wp + idx[std::min(j + 2 * kRowBlock + r, nnz - 1)] * N;
          for (int64_t b = 0; b < B; ++b) c[b * kRowBlock + r] = r < rows ? xs[(j + r) * B + b] : 0.0f;
        }
        // each chunk of the block's weights is loaded once and meets every batch row
        for (int64_t n = 0; n < nv; n += kLanes) {
          for (int r = 0; r < kRowBlock; ++r) __builtin_prefetch(ahead[r] + n, 0, 2);
          vf wv[kRowBlock];
          for (int r = 0; r < kRowBlock; ++r) wv[r] = loadv(w[r] + n);
          for (int64_t b = 0; b < B; ++b) {
            const float* cb = c.data() + b * kRowBlock;
            vf sum = loadv(acc + b * N + n);
            for (int r = 0; r < kRowBlock; ++r) sum += splat(cb[r]) * wv[r];
            *reinterpret_cast<vfu*>(acc + b * N + n) = sum;
          }
        }
        for (int64_t b = 0; b < B; ++b)
          for (int64_t n = nv; n < N; ++n)
            for (int r = 0; r < kRowBlock; ++r) acc[b * N + n] += c[b * kRowBlock + r] * w[r][n];
      }
    }
  });
  for (int64_t t = 1; t < threads; ++t) {
    const float* src = part.get() + (t - 1) * B * N;
    for (int64_t i = 0; i < B * N; ++i) op[i] += src[i];
  }
  return out;
}

at::Tensor sparse_matvec(const at::Tensor& x, const c10::optional<at::Tensor>& scale, const at::Tensor& thr,
                         const at::Tensor& wt, int64_t topk) {
  const InputRule rule(x, scale, thr, topk);
  check(wt, "wt", 2);
  TORCH_CHECK(wt.size(0) == rule.K, "x and wt disagree on the input size");
  return accumulate(select(rule.B, rule.K, [&](int64_t b, int64_t k) { return rule.on(b, k); },
                           [&](int64_t b, int64_t k) { return rule.x[b * rule.K + k]; }),
                    rule.B, wt);
}

// x with the dropped inputs zeroed: the input of the dense GEMM for batches whose union of
// active inputs covers nearly every weight row (one op instead of the mask's half-dozen).
at::Tensor masked_input(const at::Tensor& x, const c10::optional<at::Tensor>& scale, const at::Tensor& thr,
                        int64_t topk) {
  const InputRule rule(x, scale, thr, topk);
  at::Tensor out = at::empty_like(x);
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < rule.B; ++b)
    for (int64_t k = 0; k < rule.K; ++k) op[b * rule.K + k] = rule.on(b, k) ? rule.x[b * rule.K + k] : 0.0f;
  return out;
}

at::Tensor gated_sparse_down(const at::Tensor& x, const at::Tensor& act, const at::Tensor& w_up,
                             const at::Tensor& thr, const at::Tensor& wt_down) {
  check(x, "x", 2);
  check(act, "act", 2);
  check(w_up, "w_up", 2);
  check(thr, "thr", 1);
  check(wt_down, "wt_down", 2);
  const int64_t B = x.size(0), H = x.size(1), I = act.size(1);
  TORCH_CHECK(act.size(0) == B && w_up.size(0) == I && w_up.size(1) == H && thr.size(0) == I && wt_down.size(0) == I,
              "x [B, H], act [B, I], w_up [I, H], thr [I] and wt_down [I, N] disagree");
  const float* xp = x.data_ptr<float>();
  const float* ap = act.data_ptr<float>();
  const float* tp = thr.data_ptr<float>();
  // first the mask with the activations, then the up projection's dot products on its union
  Active a = select(B, I, [&](int64_t b, int64_t i) { return std::fabs(ap[b * I + i]) > tp[i]; },
                    [&](int64_t b, int64_t i) { return ap[b * I + i]; });
  const float* up = w_up.data_ptr<float>();
  at::parallel_for(0, a.nnz, kDotGrain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = up + a.idx[j] * H;
      for (int64_t b = 0; b < B; ++b) {
        float& h = a.xs[j * B + b];
        if (h == 0.0f) continue;
        float dot = 0.0f;
        for (int64_t c = 0; c < H; ++c) dot += xp[b * H + c] * row[c];
        h *= dot;
      }
    }
  });
  return accumulate(a, B, wt_down);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("ffn_sparse_matvec(Tensor x, Tensor? scale, Tensor thr, Tensor wt, int topk=0) -> Tensor", &sparse_matvec);
  m.def("ffn_masked_input(Tensor x, Tensor? scale, Tensor thr, int topk=0) -> Tensor", &masked_input);
  m.def("ffn_gated_sparse_down(Tensor x, Tensor act, Tensor w_up, Tensor thr, Tensor wt_down) -> Tensor",
        &gated_sparse_down);
}
