// Input-sparse products on CPU for activation-sparse FFNs (TEAL, WINA, CHESS): read only the
// weight rows of active channels.
//
// sparse_matvec: y = (x ⊙ mask) @ Wt with Wt [K, N] (an input channel's weights contiguous)
// and mask[b, k] = |x[b, k]| * scale[k] > thr[k]. The batch reads the union of its rows'
// active channels, each row adds only its own: a row's result is the one it gets alone.
// The active rows are split between the threads, each streaming whole contiguous rows into its
// own accumulator (in L1) four rows per pass, so the accumulator is loaded and stored once per
// four weight rows; the partial sums are added at the end. Skipped rows break the hardware
// prefetcher's streams, so each pass also requests the same columns of the next four rows.
// gather_dot: out[b, j] = x[b] · M[idx[j]] (output-sparse: only the listed rows of M [K, N]).
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

void check(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), name, " must be contiguous with ", dim, " dims");
}

at::Tensor sparse_matvec(const at::Tensor& x, const c10::optional<at::Tensor>& scale, const at::Tensor& thr,
                         const at::Tensor& wt) {
  check(x, "x", 2);
  check(thr, "thr", 1);
  check(wt, "wt", 2);
  const int64_t B = x.size(0), K = x.size(1), N = wt.size(1);
  TORCH_CHECK(wt.size(0) == K && thr.size(0) == K, "x, thr and wt disagree on the input size");
  const float* xp = x.data_ptr<float>();
  const float* tp = thr.data_ptr<float>();
  const float* sp = nullptr;
  if (scale.has_value()) {
    check(*scale, "scale", 1);
    TORCH_CHECK(scale->size(0) == K, "scale must have one entry per input channel");
    sp = scale->data_ptr<float>();
  }
  // the union of active channels, with each row's value there (0 where that row is inactive),
  // compacted without branches (a mispredicted branch per channel cost as much as its row)
  std::unique_ptr<int64_t[]> idx(new int64_t[K]);
  std::unique_ptr<float[]> xs(new float[K * B]);
  int64_t nnz = 0;
  for (int64_t k = 0; k < K; ++k) {
    const float s = sp ? sp[k] : 1.0f;
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      const float v = xp[b * K + k];
      const bool on = std::fabs(v) * s > tp[k];
      xs[nnz * B + b] = on ? v : 0.0f;
      any |= on;
    }
    idx[nnz] = k;
    nnz += any;
  }
  const int64_t threads = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), nnz * N / kMinThreadFloats));
  // thread 0 sums into the output, the others into their own rows of `part`, added at the end
  at::Tensor out = at::empty({B, N}, x.options());
  std::unique_ptr<float[]> part(new float[(threads - 1) * B * N]);
  float* op = out.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
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
          float a[kRowBlock];
          bool any = false;
          for (int r = 0; r < kRowBlock; ++r) {
            a[r] = r < rows ? xs[(j + r) * B + b] : 0.0f;
            any |= a[r] != 0.0f;
          }
          if (!any) continue;
          float* y = acc + b * N;
          v16 av[kRowBlock];
          for (int r = 0; r < kRowBlock; ++r) av[r] = splat(a[r]);
          for (int64_t n = 0; n < nv; n += kLanes) {
            if (b == 0)
              for (int r = 0; r < kRowBlock; ++r) __builtin_prefetch(ahead[r] + n, 0, 2);
            v16 s = load16(y + n);
            for (int r = 0; r < kRowBlock; ++r) s += av[r] * load16(w[r] + n);
            *reinterpret_cast<v16u*>(y + n) = s;
          }
          for (int64_t n = nv; n < N; ++n)
            for (int r = 0; r < kRowBlock; ++r) y[n] += a[r] * w[r][n];
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

at::Tensor gather_dot(const at::Tensor& x, const at::Tensor& m, const at::Tensor& idx) {
  check(x, "x", 2);
  check(m, "m", 2);
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 1 && idx.is_contiguous(), "idx must be int64 [n]");
  const int64_t B = x.size(0), N = x.size(1), n = idx.size(0);
  TORCH_CHECK(m.size(1) == N, "x and m disagree on the row length");
  at::Tensor out = at::empty({B, n}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* mp = m.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 16, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* row = mp + ip[j] * N;
      for (int64_t b = 0; b < B; ++b) {
        const float* xr = xp + b * N;
        float acc = 0.0f;
        for (int64_t c = 0; c < N; ++c) acc += xr[c] * row[c];
        op[b * n + j] = acc;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("ffn_sparse_matvec(Tensor x, Tensor? scale, Tensor thr, Tensor wt) -> Tensor", &sparse_matvec);
  m.def("ffn_gather_dot(Tensor x, Tensor m, Tensor idx) -> Tensor", &gather_dot);
}
