// out [M, N] = x [M, K] @ w [N, K]^T (+ bias) for the few rows of a decode step (M <= 16).
// A decode step is bound by reading each weight once, but MKL's sgemm read the default model's
// weights at 0.23-0.35 of the read bandwidth at one row and 0.12-0.2 at 16 (Zen 4; the tied
// lm_head at 0.6-0.8 on a Xeon), benchmarks/small_gemm.py.
// Here each thread streams its own contiguous run of weight rows once: a tile of NB rows meets
// MB input rows in MB * NB vector accumulators, shuffle trees of kLanes turn them into dot
// products, and the tile's rows stay in L1 while the other input rows pass over them. One row:
// kLanes accumulators (8 ymm on AVX2, 16 zmm on AVX-512). Two or more: 2 x (3/4 kLanes), three
// quarters of the register file, where 4 x (kLanes / 4) and 2 x (kLanes / 2) left the FMA latency
// exposed and read each input row for fewer weight rows (AVX2, paired: 1.12-1.19x at 2 rows,
// 1.16-1.35x at 4, 1.10-1.33x at 16).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "decode_common.h"

namespace {

using sparsekv_decode::kLanes;
using sparsekv_decode::lane_sums;
using sparsekv_decode::vf;
using sparsekv_decode::widen;

constexpr int64_t kMaxRows = 16;

inline vf load(const float* src) { return sparsekv_decode::loadv(src); }
inline vf load(const c10::BFloat16* src) {  // bf16 -> fp32 is a 16-bit shift
  typedef uint16_t u16v __attribute__((vector_size(2 * kLanes), aligned(2)));
  const sparsekv_decode::vi wide = __builtin_convertvector(*reinterpret_cast<const u16v*>(src), sparsekv_decode::vi) << 16;
  return reinterpret_cast<vf>(wide);
}

// One tile: rows x[m0 .. m0+MB) against w[n0 .. n0+NB); rows past the ends are clamped to the
// last one (computed, not stored), so every tile runs the same unrolled loop.
template <typename T, int MB, int NB>
inline void tile(const T* x, int64_t sx, const T* w, int64_t sw, const T* bias, T* out, int64_t so, int64_t m0,
                 int64_t n0, int64_t M, int64_t N, int64_t K) {
  const T* xr[MB];
  const T* wr[NB];
  for (int i = 0; i < MB; ++i) xr[i] = x + std::min<int64_t>(m0 + i, M - 1) * sx;
  for (int j = 0; j < NB; ++j) wr[j] = w + std::min<int64_t>(n0 + j, N - 1) * sw;
  vf acc[MB * NB] = {};
  const int64_t kv = K - K % kLanes;
  for (int64_t k = 0; k < kv; k += kLanes) {
    vf xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = load(xr[i] + k);
    for (int j = 0; j < NB; ++j) {
      const vf wv = load(wr[j] + k);
      for (int i = 0; i < MB; ++i) acc[i * NB + j] += xv[i] * wv;
    }
  }
  float dots[MB * NB + kLanes];
  for (int g = 0; g < MB * NB; g += kLanes) {  // kLanes accumulators per shuffle tree (the last padded)
    vf part[kLanes] = {};
    for (int i = 0; i < kLanes && g + i < MB * NB; ++i) part[i] = acc[g + i];
    const vf sums = lane_sums(part);
    for (int i = 0; i < kLanes; ++i) dots[g + i] = sums[i];
  }
  for (int i = 0; i < MB && m0 + i < M; ++i) {
    for (int j = 0; j < NB && n0 + j < N; ++j) {
      float s = dots[i * NB + j];
      for (int64_t k = kv; k < K; ++k) s += widen(xr[i][k]) * widen(wr[j][k]);
      if (bias) s += widen(bias[n0 + j]);
      out[(m0 + i) * so + n0 + j] = static_cast<T>(s);
    }
  }
}

template <typename T, int MB, int NB>
void gemm(const T* x, int64_t sx, const T* w, int64_t sw, const T* bias, T* out, int64_t so, int64_t M, int64_t N,
          int64_t K) {
  const int64_t tiles = (N + NB - 1) / NB;
  // one contiguous run of tiles per thread: the hardware prefetcher sees a single stream
  const int64_t grain = std::max<int64_t>(1, (tiles + at::get_num_threads() - 1) / at::get_num_threads());
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t m0 = 0; m0 < M; m0 += MB) tile<T, MB, NB>(x, sx, w, sw, bias, out, so, m0, t * NB, M, N, K);
    }
  });
}

}  // namespace

// x [M, K] (unit stride over K, M <= 16), weight [N, K] contiguous, bias [N] or None.
at::Tensor small_gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [M, K] with unit stride over K");
  TORCH_CHECK(x.size(0) <= kMaxRows, "small_gemm takes at most ", kMaxRows, " rows");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && weight.size(1) == x.size(1), "weight must be [N, K]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight dtypes differ");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->numel() == weight.size(0) && bias->scalar_type() == x.scalar_type(),
                "bias must be [N] of x's dtype");
  }
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* b = has_bias ? bias->data_ptr<T>() : nullptr;
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    if (M == 1) {
      gemm<T, 1, kLanes>(xp, x.stride(0), wp, K, b, op, N, M, N, K);
    } else {
      gemm<T, 2, 3 * kLanes / 4>(xp, x.stride(0), wp, K, b, op, N, M, N, K);
    }
  };
  if (x.scalar_type() == at::kFloat) {
    run(float{});
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    run(c10::BFloat16{});
  }
  return out;
}

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("small_gemm(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &small_gemm);
}
