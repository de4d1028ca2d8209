#include "rowwise/rowwise.h"

#include <cmath>
#include <memory>
#include <vector>

#include "common/errors.h"
#include "matmul/cpu_simd.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/fast.h"

namespace kernelevo {

namespace {

using cpu::BF16;
using cpu::F16;
using cpu::F32;

[[noreturn]] void fail(const char* op, const std::string& message) {
  throw std::invalid_argument(std::string("[kernelevo.") + op + "] " + message);
}

bool is_float(mx::Dtype d) { return d == mx::float32 || d == mx::float16 || d == mx::bfloat16; }

mx::Stream stream_of(mx::StreamOrDevice s) { return mx::to_stream(s); }

// Calls f(E{}) with E the element type of dtype d (f32, f16 or bf16).
template <typename F>
void with_type(mx::Dtype d, F&& f) {
  if (d == mx::float32) f(F32{});
  else if (d == mx::float16) f(F16{});
  else f(BF16{});
}

// Element offsets of every index of the leading `axes` axes of an array (row-major order
// of those axes), from its strides: rows of any layout, without a copy.
std::vector<int64_t> leading_offsets(const mx::array& x, int axes) {
  std::vector<int64_t> offsets{0};
  for (int a = 0; a < axes; ++a) {
    std::vector<int64_t> next;
    next.reserve(offsets.size() * x.shape(a));
    for (int64_t base : offsets) {
      for (int i = 0; i < x.shape(a); ++i) next.push_back(base + i * x.strides()[a]);
    }
    offsets = std::move(next);
  }
  return offsets;
}

template <typename In, typename Out, typename W>
void rms_norm_rows(const typename In::raw* x, const std::vector<int64_t>& rows, int64_t step,
                   int64_t D, const typename W::raw* w, float eps, typename Out::raw* out) {
  for (size_t r = 0; r < rows.size(); ++r) {
    const typename In::raw* row = x + rows[r];
    float sum = 0.0f;
    for (int64_t i = 0; i < D; ++i) {
      const float v = cpu::to_f32<In>(row[i * step]);
      sum += v * v;
    }
    const float inv = 1.0f / std::sqrt(sum / float(D) + eps);
    typename Out::raw* y = out + r * D;
    for (int64_t i = 0; i < D; ++i) {
      // Rounded to the output type before the weight, as MLX's op does.
      const auto normed = cpu::from_f32<Out>(cpu::to_f32<In>(row[i * step]) * inv);
      y[i] = w ? cpu::from_f32<Out>(cpu::to_f32<Out>(normed) * cpu::to_f32<W>(w[i])) : normed;
    }
  }
}

}  // namespace

// ---- rms_norm ---------------------------------------------------------------------------

mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& weight, float eps,
                   mx::StreamOrDevice s) {
  if (x.ndim() == 0) fail("rms_norm", "x must have at least one dimension");
  if (weight && (weight->ndim() != 1 || weight->size() != static_cast<size_t>(x.shape(-1)))) {
    fail("rms_norm", "weight must be one-dimensional with as many elements as x's last axis");
  }
  const mx::Dtype out_type = weight ? mx::promote_types(x.dtype(), weight->dtype()) : x.dtype();
  if (!is_float(x.dtype()) || !is_float(out_type)) {
    fail("rms_norm", "supports float32, float16 and bfloat16");
  }
  const mx::Stream stream = stream_of(s);
  std::vector<mx::array> inputs{x};
  if (weight) inputs.push_back(mx::astype(*weight, out_type, stream));
  return mx::array(x.shape(), out_type, std::make_shared<RmsNorm>(stream, eps, weight.has_value()),
                   std::move(inputs));
}

void RmsNorm::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const mx::array& x = inputs[0];
  mx::array& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);
  auto rows = std::make_shared<std::vector<int64_t>>(leading_offsets(x, x.ndim() - 1));
  const int64_t D = x.shape(-1), step = x.strides().back();
  const void* xp = x.data<void>();
  const void* wp = has_weight_ ? inputs[1].data<void>() : nullptr;
  void* op = out.data<void>();
  const mx::Dtype in_type = x.dtype(), out_type = out.dtype();
  const float eps = eps_;
  encoder.dispatch([=]() {
    with_type(in_type, [&](auto in) {
      with_type(out_type, [&](auto o) {
        using In = decltype(in);
        using Out = decltype(o);
        rms_norm_rows<In, Out, Out>(static_cast<const typename In::raw*>(xp), *rows, step, D,
                                    static_cast<const typename Out::raw*>(wp), eps,
                                    static_cast<typename Out::raw*>(op));
      });
    });
  });
}

