// kernelevo's Metal helpers: the first part of every kernelevo kernel's header.
//
// MLX pastes a kernel's header after its own prelude (metal_stdlib, bfloat16_t, Limits,
// MLX_MTL_PRAGMA_UNROLL) and before the [[kernel]] function it writes around our body.
// Everything here lives in namespace ke.
//
// Rules every template follows, because only Apple's compiler would catch a breach:
// - Kernel inputs are taken as template pointer types (PA, PB, ...): MLX binds an input of
//   fewer than 8 elements in the `constant` address space and larger ones in `device`,
//   and a `const device T*` parameter would not accept the former.
// - threadgroup arrays are declared in the kernel body (MSL allows them only at kernel
//   scope) and handed in as pointers.
// - No erf/nullptr/double: Metal has no erf; absent inputs are replaced by a present
//   one that is never read; float literals carry an f.
// - Masked scores are finite (fast math may not honour infinities).
#ifndef KE_COMMON_H
#define KE_COMMON_H

namespace ke {

static constant constexpr float LOG2E = 1.4426950408889634f;
// A score the mask hides (log2 domain): exp2 of it minus any real score is 0, yet a row
// whose every key is hidden still gets a uniform softmax (the mean of v), as MLX gives.
static constant constexpr float MASKED = -1.0e30f;
// Below any score, masked or not: the running maximum before the first key, and the score
// of a position past the end of the keys (weight exactly 0).
static constant constexpr float ABSENT = -1.0e38f;

METAL_FUNC int cdiv(int a, int b) {
  return (a + b - 1) / b;
}

// ---- simdgroup_matrix fragments ------------------------------------------------------
//
// Apple's 8x8 layout: lane l holds row (l/4 & 4) + (l/2 % 4), columns
// (l/4 & 2) * 2 + (l % 2) * 2 and the one after. Fragments are float (f32 multiply and
// accumulate for every dtype); each lane loads its two elements itself, converting from
// T, so any strides (transposed tiles) work.
typedef simdgroup_matrix<float, 8, 8> frag;

// (column, row) of the lane's first element.
METAL_FUNC short2 frag_coord(ushort lane) {
  const short qid = lane / 4;
  const short col = (qid & 2) * 2 + (lane % 2) * 2;
  const short row = (qid & 4) + (lane / 2) % 4;
  return short2(col, row);
}

METAL_FUNC thread vec<float, 2>& elems(thread frag& f) {
  return reinterpret_cast<thread vec<float, 2>&>(f.thread_elements());
}

// Loads fragment element (r, c) from src[r * rs + c * cs] for the lane's two elements.
template <typename T>
METAL_FUNC void frag_load(thread frag& f, const threadgroup T* src, int rs, int cs, short2 rc) {
  const threadgroup T* p = src + rc.y * rs + rc.x * cs;
  elems(f) = vec<float, 2>(static_cast<float>(p[0]), static_cast<float>(p[cs]));
}

METAL_FUNC frag frag_zero() {
  return make_filled_simdgroup_matrix<float, 8>(0.0f);
}

// ---- the fused matmul epilogue -------------------------------------------------------

enum Activation { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2, ACT_GELU = 3, ACT_GELU_TANH = 4 };

// erf to 1.5e-7 absolute (Abramowitz & Stegun 7.1.26); Metal's library has none.
METAL_FUNC float erf_approx(float x) {
  const float ax = metal::abs(x);
  const float t = 1.0f / (1.0f + 0.3275911f * ax);
  const float poly =
      ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t + 0.254829592f) * t;
  const float y = 1.0f - poly * metal::exp(-ax * ax);
  return x < 0.0f ? -y : y;
}

template <int ACT>
METAL_FUNC float activate(float x) {
  if constexpr (ACT == ACT_RELU) {
    return metal::max(x, 0.0f);
  } else if constexpr (ACT == ACT_SILU) {
    return x / (1.0f + metal::exp(metal::min(-x, 80.0f)));  // no overflow to inf
  } else if constexpr (ACT == ACT_GELU) {
    return 0.5f * x * (1.0f + erf_approx(x * 0.70710678118654752f));
  } else if constexpr (ACT == ACT_GELU_TANH) {
    return 0.5f * x * (1.0f + metal::precise::tanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
  } else {
    return x;
  }
}

// activation(alpha * v + bias[n]) + residual[at], in f32: the order kernelevo's
// matmul epilogue has on every backend.
template <bool BIAS, int ACT, bool RESIDUAL, bool SCALE, typename PBias, typename PRes>
METAL_FUNC float epilogue(float v, float alpha, PBias bias, int n, PRes residual, int64_t at) {
  if constexpr (SCALE) {
    v *= alpha;
  }
  if constexpr (BIAS) {
    v += static_cast<float>(bias[n]);
  }
  v = activate<ACT>(v);
  if constexpr (RESIDUAL) {
    v += static_cast<float>(residual[at]);
  }
  return v;
}

}  // namespace ke

#endif  // KE_COMMON_H
