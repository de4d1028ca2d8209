// CPU attention kernels: out = softmax(mask(softcap(scale * q k^T))) v, fused, with f32
// softmax statistics and accumulation whatever the input dtype (f32, f16, bf16).
//
// Three families (their parameters are defined in src/kernelevo/families/cpu_attention.py):
//   flash         prefill: tiles of queries against blocks of keys with an online softmax;
//                 the score matrix exists one block at a time, never whole
//   decode        few queries: all query rows of a key/value head stream its keys once
//   decode_split  decode with each head's key sequence split into chunks run in
//                 parallel, their partial softmaxes merged at the end
//
// Semantics (those of mx.fast.scaled_dot_product_attention, plus softcap and window):
//   score(i, j) = scale * q_i . k_j; with softcap c: c * tanh(score / c); then an
//   additive mask is added, and keys excluded by a boolean mask (false), by causality
//   (j > i + kv_len - q_len: the last query aligns with the last key) or by the window
//   (j <= i + kv_len - q_len - window) get no weight. A row in which no key has a finite
//   score (fully masked) outputs the mean of v over all keys: what MLX outputs for a row
//   that its boolean mask masks fully (it fills masked scores with the lowest finite
//   value, so their softmax is uniform).
#pragma once

#include <cstdint>

#include "common/config.h"
#include "common/dtype.h"

namespace kernelevo::cpu {

enum class MaskKind { none, boolean, additive };

// A rank-4 operand: element (i0, i1, i2, i3) at data + sum(i_k * strides[k]) (elements).
struct Tensor4 {
  const void* data = nullptr;
  int64_t strides[4] = {0, 0, 0, 0};
};

struct AttentionProblem {
  int64_t batch, heads, kv_heads, q_len, kv_len, head_dim, v_dim;
  Dtype dtype;           // of q, k, v, the output and an additive mask
  Tensor4 q, k, v;       // [batch, heads or kv_heads, length, dim]
  MaskKind mask;
  Tensor4 mask_values;   // [batch, heads, q_len, kv_len] (broadcast strides may be 0)
  bool causal;
  int64_t window;        // 0: none
  float scale, softcap;  // softcap 0: none
  void* out;             // contiguous [batch, heads, q_len, v_dim]
};

// Runs the configuration's family on the problem; throws std::invalid_argument if the
// configuration is not one these kernels take.
void attention(const AttentionProblem& problem, const KernelConfig& config);

// Throws std::invalid_argument unless the CPU attention kernels take exactly this
// configuration (every parameter read, none missing, each within its range).
void validate_attention_config(const KernelConfig& config);

// Throws std::invalid_argument unless the configuration can run a call of this dtype and
// query length (decode's query limit; dot=amx's bf16 inputs and the AMX tiles).
void validate_attention_call(const KernelConfig& config, Dtype dtype, int64_t q_len);

// The most query positions the decode families take (they keep every query row of a
// key/value head in registers and L1).
constexpr int64_t kDecodeMaxQueries = 16;

}  // namespace kernelevo::cpu
