// Decode attention over Mustafar-compressed tokens on CPU: one query token per sequence.
//
// A compressed token is `keep` values (fp32 or bf16) in ascending channel order and a D-bit
// channel bitmap (uint8 [D / 8], bit c % 8 of byte c / 8 = channel c kept). The scheme is the
// dense kernel's (decode_common.h): split-K items over (sequence, KV head, page range) on the
// threads, the G query heads of a GQA group sharing each page, 16 keys scored per vector,
// vectorised exp, the log-sum-exp merge. The compressed kernel only changes how a block of
// tokens becomes fp32 rows in L1: each record is expanded into its dense D-float row once (for
// all G heads), so the bytes read from memory are the records' alone. The stored bitmap is read
// as words of 64 channels (32 at D = 32); with AVX-512 each 16-channel chunk of the row is one
// masked expand of the packed values under that chunk's 16 bits, with AVX2 each 8-channel byte is
// one permutation from a 256-entry table, elsewhere the values are stored into a zeroed row at the
// set bits. The dense window of recent tokens can be merged in
// as one more split, so the step's output comes out of one call. Optional page lists [B, Hkv, n]
// restrict each KV head to its listed compressed pages (Quest over the compressed cache), so
// the records of unlisted pages are never read.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "decode_common.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SPARSEKV_EXPAND_AVX512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define SPARSEKV_EXPAND_AVX2 1
#endif

namespace {

using namespace sparsekv_decode;

// Tokens expanded, then attended, at a time (across pages): K and V rows (16 KiB each) stay in
// L1, and the softmax's per-call work (rescale, reductions) is shared by more tokens.
template <int D>
constexpr int kBlockRows = 4096 / D;
constexpr int kPrefetchPages = 2;  // records of the page this far ahead are requested

// A record's bitmap is read as words of 64 channels (32 at D = 32): channel c is bit c % B of
// word c / B on a little-endian CPU.
template <int D>
using BitWord = std::conditional_t<(D >= 64), uint64_t, uint32_t>;

#ifdef SPARSEKV_EXPAND_AVX512
// The first cnt (<= 16) packed values at src as fp32 lanes, the rest 0 (bf16 widens by a shift).
inline __m512 load_packed(const float* src, int cnt) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << cnt) - 1), src);
}
inline __m512 load_packed(const c10::BFloat16* src, int cnt) {
  const __m256i x = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << cnt) - 1), src);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}
#elif defined(SPARSEKV_EXPAND_AVX2)
// AVX2 has no expand: for each bitmap byte (8 channels) a permutation moves the packed values to
// their set lanes. kPackedPos[byte] holds, 3 bits per lane, the packed position of each set lane
// and 7 for a clear one (the masked load leaves lane 7 zero whenever a lane is clear).
constexpr std::array<uint32_t, 256> packed_positions() {
  std::array<uint32_t, 256> lut{};
  for (unsigned byte = 0; byte < 256; ++byte) {
    uint32_t word = 0;
    for (int lane = 0, pos = 0; lane < 8; ++lane) word |= (byte >> lane & 1 ? pos++ : 7u) << (3 * lane);
    lut[byte] = word;
  }
  return lut;
}
constexpr std::array<uint32_t, 256> kPackedPos = packed_positions();

// The first cnt (<= 8) packed values at src as fp32 lanes, the rest 0, reading no byte past them.
inline __m256 load_packed8(const float* src, int cnt) {
  const __m256i live = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(src, live);
}
inline __m256 load_packed8(const c10::BFloat16* src, int cnt) {
  alignas(16) uint16_t bits[8] = {};
  std::memcpy(bits, src, cnt * sizeof(uint16_t));
  const __m256i x = _mm256_cvtepu16_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(bits)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
}
#endif

