#include "matmul/matmul.h"

#include <numeric>
#include <sstream>

#include "common/errors.h"
#include "matmul/cpu_gemm.h"
#include "mlx/backend/cpu/encoder.h"

namespace kernelevo {

namespace {

MatmulSelector& selector() {
  static MatmulSelector* instance = new MatmulSelector();  // outlives interpreter teardown
  return *instance;
}

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  os << (shape.size() == 1 ? ",)" : ")");
  return os.str();
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
    std::ostringstream os;
    os << "[kernelevo.matmul] supports float32, float16 and bfloat16; got " << a_dtype
       << " and " << b_dtype;
    throw std::invalid_argument(os.str());
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
  return MatmulCall{M, N, Ka, count, dtype, transpose_a, transpose_b, device};
}

mx::array matmul(const mx::array& a_in, const mx::array& b_in,
                 const std::optional<KernelConfig>& config, bool transpose_a,
                 bool transpose_b, mx::StreamOrDevice s) {
  // Decide the device before asking MLX for a stream: a CPU-only MLX has no GPU stream.
  mx::Device::DeviceType device = mx::default_device().type;
  if (auto* d = std::get_if<mx::Device>(&s)) device = d->type;
  if (auto* st = std::get_if<mx::Stream>(&s)) device = st->device.type;
  const MatmulCall call = describe_matmul(a_in.shape(), b_in.shape(), a_in.dtype(),
                                          b_in.dtype(), transpose_a, transpose_b, device);
  if (device != mx::Device::cpu) {
    throw BackendNotSupported(
        "[kernelevo.matmul] not yet supported on this backend (GPU streams); run it on "
        "the CPU, e.g. with stream=mx.cpu");
  }
  const mx::Stream stream = mx::to_stream(s);
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

  // Treat 1-D operands as a row (a) or a column (b), removed again from the result.
  mx::array a = a_in.ndim() == 1 ? mx::expand_dims(a_in, 0, stream) : a_in;
  mx::array b = b_in.ndim() == 1 ? mx::expand_dims(b_in, 1, stream) : b_in;
  a = mx::astype(a, call.dtype, stream);
  b = mx::astype(b, call.dtype, stream);

  mx::Shape batch = broadcast_batch(mx::Shape(a.shape().begin(), a.shape().end() - 2),
                                    mx::Shape(b.shape().begin(), b.shape().end() - 2));
  auto with_batch = [&](const mx::array& x) {
    mx::Shape shape = batch;
    shape.push_back(x.shape(-2));
    shape.push_back(x.shape(-1));
    return shape == x.shape() ? x : mx::broadcast_to(x, shape, stream);
  };
  a = with_batch(a);
  b = with_batch(b);

  mx::Shape out_shape = batch;
  out_shape.push_back(static_cast<int>(call.M));
  out_shape.push_back(static_cast<int>(call.N));
  mx::array out(out_shape, call.dtype,
                std::make_shared<Matmul>(stream, std::move(chosen), transpose_a, transpose_b),
                {a, b});
  if (b_in.ndim() == 1) out = mx::squeeze(out, -1, stream);
  if (a_in.ndim() == 1) out = mx::squeeze(out, b_in.ndim() == 1 ? -1 : -2, stream);
  return out;
}

void Matmul::eval_cpu(const std::vector<mx::array>& inputs,
                      std::vector<mx::array>& outputs) {
  const mx::array& a = inputs[0];
  const mx::array& b = inputs[1];
  mx::array& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));

  auto operand = [](const mx::array& x, bool transposed, const std::vector<int64_t>& offsets) {
    const int64_t rows = x.strides()[x.ndim() - 2], cols = x.strides()[x.ndim() - 1];
    return cpu::Operand{x.data<void>(), transposed ? cols : rows, transposed ? rows : cols,
                        offsets.data()};
  };
  auto a_offsets = std::make_shared<std::vector<int64_t>>(batch_offsets(a));
  auto b_offsets = std::make_shared<std::vector<int64_t>>(batch_offsets(b));
  cpu::GemmProblem problem{
      out.shape(-2),
      out.shape(-1),
      transpose_a_ ? a.shape(-2) : a.shape(-1),
      static_cast<int64_t>(a_offsets->size()),
      cpu_dtype(out.dtype()),
      operand(a, transpose_a_, *a_offsets),
      operand(b, transpose_b_, *b_offsets),
      out.data<void>()};

  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(a);
  encoder.set_input_array(b);
  encoder.set_output_array(out);
  // MLX keeps the input buffers alive until the tasks dispatched here have run.
  encoder.dispatch([problem, config = config_, a_offsets, b_offsets]() {
    cpu::matmul(problem, config);
  });
}

