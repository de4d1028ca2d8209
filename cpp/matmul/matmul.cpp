#include "matmul/matmul.h"

#include <numeric>

#include "common/errors.h"
#include "common/text.h"
#include "matmul/cpu_gemm.h"
#include "mlx/backend/cpu/encoder.h"

namespace kernelevo {

namespace {

MatmulSelector& selector() {
  static MatmulSelector* instance = new MatmulSelector();  // outlives interpreter teardown
  return *instance;
}

mx::Shape broadcast_batch(const mx::Shape& a, const mx::Shape& b) {
  size_t n = std::max(a.size(), b.size());
  mx::Shape out(n, 1);
  for (size_t i = 0; i < n; ++i) {
    int da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    int db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    if (da != db && da != 1 && db != 1) {
      throw std::invalid_argument("[kernelevo.matmul] batch shapes " + shape_str(a) +
                                  " and " + shape_str(b) + " cannot be broadcast");
    }
    out[i] = da == 1 ? db : da;
  }
  return out;
}

const char* const kActivations[] = {"none", "relu", "gelu", "gelu_tanh", "silu"};

cpu::Activation parse_activation(const std::string& name) {
  for (int i = 0; i < 5; ++i) {
    if (name == kActivations[i]) return static_cast<cpu::Activation>(i);
  }
  throw std::invalid_argument("[kernelevo.matmul] unknown activation '" + name +
                              "'; expected one of none, relu, gelu, gelu_tanh, silu");
}

// d act(y) / dy, from MLX ops (for the epilogue's gradients).
mx::array activation_derivative(const std::string& act, const mx::array& y, mx::Stream s) {
  const mx::Dtype t = y.dtype();
  auto c = [&](double v) { return mx::array(static_cast<float>(v), t); };
  if (act == "relu") return mx::astype(mx::greater(y, c(0.0), s), t, s);
  if (act == "silu") {
    mx::array sig = mx::sigmoid(y, s);
    return mx::multiply(sig, mx::add(c(1.0), mx::multiply(y, mx::subtract(c(1.0), sig, s), s), s), s);
  }
  if (act == "gelu") {
    // Phi(y) + y phi(y)
    mx::array cdf = mx::multiply(c(0.5), mx::add(c(1.0), mx::erf(mx::multiply(y, c(0.70710678118654752), s), s), s), s);
    mx::array pdf = mx::multiply(c(0.3989422804014327), mx::exp(mx::multiply(c(-0.5), mx::square(y, s), s), s), s);
    return mx::add(cdf, mx::multiply(y, pdf, s), s);
  }
  if (act == "gelu_tanh") {
    const double k = 0.79788456080286536, a = 0.044715;
    mx::array y2 = mx::square(y, s);
    mx::array th = mx::tanh(mx::multiply(c(k), mx::multiply(y, mx::add(c(1.0), mx::multiply(c(a), y2, s), s), s), s), s);
    mx::array du = mx::multiply(c(k), mx::add(c(1.0), mx::multiply(c(3 * a), y2, s), s), s);
    mx::array sech2 = mx::subtract(c(1.0), mx::square(th, s), s);
    return mx::add(mx::multiply(c(0.5), mx::add(c(1.0), th, s), s),
                   mx::multiply(mx::multiply(c(0.5), y, s), mx::multiply(sech2, du, s), s), s);
  }
  return mx::ones_like(y, s);
}

cpu::Dtype cpu_dtype(mx::Dtype d) {
  if (d == mx::float32) return cpu::Dtype::f32;
  if (d == mx::float16) return cpu::Dtype::f16;
  return cpu::Dtype::bf16;
}

// Element offsets of every batch entry of x (batch axes are all but the last two).
std::vector<int64_t> batch_offsets(const mx::array& x) {
  const int batch_axes = static_cast<int>(x.ndim()) - 2;
  int64_t count = 1;
  for (int i = 0; i < batch_axes; ++i) count *= x.shape(i);
  std::vector<int64_t> offsets(count);
  for (int64_t index = 0; index < count; ++index) {
    int64_t rest = index, offset = 0;
    for (int axis = batch_axes - 1; axis >= 0; --axis) {
      offset += (rest % x.shape(axis)) * x.strides()[axis];
      rest /= x.shape(axis);
    }
    offsets[index] = offset;
  }
  return offsets;
}

}  // namespace

std::string MatmulEpilogue::kind() const {
  const int parts = (scale != 1.0f) + bias.has_value() + (activation != "none") +
                    residual.has_value();
  if (parts == 0) return "none";
  if (parts > 1) return "mixed";
  if (bias) return "bias";
  if (residual) return "residual";
  return activation != "none" ? "activation" : "scale";
}

void set_matmul_selector(MatmulSelector s) {
  selector() = std::move(s);
}

MatmulCall describe_matmul(const mx::Shape& a_shape, const mx::Shape& b_shape,
                           mx::Dtype a_dtype, mx::Dtype b_dtype, bool transpose_a,
                           bool transpose_b, mx::Device::DeviceType device) {
  if (a_shape.empty() || b_shape.empty()) {
    throw std::invalid_argument("[kernelevo.matmul] operands need at least one dimension, got " +
                                shape_str(a_shape) + " and " + shape_str(b_shape));
  }
  if ((transpose_a && a_shape.size() < 2) || (transpose_b && b_shape.size() < 2)) {
    throw std::invalid_argument("[kernelevo.matmul] transposing needs a 2-D or larger operand");
  }
  mx::Dtype dtype = mx::promote_types(a_dtype, b_dtype);
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16) {
    throw std::invalid_argument("[kernelevo.matmul] supports float32, float16 and bfloat16; got " +
                                dtype_str(a_dtype) + " and " + dtype_str(b_dtype));
  }
  const size_t na = a_shape.size(), nb = b_shape.size();
  int64_t M = na == 1 ? 1 : a_shape[transpose_a ? na - 1 : na - 2];
  int64_t Ka = na == 1 ? a_shape[0] : a_shape[transpose_a ? na - 2 : na - 1];
  int64_t Kb = nb == 1 ? b_shape[0] : b_shape[transpose_b ? nb - 1 : nb - 2];
  int64_t N = nb == 1 ? 1 : b_shape[transpose_b ? nb - 2 : nb - 1];
  if (Ka != Kb) {
    throw std::invalid_argument(
        "[kernelevo.matmul] inner dimensions differ: a " + shape_str(a_shape) +
        (transpose_a ? " (transposed)" : "") + " has " + std::to_string(Ka) + ", b " +
        shape_str(b_shape) + (transpose_b ? " (transposed)" : "") + " has " +
        std::to_string(Kb));
  }
  mx::Shape a_batch(a_shape.begin(), a_shape.end() - std::min<size_t>(na, 2));
  mx::Shape b_batch(b_shape.begin(), b_shape.end() - std::min<size_t>(nb, 2));
  mx::Shape batch = broadcast_batch(a_batch, b_batch);
  int64_t count = std::accumulate(batch.begin(), batch.end(), int64_t{1},
                                  std::multiplies<int64_t>());
  return MatmulCall{M, N, Ka, count, dtype, transpose_a, transpose_b, "none", device};
}