// The dense fp32 row of one record (zeros where channels were dropped) into dst [D], aligned to 64.
template <typename T, int D>
inline void expand_row(const T* val, const uint8_t* bitmap, float* __restrict__ dst) {
  using Word = BitWord<D>;
  constexpr int B = 8 * sizeof(Word);
  static_assert(D % B == 0, "head dim must be a multiple of the bitmap word");
  int off = 0;
#if defined(SPARSEKV_EXPAND_AVX512)
  Word words[D / B];
  std::memcpy(words, bitmap, D / 8);  // records are only byte-aligned
  constexpr int per_word = B / kLanes;
  for (int c = 0; c < D / kLanes; ++c) {
    const auto k = static_cast<__mmask16>(words[c / per_word] >> (kLanes * (c % per_word)));
    const int cnt = __builtin_popcount(static_cast<unsigned>(k));
    _mm512_store_ps(dst + c * kLanes, _mm512_maskz_expand_ps(k, load_packed(val + off, cnt)));
    off += cnt;
  }
#elif defined(SPARSEKV_EXPAND_AVX2)
  const __m256i shifts = _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
  for (int c = 0; c < D / 8; ++c) {
    const unsigned byte = bitmap[c];
    const int cnt = __builtin_popcount(byte);
    const __m256i pos = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(kPackedPos[byte]), shifts),
                                         _mm256_set1_epi32(7));
    _mm256_store_ps(dst + 8 * c, _mm256_permutevar8x32_ps(load_packed8(val + off, cnt), pos));
    off += cnt;
  }
#else
  Word words[D / B];
  std::memcpy(words, bitmap, D / 8);
  for (int d = 0; d < D; ++d) dst[d] = 0.f;
  for (int w = 0; w < D / B; ++w) {
    for (Word bits = words[w]; bits; bits &= bits - 1) dst[w * B + __builtin_ctzll(bits)] = widen(val[off++]);
  }
#endif
}

// n records (token strides sv, sb) as dense fp32 rows [n, D].
template <typename T, int D>
inline void expand_rows(const T* val, int64_t sv, const uint8_t* bitmap, int64_t sb, int n, float* __restrict__ dst) {
  for (int t = 0; t < n; ++t) expand_row<T, D>(val + t * sv, bitmap + t * sb, dst + t * D);
}

template <typename T>
struct Params {
  const T *q, *kc, *vc;
  const uint8_t *kb, *vb;  // channel bitmaps
  const int32_t *bt, *nc, *pl;  // pl: page lists or nullptr
  int64_t sq_b, sq_h, sbt, spl_b, spl_h, spl_n;
  int64_t sk[3], skb[3], sv[3], svb[3];  // page, KV head and token strides of the records
  int64_t num_pages;
  int G, page_size;
  float scale;
};

// Logical page of entry i of an item: its list entry, or i itself without lists (-1: padding).
template <typename T>
inline int64_t logical_page(const Params<T>& p, const Item& it, int i) {
  return p.pl ? p.pl[it.b * p.spl_b + it.h * p.spl_h + i * p.spl_n] : i;
}

template <typename T>
inline void prefetch_records(const Params<T>& p, int64_t phys, int64_t h, int n) {
  prefetch_bytes(p.kc + phys * p.sk[0] + h * p.sk[1], n * p.sk[2] * static_cast<int64_t>(sizeof(T)));
  prefetch_bytes(p.kb + phys * p.skb[0] + h * p.skb[1], n * p.skb[2]);
  prefetch_bytes(p.vc + phys * p.sv[0] + h * p.sv[1], n * p.sv[2] * static_cast<int64_t>(sizeof(T)));
  prefetch_bytes(p.vb + phys * p.svb[0] + h * p.svb[1], n * p.svb[2]);
}

