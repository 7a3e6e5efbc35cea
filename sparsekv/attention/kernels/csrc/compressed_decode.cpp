// Decode attention over Mustafar-compressed tokens on CPU (fp32): one query token per sequence.
//
// A compressed token is `keep` values with their ascending uint8 channel indices. Work items
// are (sequence, KV head); each runs an online softmax over its compressed tokens in blocks,
// reading only the records: each record is scattered into a zeroed D-float buffer in L1 and
// the G query heads of the GQA group then use it with dense, vectorised loops over D (faster
// than gathering q at each index: those chains of dependent scalar loads do not vectorise).
// Output is normalised, with the log-sum-exp, so the caller merges it with the dense window.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // tokens scored before one softmax rescale
constexpr int64_t kMaxD = 256;

// The dense vector of one record: zeros except at its kept channels.
inline void expand(float* buf, const float* val, const uint8_t* idx, int64_t keep, int64_t D) {
  std::fill(buf, buf + D, 0.f);
  for (int64_t j = 0; j < keep; ++j) buf[idx[j]] = val[j];
}

std::tuple<at::Tensor, at::Tensor> compressed_decode(
    const at::Tensor& q, const at::Tensor& kc, const at::Tensor& ki, const at::Tensor& vc, const at::Tensor& vi,
    const at::Tensor& block_table, const at::Tensor& num_compressed, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && kc.scalar_type() == at::kFloat && vc.scalar_type() == at::kFloat,
              "compressed_decode: float32 only");
  TORCH_CHECK(ki.scalar_type() == at::kByte && vi.scalar_type() == at::kByte, "indices must be uint8");
  TORCH_CHECK(kc.stride(3) == 1 && vc.stride(3) == 1 && ki.stride(3) == 1 && vi.stride(3) == 1,
              "records must be contiguous");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kc.size(1), ps = kc.size(2);
  const int64_t KK = kc.size(3), VK = vc.size(3), G = Hq / Hkv;
  TORCH_CHECK(D <= kMaxD, "compressed_decode: head dim over ", kMaxD);
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  at::Tensor lse = at::empty({B, Hq}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kcp = kc.data_ptr<float>();
  const uint8_t* kip = ki.data_ptr<uint8_t>();
  const float* vcp = vc.data_ptr<float>();
  const uint8_t* vip = vi.data_ptr<uint8_t>();
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int32_t* nc = num_compressed.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), sbt = block_table.stride(0);
  const int64_t sk[3] = {kc.stride(0), kc.stride(1), kc.stride(2)}, sv[3] = {vc.stride(0), vc.stride(1), vc.stride(2)};
  const int64_t ski[3] = {ki.stride(0), ki.stride(1), ki.stride(2)}, svi[3] = {vi.stride(0), vi.stride(1), vi.stride(2)};
  const float sc = static_cast<float>(scale);

  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(G * D), s(G * kBlock), m(G), l(G);
    alignas(64) float buf[kMaxD];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / Hkv, h = item % Hkv, n = nc[b];
      const float* qh = qp + b * sq0 + h * G * sq1;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += kBlock) {
        const int64_t nb = std::min(kBlock, n - t0);
        for (int64_t i = 0; i < nb; ++i) {  // scores of the block
          const int64_t t = t0 + i, page = bt[b * sbt + t / ps], off = t % ps;
          const float* kv = kcp + page * sk[0] + h * sk[1] + off * sk[2];
          const uint8_t* kx = kip + page * ski[0] + h * ski[1] + off * ski[2];
          expand(buf, kv, kx, KK, D);
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qh + g * sq1;
            float dot = 0.f;
            for (int64_t d = 0; d < D; ++d) dot += buf[d] * qg[d];
            s[g * kBlock + i] = dot * sc;
          }
        }
        for (int64_t g = 0; g < G; ++g) {  // one rescale per block
          float mb = m[g];
          for (int64_t i = 0; i < nb; ++i) mb = std::max(mb, s[g * kBlock + i]);
          const float alpha = std::exp(m[g] - mb);
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
          float sum = 0.f;
          for (int64_t i = 0; i < nb; ++i) {
            const float p = std::exp(s[g * kBlock + i] - mb);
            s[g * kBlock + i] = p;
            sum += p;
          }
          l[g] = l[g] * alpha + sum;
          m[g] = mb;
        }
        for (int64_t i = 0; i < nb; ++i) {  // p * value scattered to each kept channel
          const int64_t t = t0 + i, page = bt[b * sbt + t / ps], off = t % ps;
          const float* vv = vcp + page * sv[0] + h * sv[1] + off * sv[2];
          const uint8_t* vx = vip + page * svi[0] + h * svi[1] + off * svi[2];
          expand(buf, vv, vx, VK, D);
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * kBlock + i];
            float* a = acc.data() + g * D;
            for (int64_t d = 0; d < D; ++d) a[d] += p * buf[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t head = h * G + g;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) op[(b * Hq + head) * D + d] = acc[g * D + d] * inv;
        lp[b * Hq + head] = l[g] > 0.f ? m[g] + std::log(l[g]) : -std::numeric_limits<float>::infinity();
      }
    }
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("compressed_decode(Tensor q, Tensor kc, Tensor ki, Tensor vc, Tensor vi, Tensor block_table, "
        "Tensor num_compressed, float scale) -> (Tensor, Tensor)", &compressed_decode);
}