mx::array matmul(const mx::array& a_in, const mx::array& b_in,
                 const std::optional<KernelConfig>& config, bool transpose_a,
                 bool transpose_b, const MatmulEpilogue& epilogue, mx::StreamOrDevice s) {
  // Decide the device before asking MLX for a stream: a CPU-only MLX has no GPU stream.
  mx::Device::DeviceType device = mx::default_device().type;
  if (auto* d = std::get_if<mx::Device>(&s)) device = d->type;
  if (auto* st = std::get_if<mx::Stream>(&s)) device = st->device.type;
  MatmulCall call = describe_matmul(a_in.shape(), b_in.shape(), a_in.dtype(), b_in.dtype(),
                                    transpose_a, transpose_b, device);
  parse_activation(epilogue.activation);
  call.epilogue = epilogue.kind();
  if (device != mx::Device::cpu) {
    throw BackendNotSupported(
        "[kernelevo.matmul] not yet supported on this backend (GPU streams); run it on "
        "the CPU, e.g. with stream=mx.cpu");
  }
  const mx::Stream stream = mx::to_stream(s);

  // Treat 1-D operands as a row (a) or a column (b), removed again from the result.
  mx::array a = a_in.ndim() == 1 ? mx::expand_dims(a_in, 0, stream) : a_in;
  mx::array b = b_in.ndim() == 1 ? mx::expand_dims(b_in, 1, stream) : b_in;
  mx::Shape batch = broadcast_batch(mx::Shape(a.shape().begin(), a.shape().end() - 2),
                                    mx::Shape(b.shape().begin(), b.shape().end() - 2));
  mx::Shape out_shape = batch;
  out_shape.push_back(static_cast<int>(call.M));
  out_shape.push_back(static_cast<int>(call.N));
  mx::Shape result_shape = out_shape;  // what the caller gets (1-D operands squeezed)
  if (b_in.ndim() == 1) result_shape.pop_back();
  if (a_in.ndim() == 1) result_shape.erase(result_shape.end() - (b_in.ndim() == 1 ? 1 : 2));

  // Epilogue operands: broadcast to the result, then viewed with the product's axes.
  std::vector<mx::array> extra;
  auto epilogue_operand = [&](const mx::array& x, const char* what) {
    bool fits = x.ndim() <= result_shape.size();
    for (size_t i = 1; fits && i <= x.ndim(); ++i) {
      const int d = x.shape()[x.ndim() - i];
      fits = d == 1 || d == result_shape[result_shape.size() - i];
    }
    if (!fits) {
      throw std::invalid_argument(std::string("[kernelevo.matmul] ") + what + " of shape " +
                                  shape_str(x.shape()) + " does not broadcast to the result " +
                                  shape_str(result_shape));
    }
    if (x.dtype() == mx::complex64) {
      throw std::invalid_argument(std::string("[kernelevo.matmul] ") + what +
                                  " must be a real array");
    }
    mx::array y = mx::broadcast_to(mx::astype(x, call.dtype, stream), result_shape, stream);
    if (result_shape != out_shape) y = mx::reshape(y, out_shape, stream);
    extra.push_back(y);
  };
  if (epilogue.bias) epilogue_operand(*epilogue.bias, "bias");
  if (epilogue.residual) epilogue_operand(*epilogue.residual, "residual");

  KernelConfig chosen;
  if (config) {
    chosen = *config;
  } else if (selector()) {
    chosen = selector()(call);
  } else {
    throw std::invalid_argument(
        "[kernelevo.matmul] no configuration given and no heuristics registered");
  }
  cpu::validate_matmul_config(chosen);

  a = mx::astype(a, call.dtype, stream);
  b = mx::astype(b, call.dtype, stream);
  auto with_batch = [&](const mx::array& x) {
    mx::Shape shape = batch;
    shape.push_back(x.shape(-2));
    shape.push_back(x.shape(-1));
    return shape == x.shape() ? x : mx::broadcast_to(x, shape, stream);
  };
  std::vector<mx::array> inputs = {with_batch(a), with_batch(b)};
  inputs.insert(inputs.end(), extra.begin(), extra.end());

  mx::array out(out_shape, call.dtype,
                std::make_shared<Matmul>(stream, std::move(chosen), transpose_a, transpose_b,
                                         epilogue.scale, epilogue.activation,
                                         epilogue.bias.has_value(), epilogue.residual.has_value()),
                std::move(inputs));
  if (result_shape != out_shape) out = mx::reshape(out, result_shape, stream);
  return out;
}