// Online softmax of one item's compressed pages, kBlockRows tokens expanded at a time.
template <typename T, int D>
bool run_item(const Params<T>& p, const Item& it, float* __restrict__ acc, float* __restrict__ m,
              float* __restrict__ l) {
  constexpr int R = kBlockRows<D>;
  const int64_t len = p.nc[it.b], h = it.h, ps = p.page_size;
  alignas(64) float qf[kMaxG * D];
  alignas(64) float kbuf[R * D];
  alignas(64) float vbuf[R * D];
  load_queries<T, D>(p.q, p.sq_b, p.sq_h, it, p.G, p.scale, qf);
  reset_state<D>(p.G, acc, m, l);
  bool ok = true;
  int filled = 0;
  for (int i = it.lo; i < it.hi; ++i) {
    const int64_t lp = logical_page(p, it, i);
    if (lp < 0 || lp * ps >= len) continue;  // padding, or past the compressed tokens
    const int n = static_cast<int>(std::min<int64_t>(ps, len - lp * ps));
    const int64_t phys = p.bt[it.b * p.sbt + lp];
    if (phys < 0 || phys >= p.num_pages) {
      ok = false;
      continue;
    }
    const int ia = i + kPrefetchPages;
    const int64_t la = ia < it.hi ? logical_page(p, it, ia) : -1;
    if (la >= 0 && la * ps < len) {
      const int64_t ahead = p.bt[it.b * p.sbt + la];
      if (ahead >= 0 && ahead < p.num_pages) prefetch_records(p, ahead, h, std::min<int64_t>(ps, len - la * ps));
    }
    const T* kc = p.kc + phys * p.sk[0] + h * p.sk[1];
    const uint8_t* kb = p.kb + phys * p.skb[0] + h * p.skb[1];
    const T* vc = p.vc + phys * p.sv[0] + h * p.sv[1];
    const uint8_t* vb = p.vb + phys * p.svb[0] + h * p.svb[1];
    for (int t0 = 0; t0 < n;) {
      const int rows = std::min(R - filled, n - t0);
      expand_rows<T, D>(kc + t0 * p.sk[2], p.sk[2], kb + t0 * p.skb[2], p.skb[2], rows, kbuf + filled * D);
      expand_rows<T, D>(vc + t0 * p.sv[2], p.sv[2], vb + t0 * p.svb[2], p.svb[2], rows, vbuf + filled * D);
      filled += rows;
      t0 += rows;
      if (filled == R) {
        attend_rows<D>(qf, p.G, kbuf, D, vbuf, D, filled, acc, m, l);
        filled = 0;
      }
    }
  }
  if (filled) attend_rows<D>(qf, p.G, kbuf, D, vbuf, D, filled, acc, m, l);
  return ok;
}

void check_records(const at::Tensor& vals, const at::Tensor& bits, const at::Tensor& q, const char* name) {
  TORCH_CHECK(vals.dim() == 4 && bits.dim() == 4 && bits.sizes().slice(0, 3) == vals.sizes().slice(0, 3) &&
              bits.size(3) * 8 == q.size(2),
              name, ": values [pages, Hkv, ps, keep] and bitmaps [pages, Hkv, ps, D / 8]");
  TORCH_CHECK(vals.scalar_type() == q.scalar_type(), name, ": records must have q's dtype");
  TORCH_CHECK(bits.scalar_type() == at::kByte, name, ": bitmaps must be uint8");
  TORCH_CHECK(vals.stride(3) == 1 && bits.stride(3) == 1, name, ": records must be contiguous");
}

}  // namespace

