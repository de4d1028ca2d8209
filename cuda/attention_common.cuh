// What kernelevo's attention kernels share: the call's sizes, and the score of one
// (query, key) pair after scale, softcap and masks, in the log2 domain.
//
// sizes: [B, Hq, Hkv, Lq, Lk, scale (f32 bits), softcap (f32 bits), window,
//         mask strides for batch, head, query, key (elements; 0 where broadcast),
//         slices, keys per slice]
// The causal mask aligns the last query with the last key: query i sees key j when
// j <= Lk - Lq + i, and with a window only the last `window` of those keys.
#ifndef KE_ATTENTION_COMMON_CUH
#define KE_ATTENTION_COMMON_CUH

namespace ke {

constexpr float LOG2E = 1.4426950408889634f;

enum MaskKind { MASK_NONE = 0, MASK_BOOL = 1, MASK_ADDITIVE = 2 };

struct AttnSizes {
  int B, Hq, Hkv, Lq, Lk;
  float scale, softcap;
  int window;
  int mask_b, mask_h, mask_q, mask_k;
  int slices, chunk;
  __device__ __forceinline__ explicit AttnSizes(const int* s)
      : B(s[0]), Hq(s[1]), Hkv(s[2]), Lq(s[3]), Lk(s[4]), scale(__int_as_float(s[5])),
        softcap(__int_as_float(s[6])), window(s[7]), mask_b(s[8]), mask_h(s[9]),
        mask_q(s[10]), mask_k(s[11]), slices(s[12]), chunk(s[13]) {}
};

// Turns q . k (already multiplied by q_scale() when the queries were scaled as loaded)
// into a log2-domain score: scale, softcap, then the mask (MASKED where it hides the key).
template <bool SCALE_Q, bool SOFTCAP, int MASK, bool CAUSAL, class MaskT> struct Scorer {
  float score_scale;  // applied to each dot product (1 when the queries carry the scale)
  float softcap;
  int window, offset;  // offset = Lk - Lq: query i is aligned with key offset + i
  int mask_k;

  __device__ __forceinline__ Scorer(const AttnSizes& s) {
    const float scale = SOFTCAP ? s.scale : s.scale * LOG2E;
    score_scale = SCALE_Q ? 1.0f : scale;
    softcap = s.softcap;
    window = s.window;
    offset = s.Lk - s.Lq;
    mask_k = s.mask_k;
  }

  // What the queries are multiplied by as they are loaded.
  __device__ __forceinline__ static float q_scale(const AttnSizes& s) {
    return SCALE_Q ? (SOFTCAP ? s.scale : s.scale * LOG2E) : 1.0f;
  }

  // Whether the causal/window mask lets query qi see key j.
  __device__ __forceinline__ bool visible(int qi, int j) const {
    if constexpr (!CAUSAL) {
      return true;
    } else {
      const int pos = offset + qi;
      return j <= pos && (window <= 0 || j > pos - window);
    }
  }

  // The score before any mask.
  __device__ __forceinline__ float plain(float dot) const {
    float s = SCALE_Q ? dot : dot * score_scale;
    if constexpr (SOFTCAP) s = softcap * tanhf(s / softcap) * LOG2E;
    return s;
  }

  // mrow: the mask's row for this (batch, head, query), or null.
  __device__ __forceinline__ float operator()(float dot, int qi, int j, const MaskT* mrow) const {
    float s = plain(dot);
    if constexpr (MASK == MASK_ADDITIVE) s += to_float(mrow[long(j) * mask_k]) * LOG2E;
    if constexpr (MASK == MASK_BOOL) {
      if (!mrow[long(j) * mask_k]) return MASKED;
    }
    return visible(qi, j) ? s : MASKED;
  }
};

// Merges softmax states (m, l) in the log2 domain: the factor for a state of max m
// against the new max; a state that saw no key (m = -inf) weighs nothing.
__device__ __forceinline__ float rescale(float m, float m_new) {
  return m == -inf() ? 0.0f : fast_exp2(m - m_new);
}

}  // namespace ke

#endif  // KE_ATTENTION_COMMON_CUH