MatmulEpilogue Matmul::epilogue(const std::vector<mx::array>& inputs) const {
  MatmulEpilogue e;
  e.scale = scale_;
  e.activation = activation_;
  size_t next = 2;
  if (has_bias_) e.bias = inputs.at(next++);
  if (has_residual_) e.residual = inputs.at(next++);
  return e;
}

void Matmul::eval_cpu(const std::vector<mx::array>& inputs,
                      std::vector<mx::array>& outputs) {
  const mx::array& a = inputs[0];
  const mx::array& b = inputs[1];
  mx::array& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));

  // Offsets outlive this call: the kernel runs later, on the CPU stream's thread.
  auto offsets = std::make_shared<std::vector<std::vector<int64_t>>>();
  for (const auto& x : inputs) offsets->push_back(batch_offsets(x));
  auto operand = [&](size_t index, bool transposed) {
    const mx::array& x = inputs[index];
    const int64_t rows = x.strides()[x.ndim() - 2], cols = x.strides()[x.ndim() - 1];
    return cpu::Operand{x.data<void>(), transposed ? cols : rows, transposed ? rows : cols,
                        (*offsets)[index].data()};
  };
  cpu::Epilogue epilogue;
  epilogue.scale = scale_;
  epilogue.activation = parse_activation(activation_);
  size_t next = 2;
  if (has_bias_) epilogue.bias = operand(next++, false);
  if (has_residual_) epilogue.residual = operand(next++, false);
  cpu::GemmProblem problem{
      out.shape(-2),
      out.shape(-1),
      transpose_a_ ? a.shape(-2) : a.shape(-1),
      static_cast<int64_t>((*offsets)[0].size()),
      cpu_dtype(out.dtype()),
      operand(0, transpose_a_),
      operand(1, transpose_b_),
      out.data<void>(),
      epilogue};

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& x : inputs) encoder.set_input_array(x);
  encoder.set_output_array(out);
  // MLX keeps the input buffers alive until the tasks dispatched here have run.
  encoder.dispatch([problem, config = config_, offsets]() { cpu::matmul(problem, config); });
}

void Matmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw BackendNotSupported("[kernelevo.matmul] not yet supported on this backend (GPU)");
}

namespace {

// Gradients of the product C = op(a) op(b) given dC: dop(a) = dC op(b)^T, dop(b) = op(a)^T dC.
mx::array product_grad(int arg, const mx::array& a, const mx::array& b, const mx::array& g,
                       bool ta, bool tb, mx::Stream s) {
  if (arg == 0) {
    return ta ? matmul(b, g, std::nullopt, tb, true, {}, s)
              : matmul(g, b, std::nullopt, false, !tb, {}, s);
  }
  return tb ? matmul(g, a, std::nullopt, true, ta, {}, s)
            : matmul(a, g, std::nullopt, !ta, false, {}, s);
}

}  // namespace

std::vector<mx::array> Matmul::vjp(const std::vector<mx::array>& primals,
                                   const std::vector<mx::array>& cotangents,
                                   const std::vector<int>& argnums,
                                   const std::vector<mx::array>&) {
  const mx::array &a = primals[0], &b = primals[1];
  const mx::Stream s = stream();
  // Through the epilogue first: with y = z * scale + bias, out = act(y) + residual,
  // dy = dout * act'(y) and dz = dy * scale (z recomputed: one more product).
  mx::array g = cotangents[0];
  mx::array dy = g;
  if (activation_ != "none") {
    mx::array y = matmul(a, b, std::nullopt, transpose_a_, transpose_b_, {}, s);
    if (scale_ != 1.0f) y = mx::multiply(y, mx::array(scale_, y.dtype()), s);
    if (has_bias_) y = mx::add(y, primals[2], s);
    dy = mx::multiply(g, activation_derivative(activation_, y, s), s);
  }
  mx::array dz = scale_ != 1.0f ? mx::multiply(dy, mx::array(scale_, dy.dtype()), s) : dy;

  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg < 2) {
      grads.push_back(product_grad(arg, a, b, dz, transpose_a_, transpose_b_, s));
    } else if (arg == 2 && has_bias_) {
      grads.push_back(dy);  // bias enters before the activation
    } else {
      grads.push_back(g);  // the residual is added last
    }
  }
  return grads;
}

