// What the CPU attention kernels share (cpu_attention.cpp and cpu_attention_amx.cpp):
// which query rows a task handles and which keys each may see, masking and softcap of a
// block of scores, the online-softmax step, and writing finished rows.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "attention/cpu_attention.h"
#include "attention/vec.h"

namespace kernelevo::cpu::detail {

using namespace vec;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t cdiv(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}
inline int64_t round_up(int64_t a, int64_t b) {
  return cdiv(a, b) * b;
}

// ---------------------------------------------------------------------------------------
// What every kernel shares: which query rows a task handles, which keys each may see.

struct Geometry {
  int64_t group;    // query heads per key/value head
  int64_t offset;   // kv_len - q_len: query i aligns with key i + offset
  bool bounded;     // causal or windowed: keys after the aligned position are excluded
  int64_t window;   // 0: none
};

inline Geometry geometry(const AttentionProblem& p) {
  return {p.heads / p.kv_heads, p.kv_len - p.q_len, p.causal || p.window > 0, p.window};
}

// The query rows of one task: rows t in [t0, t1) of a unit of `pack` heads starting at
// head h0, ordered position-major (t = pos * pack + head - h0).
struct Rows {
  int64_t count = 0;
  std::vector<int64_t> pos, head;
  std::vector<int32_t> lo, hi;  // the keys row r may see: [lo[r], hi[r])
  int32_t min_lo = 0, max_lo = 0, min_hi = 0, max_hi = 0;

  void assign(const AttentionProblem& p, const Geometry& g, int64_t h0, int64_t pack,
              int64_t t0, int64_t t1, int64_t padded) {
    count = t1 - t0;
    pos.assign(padded, 0);
    head.assign(padded, h0);
    lo.assign(padded, 0);
    hi.assign(padded, static_cast<int32_t>(p.kv_len));  // padding rows see everything
    for (int64_t r = 0; r < count; ++r) {
      const int64_t t = t0 + r;
      pos[r] = t / pack;
      head[r] = h0 + t % pack;
      const int64_t aligned = pos[r] + g.offset;
      int64_t h = g.bounded ? aligned + 1 : p.kv_len;
      int64_t l = g.window > 0 ? aligned - g.window + 1 : 0;
      hi[r] = static_cast<int32_t>(std::clamp<int64_t>(h, 0, p.kv_len));
      lo[r] = static_cast<int32_t>(std::clamp<int64_t>(l, 0, p.kv_len));
    }
    min_lo = *std::min_element(lo.begin(), lo.begin() + count);
    max_lo = *std::max_element(lo.begin(), lo.begin() + count);
    min_hi = *std::min_element(hi.begin(), hi.begin() + count);
    max_hi = *std::max_element(hi.begin(), hi.begin() + count);
  }