void RmsNorm::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw BackendNotSupported("[kernelevo.rms_norm] runs on the CPU (GPU streams use MLX's op)");
}

std::vector<mx::array> RmsNorm::vjp(const std::vector<mx::array>& primals,
                                    const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums,
                                    const std::vector<mx::array>&) {
  const mx::Stream s = stream();
  const float eps = eps_;
  const bool has_weight = has_weight_;
  auto mlx_op = [=](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{
        mx::fast::rms_norm(in[0], has_weight ? std::optional<mx::array>(in[1]) : std::nullopt, eps, s)};
  };
  auto grads = mx::vjp(mlx_op, primals, cotangents).second;
  std::vector<mx::array> out;
  for (int i : argnums) out.push_back(grads[i]);
  return out;
}

bool RmsNorm::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const RmsNorm&>(other);
  return eps_ == o.eps_ && has_weight_ == o.has_weight_;
}

// ---- rope -------------------------------------------------------------------------------

mx::array rope(const mx::array& x, int dims, bool traditional, std::optional<float> base,
               float scale, const mx::array& offset, const std::optional<mx::array>& freqs,
               mx::StreamOrDevice s) {
  if (x.ndim() < 3) fail("rope", "x must have at least 3 dimensions ([batch, ..., positions, features])");
  if (!is_float(x.dtype())) fail("rope", "supports float32, float16 and bfloat16");
  if (dims <= 0 || dims % 2 != 0 || dims > x.shape(-1)) {
    fail("rope", "dims must be even, positive and at most x's last dimension (" +
                     std::to_string(x.shape(-1)) + "); got " + std::to_string(dims));
  }
  if (offset.ndim() > 1 || (offset.size() != 1 && offset.size() != static_cast<size_t>(x.shape(0)))) {
    fail("rope", "offset must be a scalar or have one element per batch (" +
                     std::to_string(x.shape(0)) + ")");
  }
  if (!mx::issubdtype(offset.dtype(), mx::integer)) fail("rope", "offset must be an integer");
  if (freqs.has_value() == base.has_value()) fail("rope", "give exactly one of base and freqs");
  if (freqs && (freqs->ndim() != 1 || freqs->size() != static_cast<size_t>(dims / 2))) {
    fail("rope", "freqs must be one-dimensional with dims / 2 = " + std::to_string(dims / 2) + " elements");
  }
  const mx::Stream stream = stream_of(s);
  std::vector<mx::array> inputs{x, mx::astype(offset, mx::int32, stream)};
  if (freqs) inputs.push_back(mx::astype(*freqs, mx::float32, stream));
  return mx::array(x.shape(), x.dtype(),
                   std::make_shared<Rope>(stream, dims, traditional, base.value_or(0.0f), scale,
                                          freqs.has_value()),
                   std::move(inputs));
}

namespace {

struct RopeProblem {
  int64_t batch, heads, positions, features;  // x viewed as [batch, heads..., positions, features]
  std::vector<int64_t> head_offsets;          // element offset of each (flattened) head
  int64_t batch_stride, position_stride, feature_stride;
  int dims;
  bool traditional;
  float scale;
  std::vector<float> inv_freqs;  // dims / 2
};

template <typename E>
void rope_rows(const RopeProblem& p, const int32_t* offsets, int64_t offset_count,
               const typename E::raw* x, typename E::raw* out) {
  const int half = p.dims / 2;
  std::vector<float> cosines(half), sines(half);
  for (int64_t b = 0; b < p.batch; ++b) {
    const float start = float(offsets[offset_count > 1 ? b : 0]);
    for (int64_t t = 0; t < p.positions; ++t) {
      const float position = p.scale * (start + float(t));
      for (int i = 0; i < half; ++i) {
        const float theta = position * p.inv_freqs[i];
        cosines[i] = std::cos(theta);
        sines[i] = std::sin(theta);
      }
      for (int64_t h = 0; h < p.heads; ++h) {
        const typename E::raw* row = x + b * p.batch_stride + p.head_offsets[h] + t * p.position_stride;
        typename E::raw* y = out + ((b * p.heads + h) * p.positions + t) * p.features;
        auto at = [&](int64_t i) { return cpu::to_f32<E>(row[i * p.feature_stride]); };
        for (int i = 0; i < half; ++i) {
          const int64_t i1 = p.traditional ? 2 * i : i, i2 = p.traditional ? 2 * i + 1 : i + half;
          const float x1 = at(i1), x2 = at(i2);
          y[i1] = cpu::from_f32<E>(x1 * cosines[i] - x2 * sines[i]);
          y[i2] = cpu::from_f32<E>(x1 * sines[i] + x2 * cosines[i]);
        }
        for (int64_t i = p.dims; i < p.features; ++i) y[i] = row[i * p.feature_stride];
      }
    }
  }
}

}  // namespace

