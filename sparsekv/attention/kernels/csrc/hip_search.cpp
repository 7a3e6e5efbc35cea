// HiP's key search on CPU (fp32): the probe (a unit's best q.k over key ranges) and the whole
// top-k tree of hip_search.tree_search fused into one call per layer.
//
// A unit is one query block of a head or of a GQA group: its M strided queries sit in L1,
// transposed to [D][M] so one key row meets 16 queries per FMA (no horizontal sums until the
// max). Keys are read in place from the [Hkv, L, D] tensor, so nothing is gathered; the torch
// probe spent two thirds of its time gathering the probed rows and reducing the score matrix.
// Threads pull units from an atomic counter (units differ in work: early query blocks have few
// middle keys). The tree keeps each node's score: a child whose representative is its
// parent's (the left half of a node of one or two blocks, or always with "first") reuses it,
// which is bit-identical to probing it again. Selection: the `keep` best children, ties to
// the earlier child, the kept nodes staying in position order (as the torch reference does).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "decode_common.h"

namespace {

using sparsekv_decode::kLanes;  // the ISA's vector width (decode_common.h)
using sparsekv_decode::vf;
using sparsekv_decode::vfu;
// key rows per tile: each query vector loaded from L1 serves them; the R x NV accumulators stay
// within the register file (16 of 32 zmm; 8 of 16 ymm on AVX2)
constexpr int kRows = kLanes == 16 ? 8 : 4;
constexpr int kHalf = kRows / 2;  // rows per tile with 3 or 4 query vectors
constexpr int kMaxVecs = 4;  // query vectors per pass; up to 2 * kRows accumulators stay in registers
constexpr float kNone = -std::numeric_limits<float>::infinity();

// A unit's queries, transposed and padded to whole vectors by repeating query 0 (the max over
// queries is unchanged), and how its key rows are reached.
struct Unit {
  const float* qt;  // [D][width]
  int64_t width;  // padded query count, a multiple of kLanes
  const float* keys;  // the unit's KV head [L][D], row stride `stride`
  int64_t stride, D;
};

// out[r] = max(out[r], max over a pass's NV query vectors of q . rows[r]), for R rows. With AVX-512
// 8 rows x 2 vectors measured 1.5x the speed of 4 x 2 (fewer loads per FMA).
template <int NV, int R>
void tile_pass(const Unit& u, const float* qt, const float* const* rows, float* out) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < NV; ++j) acc[r][j] = vf{};
  }
  for (int64_t d = 0; d < u.D; ++d) {
    vf q[NV];
    for (int j = 0; j < NV; ++j) q[j] = *reinterpret_cast<const vfu*>(qt + d * u.width + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float x = rows[r][d];
      for (int j = 0; j < NV; ++j) acc[r][j] += q[j] * x;
    }
  }
  for (int r = 0; r < R; ++r) {
    vf m = acc[r][0];
    for (int j = 1; j < NV; ++j) m = m > acc[r][j] ? m : acc[r][j];
    float best = out[r];
    for (int l = 0; l < kLanes; ++l) best = std::max(best, m[l]);
    out[r] = best;
  }
}

// The best q.k of each of n rows (positions pos[i] of the unit's head) over the unit's queries.
void rows_max(const Unit& u, const int64_t* pos, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += kRows) {
    const float* rows[kRows];
    for (int r = 0; r < kRows; ++r) rows[r] = u.keys + pos[std::min(i + r, n - 1)] * u.stride;  // tail repeats
    if (i + kRows < n) {  // the next tile's rows are requested while this one computes
      for (int r = 0; r < kRows && i + kRows + r < n; ++r) {
        const char* next = reinterpret_cast<const char*>(u.keys + pos[i + kRows + r] * u.stride);
        for (int64_t b = 0; b < u.D * 4; b += 64) __builtin_prefetch(next + b);
      }
    }
    float best[kRows];
    std::fill(best, best + kRows, kNone);
    for (int64_t v = 0; v < u.width / kLanes; v += kMaxVecs) {
      const float* qt = u.qt + v * kLanes;
      switch (std::min<int64_t>(kMaxVecs, u.width / kLanes - v)) {
        case 1: tile_pass<1, kRows>(u, qt, rows, best); break;
        case 2: tile_pass<2, kRows>(u, qt, rows, best); break;
        case 3: tile_pass<3, kHalf>(u, qt, rows, best), tile_pass<3, kHalf>(u, qt, rows + kHalf, best + kHalf); break;
        default: tile_pass<4, kHalf>(u, qt, rows, best), tile_pass<4, kHalf>(u, qt, rows + kHalf, best + kHalf); break;
      }
    }
    for (int r = 0; r < kRows && i + r < n; ++r) out[i + r] = best[r];
  }
}