  // Whether some row must not see some key of [j0, j1) (then it is masked per element).
  bool partial(int64_t j0, int64_t j1) const { return max_lo > j0 || min_hi < j1; }
};

template <typename T>
const T* at(const Tensor4& t, int64_t i0, int64_t i1, int64_t i2) {
  return static_cast<const T*>(t.data) + i0 * t.strides[0] + i1 * t.strides[1] +
         i2 * t.strides[2];
}

// The mean of v over all keys: what a fully masked row outputs (see the header).
template <typename T>
void mean_of_values(const AttentionProblem& p, int64_t b, int64_t kvh, float* dst) {
  std::fill(dst, dst + p.v_dim, 0.0f);
  std::vector<float> row(p.v_dim);
  for (int64_t j = 0; j < p.kv_len; ++j) {
    to_f32(at<T>(p.v, b, kvh, j), p.v_dim, row.data());
    for (int64_t d = 0; d < p.v_dim; ++d) dst[d] += row[d];
  }
  const float inv = p.kv_len ? 1.0f / static_cast<float>(p.kv_len) : 0.0f;
  for (int64_t d = 0; d < p.v_dim; ++d) dst[d] *= inv;
}

// Writes one output row: o[d * stride] / l, or `dead_row` when l == 0 (the row saw no
// finite score). A NaN score makes l NaN, and then the whole row NaN, as in MLX's softmax.
template <typename T>
void write_row(const AttentionProblem& p, int64_t b, int64_t head, int64_t pos,
               const float* o, int64_t stride, float l, const float* dead_row) {
  T* dst = static_cast<T*>(p.out) + ((b * p.heads + head) * p.q_len + pos) * p.v_dim;
  if (l == 0.0f) {
    store_scaled(dead_row, p.v_dim, 1.0f, dst);
    return;
  }
  if (stride != 1) {  // a column of a transposed accumulator: gather it first
    thread_local std::vector<float> row;
    row.resize(p.v_dim);
    for (int64_t d = 0; d < p.v_dim; ++d) row[d] = o[d * stride];
    o = row.data();
  }
  store_scaled(o, p.v_dim, 1.0f / l, dst);
}

// Finishes rows [0, rows.count) of a task from its accumulators: row r's value d at
// o[r * row_stride + d * col_stride]. A row that saw no finite score (l == 0) outputs what
// MLX's softmax gives it: the mean of v when its boolean, causal or window mask hides every
// key (MLX masks with the type's lowest finite value: all scores tie), NaN when it sees
// keys whose scores are all -inf (an additive -inf mask: exp(-inf - -inf) is NaN).
template <typename T>
void write_rows(const AttentionProblem& p, int64_t b, int64_t kvh, const Rows& rows,
                const float* o, int64_t row_stride, int64_t col_stride, const float* l) {
  thread_local std::vector<float> masked_row, nan_row;
  bool have_masked = false;
  for (int64_t r = 0; r < rows.count; ++r) {
    const float* dead_row = masked_row.data();
    if (l[r] == 0.0f) {
      if (p.mask != MaskKind::boolean && rows.lo[r] < rows.hi[r]) {
        nan_row.assign(p.v_dim, std::numeric_limits<float>::quiet_NaN());
        dead_row = nan_row.data();
      } else if (!have_masked) {
        masked_row.resize(p.v_dim);
        mean_of_values<T>(p, b, kvh, masked_row.data());
        have_masked = true;
        dead_row = masked_row.data();
      }
    }
    write_row<T>(p, b, rows.head[r], rows.pos[r], o + r * row_stride, col_stride, l[r],
                 dead_row);
  }
}

// Score transforms applied before masking: scale (unless q was scaled) and softcap.
inline void scale_and_cap(float* s, int64_t n, float scale, float softcap) {
  if (scale == 1.0f && softcap == 0.0f) return;
  const vfloat vs = splat(scale);
  const float inv_cap = softcap != 0.0f ? 1.0f / softcap : 0.0f;
  for (int64_t i = 0; i < n; i += kLanes) {
    vfloat x = load(s + i) * vs;
    if (softcap != 0.0f) x = softcap * vtanh(x * inv_cap);
    store(s + i, x);
  }
}

// Adds an additive mask / applies a boolean mask to score (r, j) = s[r * rs + j * cs].
template <typename T>
void apply_mask_array(const AttentionProblem& p, int64_t b, const Rows& rows, int64_t j0,
                      int64_t n, float* s, int64_t rs, int64_t cs) {
  const int64_t ms3 = p.mask_values.strides[3];
  for (int64_t r = 0; r < rows.count; ++r) {
    float* row = s + r * rs;
    if (p.mask == MaskKind::boolean) {
      const bool* m = at<bool>(p.mask_values, b, rows.head[r], rows.pos[r]) + j0 * ms3;
      for (int64_t j = 0; j < n; ++j)
        if (!m[j * ms3]) row[j * cs] = kNegInf;
    } else {
      const T* m = at<T>(p.mask_values, b, rows.head[r], rows.pos[r]) + j0 * ms3;
      for (int64_t j = 0; j < n; ++j) row[j * cs] += static_cast<float>(m[j * ms3]);
    }
  }
}

inline vint iota() {
  return vint{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}

// One online-softmax step for 16 query rows (lanes) over n scores each, s[j * ld] for
// key j: updates m and l, turns the scores into probabilities and returns the factor
// the rows' output accumulators must be multiplied by. Rows that have seen no finite
// score yet keep m = -inf, l = 0 and get probabilities 0. The max may drop a NaN score,
// but exp(NaN - m) is NaN: it reaches l (and the output), which then stays NaN.
inline vfloat softmax_step(float* s, int64_t ld, int64_t n, vfloat& m, vfloat& l) {
  vfloat block_max = splat(kNegInf);
  for (int64_t j = 0; j < n; ++j) block_max = vmax(block_max, load(s + j * ld));
  const vfloat m_new = vmax(m, block_max);
  const vint dead = m_new == kNegInf;
  const vfloat m_safe = select(dead, splat(0.0f), m_new);
  const vfloat corr = select(dead, splat(1.0f), vexp(m - m_safe));
  vfloat sum = {};
  for (int64_t j = 0; j < n; ++j) {
    const vfloat e = vexp(load(s + j * ld) - m_safe);
    store(s + j * ld, e);
    sum += e;
  }
  l = l * corr + sum;
  m = m_new;
  return corr;
}

// ---------------------------------------------------------------------------------------
// flash: its parameters, and the AMX variant of one tile (cpu_attention_amx.cpp).

struct FlashParams {
  int bq, bk, threads;
  bool pack_gqa, skip_masked_blocks, scale_q;
  bool amx;  // bf16 tile products on AMX (else f32 FMAs)
};

// Whether this build has the AMX kernels and the OS lets this process use the tiles
// (asked once); the reason when not.
bool amx_available(std::string* why = nullptr);

// The keys and values of one key/value head as AMX tiles, packed once per call and head
// and shared by the flash tiles of all its query heads. Buffers come from a small pool
// reused across calls (fresh pages for every call cost page faults).
struct AmxPackedHead {
  Buffer k, v;  // bf16 tiles (as raw 16-bit values)
};
struct ReleaseHead {
  void operator()(AmxPackedHead* head) const;  // back to the pool
};
using AmxHeadPtr = std::unique_ptr<AmxPackedHead, ReleaseHead>;
AmxHeadPtr amx_pack_head(const AttentionProblem& p, int64_t b, int64_t kvh);

// One flash tile (rows [t0, t1) of the unit at head h0) with AMX; bf16 inputs only.
void flash_amx_tile(const AttentionProblem& p, const Geometry& g, const FlashParams& f,
                    const AmxPackedHead& head, int64_t b, int64_t h0, int64_t pack, int64_t t0,
                    int64_t t1);

}  // namespace kernelevo::cpu::detail
