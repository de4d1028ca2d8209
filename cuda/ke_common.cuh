// kernelevo's CUDA helpers: the first part of every kernelevo kernel's header. MLX pastes
// the header after its own prelude (which includes cuda_fp16.h and cuda_bf16.h) and
// before `namespace mlx::core::cu`, so everything here lives in namespace ke.
//
// The warp-level primitives (cp.async, ldmatrix, mma.sync) are in ke_ptx.cuh, which the
// tests' CPU emulator replaces with its own (tests/cudaemu/emu_ptx.h), so the kernels'
// logic runs unchanged on the CPU.
#ifndef KE_COMMON_CUH
#define KE_COMMON_CUH

namespace ke {

// ---- element types: math in f32, storage in T ---------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> struct Convert;
template <> struct Convert<float> {
  __device__ __forceinline__ static float from(float x) { return x; }
};
template <> struct Convert<__half> {
  __device__ __forceinline__ static __half from(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static unsigned short bits(__half x) { return __half_as_ushort(x); }
};
template <> struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static unsigned short bits(__nv_bfloat16 x) {
    return __bfloat16_as_ushort(x);
  }
};

template <class T> __device__ __forceinline__ T from_float(float x) { return Convert<T>::from(x); }

// Two floats rounded to T (16-bit) and packed low-first: one register of an MMA fragment.
template <class T> __device__ __forceinline__ unsigned int pack2(float lo, float hi) {
  return static_cast<unsigned int>(Convert<T>::bits(from_float<T>(lo))) |
         (static_cast<unsigned int>(Convert<T>::bits(from_float<T>(hi))) << 16);
}

// Sixteen bytes: the unit of vectorised global loads and of cp.async.
struct alignas(16) Vec16 {
  unsigned int w[4];
};

// Unpacks 16 bytes of T into 16 / sizeof(T) floats.
template <class T> __device__ __forceinline__ void unpack16(const Vec16& v, float* out) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 16 / int(sizeof(T)); ++i) out[i] = to_float(e[i]);
}

// ---- reductions -------------------------------------------------------------------

template <int WIDTH = 32> __device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int m = WIDTH / 2; m > 0; m /= 2) x += __shfl_xor_sync(0xffffffffu, x, m);
  return x;
}

template <int WIDTH = 32> __device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int m = WIDTH / 2; m > 0; m /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, m));
  return x;
}

// A finite stand-in for a masked score (log2 domain): exp2 of it minus any real score is
// 0, yet a row whose every key is masked still gets a uniform softmax (the mean of v), as
// MLX's attention gives such a row.
constexpr float MASKED = -1.0e30f;

__device__ __forceinline__ float inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// ---- activations of the fused epilogue (template argument ACT) ----------------------

enum Activation { ACT_NONE = 0, ACT_RELU = 1, ACT_SILU = 2, ACT_GELU = 3, ACT_GELU_TANH = 4 };

template <int ACT> __device__ __forceinline__ float activate(float x) {
  if constexpr (ACT == ACT_RELU) {
    return fmaxf(x, 0.0f);
  } else if constexpr (ACT == ACT_SILU) {
    return x / (1.0f + expf(-x));
  } else if constexpr (ACT == ACT_GELU) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
  } else if constexpr (ACT == ACT_GELU_TANH) {
    return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
  } else {
    return x;
  }
}

template <class T> __device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15) == 0;
}

// The fused epilogue, applied in f32 to one output element.
template <class T, bool BIAS, int ACT, bool RESIDUAL, bool SCALE> struct Epilogue {
  const T* bias;
  const T* residual;  // [batch, M, N], already offset to this batch
  float alpha;
  __device__ __forceinline__ float operator()(float v, long mn, int n) const {
    if constexpr (SCALE) v *= alpha;
    if constexpr (BIAS) v += to_float(bias[n]);
    v = activate<ACT>(v);
    if constexpr (RESIDUAL) v += to_float(residual[mn]);
    return v;
  }
};

}  // namespace ke

#endif  // KE_COMMON_CUH