// Per-thread buffers, reused across units.
struct Scratch {
  std::vector<float> qt, row_best, score;
  std::vector<int64_t> pos, cs, ce, rep, order, s, e, node_rep, probe_at, probe_kid;
  std::vector<float> node_score, probed;
  std::vector<char> known, kept;
};

Unit load_unit(const at::Tensor& qs, const at::Tensor& k, const int64_t* unit_kv, int64_t i, Scratch& w) {
  const int64_t M = qs.size(1), D = qs.size(2), width = (M + kLanes - 1) / kLanes * kLanes;
  const float* q = qs.data_ptr<float>() + i * qs.stride(0);
  w.qt.resize(D * width);
  for (int64_t m = 0; m < width; ++m) {
    const float* row = q + (m < M ? m : 0) * qs.stride(1);
    for (int64_t d = 0; d < D; ++d) w.qt[d * width + m] = row[d];
  }
  const float* keys = k.data_ptr<float>() + unit_kv[i] * k.stride(0);
  return Unit{w.qt.data(), width, keys, k.stride(1), D};
}

// Scores [n] of ranges starting at starts[c] (-1: none, -inf) of `block` rows each.
void score_ranges(const Unit& u, const int64_t* starts, int64_t n, int64_t block, Scratch& w, float* score) {
  w.pos.clear();
  for (int64_t c = 0; c < n; ++c) {
    for (int64_t t = 0; starts[c] >= 0 && t < block; ++t) w.pos.push_back(starts[c] + t);
  }
  w.row_best.resize(w.pos.size());
  rows_max(u, w.pos.data(), static_cast<int64_t>(w.pos.size()), w.row_best.data());
  for (int64_t c = 0, r = 0; c < n; ++c) {
    score[c] = kNone;
    for (int64_t t = 0; starts[c] >= 0 && t < block; ++t) score[c] = std::max(score[c], w.row_best[r++]);
  }
}

void check_inputs(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& unit_kv) {
  TORCH_CHECK(qs.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat, "hip search: float32 only");
  TORCH_CHECK(qs.dim() == 3 && k.dim() == 3 && qs.size(2) == k.size(2), "hip search: qs [U, M, D], k [Hkv, L, D]");
  TORCH_CHECK(qs.stride(2) == 1 && k.stride(2) == 1, "hip search: unit stride over D");
  TORCH_CHECK(unit_kv.scalar_type() == at::kLong && unit_kv.numel() == qs.size(0), "hip search: unit_kv int64 [U]");
}

// Runs fn(unit, scratch) for every unit, threads pulling units from a counter.
template <typename F>
void for_units(int64_t n, F fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Scratch w;
    for (int64_t i; (i = next.fetch_add(1)) < n;) fn(i, w);
  });
}

// torch_probe's scores: starts [U, C] (-1: none) of `width`-row ranges -> [U, C].
at::Tensor hip_probe(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& unit_kv, const at::Tensor& starts,
                     int64_t width) {
  check_inputs(qs, k, unit_kv);
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 2 && starts.size(0) == qs.size(0) &&
              starts.is_contiguous(), "hip_probe: starts int64 [U, C] contiguous");
  const int64_t U = qs.size(0), C = starts.size(1);
  TORCH_CHECK(U == 0 || starts.numel() == 0 || starts.max().item<int64_t>() + width <= k.size(1),
              "hip_probe: a range ends past the keys");
  at::Tensor out = at::empty({U, C}, qs.options());
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* ukv = unit_kv.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for_units(U, [&](int64_t i, Scratch& w) {
    score_ranges(load_unit(qs, k, ukv, i, w), st + i * C, C, width, w, o + i * C);
  });
  return out;
}

