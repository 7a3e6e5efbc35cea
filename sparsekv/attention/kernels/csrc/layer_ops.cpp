// The small per-layer ops of a decode step, fused: each replaces 3-8 ATen calls whose dispatch
// cost (3-10 us each, ~25 per layer) was a fifth of a SmolLM2 decode step on 2 cores.
// Rows run in parallel for prefill-sized inputs; a decode row is done inline.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

constexpr int64_t kRowGrain = 16;  // rows per task: a decode batch runs on one thread

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) { return static_cast<float>(x); }

// out = w * r / rms(r) with r = x (+ residual, written back to residual): vLLM's fused_add_rms_norm.
template <typename T>
void rms_norm_rows(const T* x, int64_t sx, T* res, int64_t sr, const T* w, T* out, int64_t so, int64_t rows,
                   int64_t h, float eps) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> r(h);
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * sx;
      float ss = 0.f;
      for (int64_t j = 0; j < h; ++j) {
        float v = widen(xi[j]);
        if (res) {
          v += widen(res[i * sr + j]);
          res[i * sr + j] = static_cast<T>(v);
          v = widen(res[i * sr + j]);  // the norm reads the stored (rounded) residual, as unfused code does
        }
        r[j] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
      for (int64_t j = 0; j < h; ++j) out[i * so + j] = static_cast<T>(widen(w[j]) * static_cast<float>(static_cast<T>(r[j] * inv)));
    }
  });
}

// In place, the half-split rotation of Hugging Face Llama checkpoints: x [T, H, D] (unit stride
// over D), cos/sin float32 [T, D/2].
template <typename T>
void rope_rows(T* x, int64_t st, int64_t sh, int64_t rows, int64_t heads, int64_t d, const float* cs,
               const float* sn) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cs + t * half;
      const float* s = sn + t * half;
      for (int64_t hh = 0; hh < heads; ++hh) {
        T* row = x + t * st + hh * sh;
        for (int64_t j = 0; j < half; ++j) {
          const float a = widen(row[j]), b = widen(row[j + half]);
          row[j] = static_cast<T>(a * c[j] - b * s[j]);
          row[j + half] = static_cast<T>(b * c[j] + a * s[j]);
        }
      }
    }
  });
}

// silu(gate) * up of a fused [T, 2I] gate/up projection.
template <typename T>
void silu_mul_rows(const T* x, int64_t sx, T* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = x + i * sx;
      const T* u = g + n;
      T* o = out + i * n;
      for (int64_t j = 0; j < n; ++j) {
        const float a = widen(g[j]);
        o[j] = static_cast<T>(static_cast<float>(static_cast<T>(a / (1.f + std::exp(-a)))) * widen(u[j]));
      }
    }
  });
}

template <typename F>
void by_dtype(const at::Tensor& t, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else {
    TORCH_CHECK(t.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
    f(c10::BFloat16{});
  }
}

}  // namespace

// x [T, H] (unit stride over H); residual [T, H] or None (updated in place to x + residual).
at::Tensor rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                    double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && weight.is_contiguous() && weight.size(0) == x.size(1), "shapes");
  const bool add = residual.has_value() && residual->defined();
  if (add) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->stride(1) == 1, "residual shape");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "residual dtype");
  }
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight dtype");
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(x.data_ptr<T>(), x.stride(0), add ? residual->data_ptr<T>() : nullptr, add ? residual->stride(0) : 0,
                     weight.data_ptr<T>(), out.data_ptr<T>(), out.stride(0), x.size(0), x.size(1),
                     static_cast<float>(eps));
  });
  return out;
}

void rope_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "x must be [T, H, D]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "cos/sin float32");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == x.size(0) && cos.size(1) * 2 == x.size(2),
              "cos/sin must be [T, D/2]");
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    rope_rows<T>(x.data_ptr<T>(), x.stride(0), x.stride(1), x.size(0), x.size(1), x.size(2), cos.data_ptr<float>(),
                 sin.data_ptr<float>());
  });
}

at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) % 2 == 0, "x must be [T, 2I]");
  const int64_t n = x.size(1) / 2;
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  by_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(x.data_ptr<T>(), x.stride(0), out.data_ptr<T>(), x.size(0), n);
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor(a!)? residual, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()", &rope_);
  m.def("silu_mul(Tensor x) -> Tensor", &silu_mul);
}
