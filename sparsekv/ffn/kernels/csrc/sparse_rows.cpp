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
// whole contiguous rows into its own accumulator (in L1) eight rows per pass, so the
// accumulator is loaded and stored once per eight weight rows; the partial sums are added at
// the end. Skipped rows break the hardware prefetcher's streams, so each pass also requests
// the same columns of the rows two passes ahead.
// Built into the one CPU kernel library (attention/kernels/cpu_build.py), with light ATen headers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "../../../attention/kernels/csrc/decode_common.h"

namespace {

using sparsekv_decode::kLanes;
using sparsekv_decode::load16;
using sparsekv_decode::splat;
using sparsekv_decode::v16;
using sparsekv_decode::v16u;

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

// The k-th largest of row b's scores (|x| * scale): the row keeps the scores at or above it.
std::vector<float> topk_cuts(const float* xp, const float* sp, int64_t B, int64_t K, int64_t topk) {
  std::vector<float> cuts(B), score(K);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) score[k] = std::fabs(xp[b * K + k]) * (sp ? sp[k] : 1.0f);
    std::nth_element(score.begin(), score.begin() + (K - topk), score.end());
    cuts[b] = score[K - topk];
  }
  return cuts;
}

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
      for (int64_t j = j0; j < j1; j += kRowBlock) {
        const int rows = static_cast<int>(std::min<int64_t>(kRowBlock, j1 - j));
        const float* w[kRowBlock];
        const float* ahead[kRowBlock];
        for (int r = 0; r < kRowBlock; ++r) {
          w[r] = wp + idx[j + std::min(r, rows - 1)] * N;  // a short block repeats its last row with weight 0
          ahead[r] = wp + idx[std::min(j + 2 * kRowBlock + r, nnz - 1)] * N;
        }
        for (int64_t b = 0; b < B; ++b) {
          float c[kRowBlock];
          bool any = false;
          for (int r = 0; r < kRowBlock; ++r) {
            c[r] = r < rows ? xs[(j + r) * B + b] : 0.0f;
            any |= c[r] != 0.0f;
          }
          if (!any) continue;
          float* y = acc + b * N;
          v16 cv[kRowBlock];
          for (int r = 0; r < kRowBlock; ++r) cv[r] = splat(c[r]);
          for (int64_t n = 0; n < nv; n += kLanes) {
            if (b == 0)
              for (int r = 0; r < kRowBlock; ++r) __builtin_prefetch(ahead[r] + n, 0, 2);
            v16 sum = load16(y + n);
            for (int r = 0; r < kRowBlock; ++r) sum += cv[r] * load16(w[r] + n);
            *reinterpret_cast<v16u*>(y + n) = sum;
          }
          for (int64_t n = nv; n < N; ++n)
            for (int r = 0; r < kRowBlock; ++r) y[n] += c[r] * w[r][n];
        }
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
  check(x, "x", 2);
  check(thr, "thr", 1);
  check(wt, "wt", 2);
  const int64_t B = x.size(0), K = x.size(1);
  TORCH_CHECK(wt.size(0) == K && thr.size(0) == K, "x, thr and wt disagree on the input size");
  TORCH_CHECK(topk >= 0 && topk <= K, "topk must be in [0, ", K, "]");
  const float* xp = x.data_ptr<float>();
  const float* tp = thr.data_ptr<float>();
  const float* sp = nullptr;
  if (scale.has_value()) {
    check(*scale, "scale", 1);
    TORCH_CHECK(scale->size(0) == K, "scale must have one entry per input channel");
    sp = scale->data_ptr<float>();
  }
  const auto value = [&](int64_t b, int64_t k) { return xp[b * K + k]; };
  const auto score = [&](int64_t b, int64_t k) { return std::fabs(xp[b * K + k]) * (sp ? sp[k] : 1.0f); };
  if (topk == 0) return accumulate(select(B, K, [&](int64_t b, int64_t k) { return score(b, k) > tp[k]; }, value), B, wt);
  const std::vector<float> cut = topk_cuts(xp, sp, B, K, topk);  // a zero input adds nothing: never read its row
  return accumulate(select(B, K, [&](int64_t b, int64_t k) { return score(b, k) >= cut[b] && xp[b * K + k] != 0.0f; },
                           value), B, wt);
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
  m.def("ffn_gated_sparse_down(Tensor x, Tensor act, Tensor w_up, Tensor thr, Tensor wt_down) -> Tensor",
        &gated_sparse_down);
}