// q [B, Hq, D]; kc/kb, vc/vb records: values [num_pages, Hkv, ps, keep] in q's dtype and uint8
// channel bitmaps [num_pages, Hkv, ps, D / 8], each with exactly `keep` bits set; block_table
// int32 [B, max_pages]; num_compressed int32 [B]; optionally the dense window's normalised out
// [B, Hq, D] and lse float32 [B, Hq] to merge; optionally page_lists int32 [B, Hkv, n] of logical
// compressed pages padded with -1 (entries past num_compressed are skipped). Returns out [B, Hq, D] in q's dtype (normalised)
// and lse float32 [B, Hq] (-inf: nothing to read).
std::tuple<at::Tensor, at::Tensor> compressed_decode(
    const at::Tensor& q, const at::Tensor& kc, const at::Tensor& kb, const at::Tensor& vc, const at::Tensor& vb,
    const at::Tensor& block_table, const at::Tensor& num_compressed, double scale,
    const std::optional<at::Tensor>& window_out, const std::optional<at::Tensor>& window_lse,
    const std::optional<at::Tensor>& page_lists) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "q must be [B, Hq, D] with unit stride over D");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  check_records(kc, kb, q, "keys");
  check_records(vc, vb, q, "values");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.stride(1) == 1,
              "block_table int32 [B, max_pages]");
  TORCH_CHECK(num_compressed.scalar_type() == at::kInt && num_compressed.is_contiguous(), "num_compressed int32 [B]");
  const int64_t B = q.size(0), hq = q.size(1), D = q.size(2), hkv = kc.size(1), ps = kc.size(2);
  TORCH_CHECK(vc.size(0) == kc.size(0) && vc.size(1) == hkv && vc.size(2) == ps, "K and V pools differ");
  TORCH_CHECK(hq % hkv == 0 && hq / hkv <= kMaxG, "head shapes");
  TORCH_CHECK(kc.size(3) <= D && vc.size(3) <= D, "more kept elements than the head dim");
  TORCH_CHECK(block_table.size(0) == B && num_compressed.size(0) == B, "table shapes");
  const bool merge = window_out.has_value() && window_out->defined();
  if (merge) {
    TORCH_CHECK(window_out->sizes() == q.sizes() && window_out->scalar_type() == q.scalar_type() &&
                window_out->stride(2) == 1, "window_out must be like q");
    TORCH_CHECK(window_lse.has_value() && window_lse->scalar_type() == at::kFloat && window_lse->is_contiguous() &&
                window_lse->numel() == B * hq, "window_lse float32 [B, Hq]");
  }
  const bool sparse = page_lists.has_value() && page_lists->defined();
  if (sparse) {
    TORCH_CHECK(page_lists->scalar_type() == at::kInt && page_lists->dim() == 3 && page_lists->size(0) == B &&
                page_lists->size(1) == hkv, "page_lists int32 [B, Hkv, n]");
  }
  const int32_t* nc = num_compressed.data_ptr<int32_t>();
  std::vector<int64_t> count(B);
  for (int64_t b = 0; b < B; ++b) {
    count[b] = (std::max<int32_t>(nc[b], 0) + ps - 1) / ps;
    TORCH_CHECK(count[b] <= block_table.size(1), "num_compressed exceeds the block table");
    if (sparse) count[b] = count[b] ? page_lists->size(2) : 0;
  }
  std::vector<int64_t> group_begin;
  const std::vector<Item> items = plan(count, hkv, ps, group_begin);
  at::Tensor out = at::empty({B, hq, D}, q.options());
  at::Tensor lse = at::empty({B, hq}, q.options().dtype(at::kFloat));
  auto run = [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int Dc = decltype(dim)::value;
    Params<T> p{q.data_ptr<T>(), kc.data_ptr<T>(), vc.data_ptr<T>(), kb.data_ptr<uint8_t>(), vb.data_ptr<uint8_t>(),
                block_table.data_ptr<int32_t>(), nc, sparse ? page_lists->data_ptr<int32_t>() : nullptr,
                q.stride(0), q.stride(1), block_table.stride(0), sparse ? page_lists->stride(0) : 0,
                sparse ? page_lists->stride(1) : 0, sparse ? page_lists->stride(2) : 0,
                {kc.stride(0), kc.stride(1), kc.stride(2)}, {kb.stride(0), kb.stride(1), kb.stride(2)},
                {vc.stride(0), vc.stride(1), vc.stride(2)}, {vb.stride(0), vb.stride(1), vb.stride(2)},
                kc.size(0), static_cast<int>(hq / hkv), static_cast<int>(ps), static_cast<float>(scale)};
    Extra<T> extra;
    if (merge) extra = {window_out->data_ptr<T>(), window_lse->data_ptr<float>(), window_out->stride(0),
                        window_out->stride(1)};
    const bool ok = run_and_merge<T, Dc>(
        items, group_begin, B, hkv, p.G,
        [&](const Item& it, float* acc, float* m, float* l) { return run_item<T, Dc>(p, it, acc, m, l); }, extra,
        out.data_ptr<T>(), out.stride(0), out.stride(1), lse.data_ptr<float>());
    TORCH_CHECK(ok, "compressed_decode_cpu: block_table holds a page id outside the KV pool");
  };
  dispatch_dtype_dim(q.scalar_type(), D, "compressed_decode_cpu", run);
  return {out, lse};
}

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("compressed_decode(Tensor q, Tensor kc, Tensor kb, Tensor vc, Tensor vb, Tensor block_table, "
        "Tensor num_compressed, float scale, Tensor? window_out, Tensor? window_lse, Tensor? page_lists) "
        "-> (Tensor, Tensor)",
        &compressed_decode);
}
