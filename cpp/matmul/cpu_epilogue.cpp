// The epilogue of a product, out = act(acc * scale + bias) + residual, on 16-lane vectors,
// and the f32 -> output dtype rounding that ends every kernel.
#include <algorithm>
#include <cstdlib>
#include <new>
#include <vector>

#include "matmul/cpu_kernels.h"

namespace kernelevo::cpu::detail {

void* Scratch::get(size_t bytes) {
  if (bytes > capacity_) {
    std::free(data_);
    size_t rounded = std::max<size_t>(64, (bytes + 63) / 64 * 64);
    data_ = std::aligned_alloc(64, rounded);
    if (!data_) {
      capacity_ = 0;
      throw std::bad_alloc();
    }
    capacity_ = rounded;
  }
  return data_;
}

Scratch::~Scratch() {
  std::free(data_);
}

namespace {

inline vfloat activate(Activation act, vfloat x) {
  switch (act) {
    case Activation::none: return x;
    case Activation::relu: return vmax(x, vfloat{});
    case Activation::gelu: return 0.5f * x * (1.0f + verf(x * 0.70710678118654752f));
    case Activation::gelu_tanh:
      return 0.5f * x * (1.0f + vtanh(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case Activation::silu: return x / (1.0f + vexp(-x));
  }
  return x;
}

// n <= 16 values of an epilogue operand's row i from column j on, as f32.
template <typename E>
inline vfloat load_operand(const Operand& op, int64_t batch, int64_t i, int64_t j, int n) {
  using T = typename E::raw;
  const T* row = static_cast<const T*>(op.data) + op.batch_offsets[batch] + i * op.row_stride;
  if (op.col_stride == 1) {
    return n == kLanes ? load16<E>(row + j) : load_partial<E>(row + j, n);
  }
  if (op.col_stride == 0) return splat(to_f32<E>(row[0]));  // broadcast along the row
  float tmp[kLanes] = {};
  for (int l = 0; l < n; ++l) tmp[l] = to_f32<E>(row[(j + l) * op.col_stride]);
  return vload(tmp);
}

// One row segment: acc[0:n] -> out[0:n] (out is C at (batch, i, j0)).
template <typename E>
void finish_row(const GemmProblem& p, int64_t batch, int64_t i, int64_t j0, int n,
                const float* acc, typename E::raw* out, bool apply) {
  const Epilogue& ep = p.epilogue;
  for (int j = 0; j < n; j += kLanes) {
    const int len = std::min(kLanes, n - j);
    vfloat v = len == kLanes ? vload(acc + j) : load_partial<F32>(acc + j, len);
    if (apply) {
      if (ep.scale != 1.0f) v *= ep.scale;
      if (ep.bias.data) v += load_operand<E>(ep.bias, batch, i, j0 + j, len);
      v = activate(ep.activation, v);
      if (ep.residual.data) v += load_operand<E>(ep.residual, batch, i, j0 + j, len);
    }
    if (len == kLanes) {
      store16<E>(out + j, v);
    } else {
      store_partial<E>(out + j, v, len);
    }
  }
}

template <typename E>
void finalize_typed(const GemmProblem& p, int64_t batch, int64_t i0, int64_t j0, int rows,
                    int cols, const float* acc, int64_t ldacc, bool apply) {
  using T = typename E::raw;
  T* c = static_cast<T*>(p.c) + batch * p.M * p.N;
  for (int r = 0; r < rows; ++r) {
    finish_row<E>(p, batch, i0 + r, j0, cols, acc + r * ldacc, c + (i0 + r) * p.N + j0, apply);
  }
}

template <typename E>
void pass_typed(const GemmProblem& p, int64_t begin, int64_t end) {
  using T = typename E::raw;
  thread_local std::vector<float> row;
  row.resize(p.N);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t batch = r / p.M, i = r % p.M;
    T* c = static_cast<T*>(p.c) + r * p.N;
    for (int64_t j = 0; j < p.N; ++j) row[j] = to_f32<E>(c[j]);
    finish_row<E>(p, batch, i, 0, static_cast<int>(p.N), row.data(), c, true);
  }
}

}  // namespace

void finalize_tile(const GemmProblem& p, int64_t batch, int64_t i0, int64_t j0, int rows,
                   int cols, const float* acc, int64_t ldacc, bool apply) {
  switch (p.dtype) {
    case Dtype::f32: return finalize_typed<F32>(p, batch, i0, j0, rows, cols, acc, ldacc, apply);
    case Dtype::f16: return finalize_typed<F16>(p, batch, i0, j0, rows, cols, acc, ldacc, apply);
    case Dtype::bf16: return finalize_typed<BF16>(p, batch, i0, j0, rows, cols, acc, ldacc, apply);
  }
}

void epilogue_pass(const GemmProblem& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case Dtype::f32: return pass_typed<F32>(p, begin, end);
    case Dtype::f16: return pass_typed<F16>(p, begin, end);
    case Dtype::bf16: return pass_typed<BF16>(p, begin, end);
  }
}

}  // namespace kernelevo::cpu::detail
