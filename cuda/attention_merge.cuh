// Split-KV attention, second pass: combines the partial softmaxes (o, m, l) that the
// slices of the keys left (attention_decode.cuh and attention_flash.cuh with SPLIT).
#ifndef KE_ATTENTION_MERGE_CUH
#define KE_ATTENTION_MERGE_CUH

namespace ke {

constexpr int MAX_SLICES = 1024;  // split-KV slices the merge kernel's shared memory holds

// Split-KV, second pass: one block per output row combines the slices' partials.
template <class T, int D>
__device__ __forceinline__ void attention_merge(const float* o_part, const float* ml_part,
                                                const int* sizes, T* out) {
  KE_DYNAMIC_SMEM(smem_raw);
  float* weight = reinterpret_cast<float*>(smem_raw);  // [MAX_SLICES]
  float* scratch = weight + MAX_SLICES;                 // [32]
  const int S = sizes[12];
  const long row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x / 32;
  const float* ml = ml_part + row * S * 2;

  float m_all = -inf();
  for (int s = tid; s < S; s += blockDim.x) m_all = fmaxf(m_all, ml[2 * s]);
  m_all = warp_max(m_all);
  if (lane == 0) scratch[warp] = m_all;
  __syncthreads();
  m_all = -inf();
  for (int w = 0; w < warps; ++w) m_all = fmaxf(m_all, scratch[w]);
  __syncthreads();

  float l_all = 0.0f;
  for (int s = tid; s < S; s += blockDim.x) {
    const float f = rescale(ml[2 * s], m_all);
    weight[s] = f;
    l_all += f * ml[2 * s + 1];
  }
  l_all = warp_sum(l_all);
  if (lane == 0) scratch[warp] = l_all;
  __syncthreads();
  l_all = 0.0f;
  for (int w = 0; w < warps; ++w) l_all += scratch[w];

  for (int d = tid; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (int s = 0; s < S; ++s) o += weight[s] * o_part[(row * S + s) * D + d];
    out[row * D + d] = from_float<T>(o / l_all);
  }
}

}  // namespace ke

#endif  // KE_ATTENTION_MERGE_CUH