// One unit's tree over blocks [lo, hi): `keep` kept node starts ascending, -1 padded.
void unit_tree(const Unit& u, int64_t lo, int64_t hi, int64_t keep, int64_t block, int64_t rounds, bool center,
               Scratch& w, int64_t* out) {
  const int64_t n = hi - lo, kids = 2 * keep;
  w.s.resize(keep), w.e.resize(keep), w.node_rep.resize(keep), w.node_score.resize(keep), w.known.assign(keep, 0);
  for (int64_t j = 0; j < keep; ++j) w.s[j] = lo + n * j / keep, w.e[j] = lo + n * (j + 1) / keep;
  w.cs.resize(kids), w.ce.resize(kids), w.rep.resize(kids), w.score.resize(kids), w.order.resize(kids);
  w.kept.resize(kids);
  auto &probe_at = w.probe_at, &probe_kid = w.probe_kid;
  auto& probed = w.probed;
  for (int64_t round = 0; round < rounds; ++round) {
    probe_at.clear(), probe_kid.clear();
    for (int64_t j = 0; j < keep; ++j) {
      const int64_t s = w.s[j], e = w.e[j], m = s + (e - s + 1) / 2;
      const int64_t bounds[2][2] = {{s, m}, {m, e}};
      for (int h = 0; h < 2; ++h) {
        const int64_t c = 2 * j + h, a = bounds[h][0], b = bounds[h][1];
        w.cs[c] = a, w.ce[c] = b;
        w.rep[c] = b > a ? (center ? a + (b - a - 1) / 2 : a) : -1;
        w.score[c] = kNone;
        if (w.rep[c] < 0) continue;
        if (w.known[j] && w.node_rep[j] == w.rep[c]) {
          w.score[c] = w.node_score[j];
        } else {
          probe_at.push_back(w.rep[c] * block), probe_kid.push_back(c);
        }
      }
    }
    probed.resize(probe_at.size());
    score_ranges(u, probe_at.data(), static_cast<int64_t>(probe_at.size()), block, w, probed.data());
    for (size_t t = 0; t < probe_kid.size(); ++t) w.score[probe_kid[t]] = probed[t];
    for (int64_t c = 0; c < kids; ++c) {
      w.order[c] = c;
      if (std::isnan(w.score[c])) w.score[c] = std::numeric_limits<float>::infinity();  // sorts first, as in torch
    }
    const float* sc = w.score.data();
    std::nth_element(w.order.begin(), w.order.begin() + keep, w.order.end(),
                     [sc](int64_t a, int64_t b) { return sc[a] > sc[b] || (sc[a] == sc[b] && a < b); });
    std::fill(w.kept.begin(), w.kept.end(), 0);
    for (int64_t t = 0; t < keep; ++t) w.kept[w.order[t]] = 1;
    for (int64_t c = 0, j = 0; c < kids; ++c) {
      if (!w.kept[c]) continue;
      w.s[j] = w.cs[c], w.e[j] = w.ce[c], w.node_rep[j] = w.rep[c], w.node_score[j] = w.score[c];
      w.known[j++] = 1;
    }
  }
  int64_t j = 0;
  for (int64_t t = 0; t < keep; ++t) {
    if (w.e[t] > w.s[t]) out[j++] = w.s[t];
  }
  std::fill(out + j, out + keep, -1);
}

// hip_search.tree_search for all units at once: lo, hi [U] in blocks of `block` rows -> [U, keep].
at::Tensor hip_tree(const at::Tensor& qs, const at::Tensor& k, const at::Tensor& unit_kv, const at::Tensor& lo,
                    const at::Tensor& hi, int64_t keep, int64_t block, int64_t rounds, bool center) {
  check_inputs(qs, k, unit_kv);
  const int64_t U = qs.size(0);
  TORCH_CHECK(lo.scalar_type() == at::kLong && hi.scalar_type() == at::kLong && lo.is_contiguous() &&
              hi.is_contiguous() && lo.numel() == U && hi.numel() == U, "hip_tree: lo, hi int64 [U]");
  TORCH_CHECK(keep >= 1 && block >= 1, "hip_tree: keep and block must be positive");
  TORCH_CHECK(U == 0 || (lo.min().item<int64_t>() >= 0 && hi.max().item<int64_t>() * block <= k.size(1)),
              "hip_tree: blocks outside the keys");
  at::Tensor out = at::empty({U, keep}, lo.options());
  const int64_t *l = lo.data_ptr<int64_t>(), *h = hi.data_ptr<int64_t>(), *ukv = unit_kv.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for_units(U, [&](int64_t i, Scratch& w) {
    unit_tree(load_unit(qs, k, ukv, i, w), l[i], std::max(h[i], l[i]), keep, block, rounds, center, w, o + i * keep);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparsekv_cpu, m) {
  m.def("hip_probe(Tensor qs, Tensor k, Tensor unit_kv, Tensor starts, int width) -> Tensor", &hip_probe);
  m.def("hip_tree(Tensor qs, Tensor k, Tensor unit_kv, Tensor lo, Tensor hi, int keep, int block, int rounds, "
        "bool center) -> Tensor", &hip_tree);
}
