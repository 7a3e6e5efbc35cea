// Input-sparse products on CPU for activation-sparse FFNs (TEAL, WINA, CHESS): read only the
// weight rows of active channels.
//
// sparse_matvec: y = (x ⊙ mask) @ Wt with Wt [K, N] (an input channel's weights contiguous)
// and mask[b, k] = |x[b, k]| * scale[k] > thr[k]. The batch reads the union of its rows'
// active channels, each row adds only its own: a row's result is the one it gets alone.
// Each thread owns a contiguous range of output columns and streams the active rows over it,
// accumulating into the output rows (in L1/L2), so weight reads are sequential within a row.
// gather_dot: out[b, j] = x[b] · M[idx[j]] (output-sparse: only the listed rows of M [K, N]).
// Built into the one CPU kernel library (attention/kernels/cpu_build.py), with light ATen headers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kColumnGrain = 64;  // output columns per thread at least (one row's cache lines)
constexpr int kPrefetchRows = 4;  // active rows requested ahead of the one being read

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
  // the union of active channels, with each row's value there (0 where that row is inactive)
  std::vector<int64_t> idx;
  std::vector<float> xs;
  idx.reserve(K);
  xs.reserve(K * B);
  for (int64_t k = 0; k < K; ++k) {
    const float s = sp ? sp[k] : 1.0f;
    bool any = false;
    for (int64_t b = 0; b < B; ++b) any |= std::fabs(xp[b * K + k]) * s > tp[k];
    if (!any) continue;
    idx.push_back(k);
    for (int64_t b = 0; b < B; ++b) {
      const float v = xp[b * K + k];
      xs.push_back(std::fabs(v) * s > tp[k] ? v : 0.0f);
    }
  }
  at::Tensor out = at::zeros({B, N}, x.options());
  float* op = out.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const int64_t nnz = static_cast<int64_t>(idx.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / kColumnGrain));
  const int64_t width = (N + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * width, n1 = std::min(N, n0 + width);
      for (int64_t j = 0; j < nnz; ++j) {
        if (j + kPrefetchRows < nnz) __builtin_prefetch(wp + idx[j + kPrefetchRows] * N + n0);
        const float* w = wp + idx[j] * N;
        for (int64_t b = 0; b < B; ++b) {
          const float a = xs[j * B + b];
          if (a == 0.0f) continue;
          float* y = op + b * N;
          for (int64_t n = n0; n < n1; ++n) y[n] += a * w[n];
        }
      }
    }
  });
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