std::vector<mx::array> Matmul::jvp(const std::vector<mx::array>& primals,
                                   const std::vector<mx::array>& tangents,
                                   const std::vector<int>& argnums) {
  const mx::Stream s = stream();
  // Tangent of y = z * scale + bias, then of act(y), then of the residual.
  std::optional<mx::array> dy, dres;
  for (size_t i = 0; i < argnums.size(); ++i) {
    const int arg = argnums[i];
    std::optional<mx::array> term;
    if (arg == 0) {
      term = matmul(tangents[i], primals[1], std::nullopt, transpose_a_, transpose_b_, {}, s);
    } else if (arg == 1) {
      term = matmul(primals[0], tangents[i], std::nullopt, transpose_a_, transpose_b_, {}, s);
    } else if (arg == 2 && has_bias_) {
      dy = dy ? mx::add(*dy, tangents[i], s) : tangents[i];
      continue;
    } else {
      dres = tangents[i];
      continue;
    }
    if (scale_ != 1.0f) term = mx::multiply(*term, mx::array(scale_, term->dtype()), s);
    dy = dy ? mx::add(*dy, *term, s) : *term;
  }
  std::optional<mx::array> result;
  if (dy) {
    result = *dy;
    if (activation_ != "none") {
      mx::array y = matmul(primals[0], primals[1], std::nullopt, transpose_a_, transpose_b_, {}, s);
      if (scale_ != 1.0f) y = mx::multiply(y, mx::array(scale_, y.dtype()), s);
      if (has_bias_) y = mx::add(y, primals[2], s);
      result = mx::multiply(*dy, activation_derivative(activation_, y, s), s);
    }
  }
  if (dres) result = result ? mx::add(*result, *dres, s) : *dres;
  return {*result};
}

std::pair<std::vector<mx::array>, std::vector<int>> Matmul::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  const mx::Stream s = stream();
  // Put the mapped axis first (a new axis of 1 where an input is not mapped) and pad
  // a and b to the same number of batch axes, so that broadcasting lines them up.
  int batch_axes = 0, mapped_size = 1;
  for (size_t i = 0; i < 2; ++i) {
    int own = static_cast<int>(inputs[i].ndim()) - 2 - (axes[i] >= 0 ? 1 : 0);
    batch_axes = std::max(batch_axes, own);
  }
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (axes[i] >= 0) mapped_size = inputs[i].shape(axes[i]);
  }
  std::vector<mx::array> moved;
  for (size_t i = 0; i < 2; ++i) {
    mx::array x = axes[i] >= 0 ? mx::moveaxis(inputs[i], axes[i], 0, s)
                               : mx::expand_dims(inputs[i], 0, s);
    int own = static_cast<int>(x.ndim()) - 3;
    for (int k = own; k < batch_axes; ++k) x = mx::expand_dims(x, 1, s);
    moved.push_back(x);
  }
  // The product must already have the mapped axis when only an epilogue operand is mapped.
  if (moved[0].shape(0) != mapped_size) {
    mx::Shape shape = moved[0].shape();
    shape[0] = mapped_size;
    moved[0] = mx::broadcast_to(moved[0], shape, s);
  }
  MatmulEpilogue e = epilogue(inputs);
  auto move_extra = [&](size_t i) {
    return axes[i] >= 0 ? mx::moveaxis(inputs[i], axes[i], 0, s) : inputs[i];
  };
  size_t next = 2;
  if (has_bias_) e.bias = move_extra(next++);
  if (has_residual_) e.residual = move_extra(next++);
  return {{matmul(moved[0], moved[1], config_, transpose_a_, transpose_b_, e, s)}, {0}};
}

bool Matmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Matmul&>(other);
  return config_ == o.config_ && transpose_a_ == o.transpose_a_ &&
         transpose_b_ == o.transpose_b_ && scale_ == o.scale_ && activation_ == o.activation_ &&
         has_bias_ == o.has_bias_ && has_residual_ == o.has_residual_;
}

std::vector<mx::Shape> Matmul::output_shapes(const std::vector<mx::array>& inputs) {
  const mx::array &a = inputs[0], &b = inputs[1];
  mx::Shape shape(a.shape().begin(), a.shape().end() - 2);
  shape.push_back(transpose_a_ ? a.shape(-1) : a.shape(-2));
  shape.push_back(transpose_b_ ? b.shape(-2) : b.shape(-1));
  return {shape};
}

}  // namespace kernelevo