void Rope::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const mx::array& x = inputs[0];
  const mx::array& offset = inputs[1];
  mx::array& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& a : inputs) encoder.set_input_array(a);
  encoder.set_output_array(out);

  const int n = x.ndim();
  auto p = std::make_shared<RopeProblem>();
  p->batch = x.shape(0);
  p->positions = x.shape(n - 2);
  p->features = x.shape(n - 1);
  p->batch_stride = x.strides()[0];
  p->position_stride = x.strides()[n - 2];
  p->feature_stride = x.strides()[n - 1];
  // The head axes (between batch and positions), flattened.
  std::vector<int64_t> heads{0};
  for (int a = 1; a < n - 2; ++a) {
    std::vector<int64_t> next;
    for (int64_t base : heads) {
      for (int i = 0; i < x.shape(a); ++i) next.push_back(base + i * x.strides()[a]);
    }
    heads = std::move(next);
  }
  p->heads = static_cast<int64_t>(heads.size());
  p->head_offsets = std::move(heads);
  p->dims = dims_;
  p->traditional = traditional_;
  p->scale = scale_;
  const int half = dims_ / 2;
  p->inv_freqs.resize(half);
  const float* freqs = has_freqs_ ? inputs[2].data<float>() : nullptr;
  const float log_base_step = std::log(base_) / float(half);
  // The frequencies are read when the task runs (freqs may be computed by an earlier task).
  const void* xp = x.data<void>();
  void* op = out.data<void>();
  const int32_t* offsets = offset.data<int32_t>();
  const int64_t offset_count = static_cast<int64_t>(offset.size());
  const mx::Dtype dtype = x.dtype();
  encoder.dispatch([=]() {
    for (int i = 0; i < half; ++i) {
      p->inv_freqs[i] = freqs ? 1.0f / freqs[i] : std::exp(-float(i) * log_base_step);
    }
    with_type(dtype, [&](auto e) {
      using E = decltype(e);
      rope_rows<E>(*p, offsets, offset_count, static_cast<const typename E::raw*>(xp),
                   static_cast<typename E::raw*>(op));
    });
  });
}

void Rope::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw BackendNotSupported("[kernelevo.rope] runs on the CPU (GPU streams use MLX's op)");
}

std::vector<mx::array> Rope::vjp(const std::vector<mx::array>& primals,
                                 const std::vector<mx::array>& cotangents,
                                 const std::vector<int>& argnums,
                                 const std::vector<mx::array>&) {
  const mx::Stream s = stream();
  const int dims = dims_;
  const bool traditional = traditional_;
  const float scale = scale_;
  const std::optional<float> base = has_freqs_ ? std::nullopt : std::optional<float>(base_);
  const mx::array offset = primals[1];
  const std::optional<mx::array> freqs = has_freqs_ ? std::optional<mx::array>(primals[2]) : std::nullopt;
  auto mlx_op = [=](const std::vector<mx::array>& in) {
    return std::vector<mx::array>{mx::fast::rope(in[0], dims, traditional, base, scale, offset, freqs, s)};
  };
  const mx::array dx = mx::vjp(mlx_op, {primals[0]}, cotangents).second[0];
  std::vector<mx::array> out;
  for (int i : argnums) out.push_back(i == 0 ? dx : mx::zeros_like(primals[i], s));
  return out;
}

bool Rope::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Rope&>(other);
  return dims_ == o.dims_ && traditional_ == o.traditional_ && base_ == o.base_ &&
         scale_ == o.scale_ && has_freqs_ == o.has_freqs_;
}

}  // namespace kernelevo