void Matmul::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw BackendNotSupported("[kernelevo.matmul] not yet supported on this backend (GPU)");
}

std::vector<mx::array> Matmul::vjp(const std::vector<mx::array>& primals,
                                   const std::vector<mx::array>& cotangents,
                                   const std::vector<int>& argnums,
                                   const std::vector<mx::array>&) {
  const mx::array &a = primals[0], &b = primals[1], &g = cotangents[0];
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    // With C = op(a) op(b): dop(a) = G op(b)^T and dop(b) = op(a)^T G.
    if (arg == 0) {
      grads.push_back(transpose_a_
                          ? matmul(b, g, std::nullopt, transpose_b_, true, stream())
                          : matmul(g, b, std::nullopt, false, !transpose_b_, stream()));
    } else {
      grads.push_back(transpose_b_
                          ? matmul(g, a, std::nullopt, true, transpose_a_, stream())
                          : matmul(a, g, std::nullopt, !transpose_a_, false, stream()));
    }
  }
  return grads;
}

std::vector<mx::array> Matmul::jvp(const std::vector<mx::array>& primals,
                                   const std::vector<mx::array>& tangents,
                                   const std::vector<int>& argnums) {
  std::optional<mx::array> result;
  for (size_t i = 0; i < argnums.size(); ++i) {
    mx::array term =
        argnums[i] == 0
            ? matmul(tangents[i], primals[1], std::nullopt, transpose_a_, transpose_b_, stream())
            : matmul(primals[0], tangents[i], std::nullopt, transpose_a_, transpose_b_, stream());
    result = result ? mx::add(*result, term, stream()) : term;
  }
  return {*result};
}

std::pair<std::vector<mx::array>, std::vector<int>> Matmul::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  // Put the mapped axis first (a new axis of 1 where an input is not mapped) and pad
  // both to the same number of batch axes, so that broadcasting lines the batch axes up.
  int batch_axes = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    int own = static_cast<int>(inputs[i].ndim()) - 2 - (axes[i] >= 0 ? 1 : 0);
    batch_axes = std::max(batch_axes, own);
  }
  std::vector<mx::array> moved;
  for (size_t i = 0; i < inputs.size(); ++i) {
    mx::array x = axes[i] >= 0 ? mx::moveaxis(inputs[i], axes[i], 0, stream())
                               : mx::expand_dims(inputs[i], 0, stream());
    int own = static_cast<int>(x.ndim()) - 3;
    for (int k = own; k < batch_axes; ++k) x = mx::expand_dims(x, 1, stream());
    moved.push_back(x);
  }
  return {{matmul(moved[0], moved[1], config_, transpose_a_, transpose_b_, stream())}, {0}};
}

bool Matmul::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Matmul&>(other);
  return config_ == o.config_ && transpose_a_ == o.transpose_a_ &&
         transpose_b_ == o.transpose_b_;
}

std::vector<mx::Shape> Matmul::output_shapes(const std::vector<mx::array>& inputs) {
  const mx::array &a = inputs[0], &b = inputs[1];
  mx::Shape shape(a.shape().begin(), a.shape().end() - 2);
  shape.push_back(transpose_a_ ? a.shape(-1) : a.shape(-2));
  shape.push_back(transpose_b_ ? b.shape(-2) : b.shape(-1));
  return {shape};
}

}  // namespace kernelevo
