// Skinny products (M <= 16 rows of x, e.g. LLM decode): out = epilogue(x @ op(W)), with the
// weight read from memory exactly once and x (small) from cache.
//
// TB (W stored [N, K], a linear layer's weight): each warp owns ROWS output columns; its
// lanes stride over K with VEC-element vector loads of every one of its weight rows and
// of the MB rows of x, then the warp sums its lanes with shuffles.
// Not TB (W stored [K, N]): each lane owns VEC adjacent output columns, so a warp covers
// 32 * VEC columns with coalesced row segments; the WARPS warps of a block split K (ROWS
// rows of W in flight per warp) and sum their partials through shared memory.
//
// sizes: [M, N, K, alpha (f32 bits), a_batched, b_batched]; blockIdx.y is the batch.
#ifndef KE_GEMV_CUH
#define KE_GEMV_CUH

namespace ke {

template <class T, int VEC> struct alignas(VEC * sizeof(T)) Pack {
  T v[VEC];
};

template <class T, int VEC>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pk.v[i]);
}

template <class T, int MB, int WARPS, int ROWS, int VEC, bool TB, bool BIAS, int ACT,
          bool RESIDUAL, bool SCALE>
__device__ __forceinline__ void gemv(const T* x, const T* w, const T* bias, const T* residual,
                                     const int* sizes, T* out) {
  const int M = sizes[0], N = sizes[1], K = sizes[2];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const long batch = blockIdx.y;
  x += sizes[4] ? batch * M * K : 0;
  w += sizes[5] ? batch * N * K : 0;
  out += batch * M * N;
  Epilogue<T, BIAS, ACT, RESIDUAL, SCALE> epi{bias, RESIDUAL ? residual + batch * M * N : residual,
                                             __int_as_float(sizes[3])};
  const bool vec = K % VEC == 0 && (reinterpret_cast<unsigned long long>(x) % (VEC * sizeof(T))) == 0 &&
                   (reinterpret_cast<unsigned long long>(w) % (VEC * sizeof(T))) == 0 &&
                   (TB || N % VEC == 0);
  if constexpr (TB) {
    const int n0 = (blockIdx.x * WARPS + warp) * ROWS;
    float acc[MB][ROWS];
#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) acc[m][r] = 0.0f;
    if (vec) {
      for (int k = lane * VEC; k < K; k += 32 * VEC) {
        float wv[ROWS][VEC], xv[VEC];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (n0 + r < N) {
            load_pack<T, VEC>(w + long(n0 + r) * K + k, wv[r]);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) wv[r][i] = 0.0f;
          }
        }
#pragma unroll
        for (int m = 0; m < MB; ++m) {
          if (m < M) {
            load_pack<T, VEC>(x + long(m) * K + k, xv);
#pragma unroll
            for (int r = 0; r < ROWS; ++r)
#pragma unroll
              for (int i = 0; i < VEC; ++i) acc[m][r] += xv[i] * wv[r][i];
          }
        }
      }
    } else {
      for (int k = lane; k < K; k += 32) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float wk = n0 + r < N ? to_float(w[long(n0 + r) * K + k]) : 0.0f;
#pragma unroll
          for (int m = 0; m < MB; ++m)
            if (m < M) acc[m][r] += to_float(x[long(m) * K + k]) * wk;
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float s = warp_sum(acc[m][r]);
        const int n = n0 + r;
        if (lane == (m * ROWS + r) % 32 && m < M && n < N) {
          out[long(m) * N + n] = from_float<T>(epi(s, long(m) * N + n, n));
        }
      }
  } else {
    KE_DYNAMIC_SMEM(smem_raw);
    float* partial = reinterpret_cast<float*>(smem_raw);  // [WARPS - 1][MB][32 * VEC]
    const int n0 = blockIdx.x * 32 * VEC + lane * VEC;
    float acc[MB][VEC];
#pragma unroll
    for (int m = 0; m < MB; ++m)
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[m][i] = 0.0f;
    for (int k0 = warp * ROWS; k0 < K; k0 += WARPS * ROWS) {
      float wv[ROWS][VEC];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const int k = k0 + r;
        if (vec && k < K && n0 < N) {
          load_pack<T, VEC>(w + long(k) * N + n0, wv[r]);
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i)
            wv[r][i] = (k < K && n0 + i < N) ? to_float(w[long(k) * N + n0 + i]) : 0.0f;
        }
      }
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < M) {
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            const float xk = k0 + r < K ? to_float(x[long(m) * K + k0 + r]) : 0.0f;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[m][i] += xk * wv[r][i];
          }
        }
      }
    }
    if (warp > 0) {
#pragma unroll
      for (int m = 0; m < MB; ++m)
#pragma unroll
        for (int i = 0; i < VEC; ++i)
          partial[((warp - 1) * MB + m) * 32 * VEC + lane * VEC + i] = acc[m][i];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m >= M) continue;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float s = acc[m][i];
          for (int w2 = 1; w2 < WARPS; ++w2) s += partial[((w2 - 1) * MB + m) * 32 * VEC + lane * VEC + i];
          const int n = n0 + i;
          if (n < N) out[long(m) * N + n] = from_float<T>(epi(s, long(m) * N + n, n));
        }
      }
    }
  }
}

}  // namespace ke

#endif  // KE_GEMV_CUH
