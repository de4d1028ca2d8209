#include "attention/attention.h"

#include <cmath>
#include <limits>
#include <memory>

#include "attention/cpu_attention.h"
#include "common/errors.h"
#include "common/text.h"
#include "mlx/backend/cpu/encoder.h"

namespace kernelevo {

namespace {

AttentionSelector& selector() {
  static AttentionSelector* instance = new AttentionSelector();  // outlives teardown
  return *instance;
}

[[noreturn]] void fail(const std::string& message) {
  throw std::invalid_argument("[kernelevo.attention] " + message);
}

AttentionMask mask_kind(const MaskArg& mask) {
  if (std::holds_alternative<std::monostate>(mask)) return AttentionMask::none;
  if (auto* text = std::get_if<std::string>(&mask)) {
    if (*text != "causal") fail("mask must be None, \"causal\" or an array; got \"" + *text + "\"");
    return AttentionMask::causal;
  }
  return std::get<mx::array>(mask).dtype() == mx::bool_ ? AttentionMask::boolean
                                                         : AttentionMask::additive;
}

cpu::Dtype cpu_dtype(mx::Dtype d) {
  if (d == mx::float32) return cpu::Dtype::f32;
  if (d == mx::float16) return cpu::Dtype::f16;
  return cpu::Dtype::bf16;
}

mx::Device::DeviceType device_of(const mx::StreamOrDevice& s) {
  mx::Device::DeviceType device = mx::default_device().type;
  if (auto* d = std::get_if<mx::Device>(&s)) device = d->type;
  if (auto* st = std::get_if<mx::Stream>(&s)) device = st->device.type;
  return device;
}

}  // namespace

const char* mask_name(AttentionMask mask) {
  switch (mask) {
    case AttentionMask::none: return "none";
    case AttentionMask::causal: return "causal";
    case AttentionMask::boolean: return "bool";
    case AttentionMask::additive: return "additive";
  }
  return "none";
}

void set_attention_selector(AttentionSelector s) {
  selector() = std::move(s);
}

AttentionCall describe_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                 const MaskArg& mask, std::optional<float> softcap,
                                 std::optional<int64_t> window,
                                 mx::Device::DeviceType device) {
  for (const auto& [name, x] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}}) {
    if (x->ndim() != 4) {
      fail(std::string(name) + " must have rank 4 ([batch, heads, length, head_dim]); got shape " +
           shape_str(x->shape()));
    }
  }
  if (k.shape(0) != q.shape(0) || v.shape(0) != q.shape(0)) {
    fail("q, k and v must have the same batch size; got shapes " + shape_str(q.shape()) + ", " +
         shape_str(k.shape()) + " and " + shape_str(v.shape()));
  }
  if (q.shape(3) != k.shape(3)) {
    fail("q and k must have the same head dimension; got shapes " + shape_str(q.shape()) +
         " and " + shape_str(k.shape()));
  }
  if (k.shape(1) != v.shape(1) || k.shape(2) != v.shape(2)) {
    fail("k and v must have the same heads and length; got shapes " + shape_str(k.shape()) +
         " and " + shape_str(v.shape()));
  }
  if (k.shape(1) == 0 || q.shape(1) % k.shape(1) != 0) {
    fail("the query heads (" + std::to_string(q.shape(1)) +
         ") must be a multiple of the key/value heads (" + std::to_string(k.shape(1)) + ")");
  }
  if (k.shape(2) > std::numeric_limits<int32_t>::max() / 2) {
    fail("key/value sequences longer than 2^30 are not supported");
  }
  const mx::Dtype dtype = mx::promote_types(mx::promote_types(q.dtype(), k.dtype()), v.dtype());
  if (dtype != mx::float32 && dtype != mx::float16 && dtype != mx::bfloat16) {
    fail("supports float32, float16 and bfloat16 inputs; q, k and v promote to " + dtype_str(dtype));
  }
  const AttentionMask kind = mask_kind(mask);
  if (auto* m = std::get_if<mx::array>(&mask)) {
    if (m->ndim() > 4) fail("the mask must have rank at most 4; got shape " + shape_str(m->shape()));
    const mx::Shape target{q.shape(0), q.shape(1), q.shape(2), k.shape(2)};
    for (size_t i = 0; i < m->ndim(); ++i) {
      const int dim = m->shape(static_cast<int>(i));
      const int want = target[4 - m->ndim() + i];
      if (dim != 1 && dim != want) {
        fail("the mask's shape " + shape_str(m->shape()) + " does not broadcast to [batch, heads, "
             "q_len, kv_len] = " + shape_str(target));
      }
    }
    if (kind == AttentionMask::additive && mx::promote_types(m->dtype(), dtype) != dtype) {
      fail("an additive mask must promote to the inputs' type " + dtype_str(dtype) + "; got " +
           dtype_str(m->dtype()));
    }
  }
  if (softcap && !(*softcap > 0.0f && std::isfinite(*softcap))) {
    fail("softcap must be a positive number; got " + std::to_string(*softcap));
  }
  if (window && *window < 1) fail("window must be at least 1; got " + std::to_string(*window));
  return AttentionCall{q.shape(0), q.shape(1), k.shape(1), q.shape(2), k.shape(2), q.shape(3),
                       v.shape(3), dtype, kind, softcap.value_or(0.0f), window.value_or(0),
                       device};
}

mx::array attention(const mx::array& q_in, const mx::array& k_in, const mx::array& v_in,
                    float scale, const MaskArg& mask, std::optional<float> softcap,
                    std::optional<int64_t> window, const std::optional<KernelConfig>& config,
                    mx::StreamOrDevice s) {
  // Decide the device before asking MLX for a stream: a CPU-only MLX has no GPU stream.
  const mx::Device::DeviceType device = device_of(s);
  const AttentionCall call = describe_attention(q_in, k_in, v_in, mask, softcap, window, device);
  if (device != mx::Device::cpu) {
    throw BackendNotSupported(
        "[kernelevo.attention] not yet supported on this backend (GPU streams); run it on "
        "the CPU, e.g. with stream=mx.cpu");
  }
  const mx::Stream stream = mx::to_stream(s);
  KernelConfig chosen;
  if (config) {
    chosen = *config;
  } else if (selector()) {
    chosen = selector()(call);
  } else {
    fail("no configuration given and no heuristics registered");
  }
  cpu::validate_attention_call(chosen, cpu_dtype(call.dtype), call.q_len);

  std::vector<mx::array> inputs = {mx::astype(q_in, call.dtype, stream),
                                   mx::astype(k_in, call.dtype, stream),
                                   mx::astype(v_in, call.dtype, stream)};
  if (auto* m = std::get_if<mx::array>(&mask)) {
    mx::array mask_arr = call.mask == AttentionMask::additive ? mx::astype(*m, call.dtype, stream)
                                                              : *m;
    // A broadcast view: the kernels read it with its (possibly zero) strides.
    inputs.push_back(mx::broadcast_to(
        mask_arr, {q_in.shape(0), q_in.shape(1), q_in.shape(2), k_in.shape(2)}, stream));
  }
  mx::Shape out_shape{q_in.shape(0), q_in.shape(1), q_in.shape(2), v_in.shape(3)};
  return mx::array(out_shape, call.dtype,
                   std::make_shared<Attention>(stream, std::move(chosen), scale, call.mask,
                                               call.softcap, call.window),
                   std::move(inputs));
}

namespace {

// A rank-4 view for the kernels; arrays whose last axis is not contiguous are copied
// into `holder` first (the kernels read rows as contiguous vectors).
template <typename T>
cpu::Tensor4 contiguous_rows(const mx::array& x, std::vector<T>& holder) {
  cpu::Tensor4 t;
  const auto& st = x.strides();
  if (st[3] == 1 || x.shape(3) <= 1) {
    t.data = x.data<T>();
    for (int i = 0; i < 4; ++i) t.strides[i] = st[i];
    return t;
  }
  const int64_t n0 = x.shape(0), n1 = x.shape(1), n2 = x.shape(2), n3 = x.shape(3);
  holder.resize(static_cast<size_t>(n0 * n1 * n2 * n3));
  const T* src = x.data<T>();
  size_t i = 0;
  for (int64_t a = 0; a < n0; ++a)
    for (int64_t b = 0; b < n1; ++b)
      for (int64_t c = 0; c < n2; ++c)
        for (int64_t d = 0; d < n3; ++d)
          holder[i++] = src[a * st[0] + b * st[1] + c * st[2] + d * st[3]];
  t.data = holder.data();
  t.strides[0] = n1 * n2 * n3;
  t.strides[1] = n2 * n3;
  t.strides[2] = n3;
  t.strides[3] = 1;
  return t;
}

template <typename T>
void run_attention(cpu::AttentionProblem problem, const KernelConfig& config,
                   const mx::array& q, const mx::array& k, const mx::array& v) {
  std::vector<T> qc, kc, vc;
  problem.q = contiguous_rows<T>(q, qc);
  problem.k = contiguous_rows<T>(k, kc);
  problem.v = contiguous_rows<T>(v, vc);
  cpu::attention(problem, config);
}

}  // namespace

void Attention::eval_cpu(const std::vector<mx::array>& inputs,
                         std::vector<mx::array>& outputs) {
  const mx::array &q = inputs[0], &k = inputs[1], &v = inputs[2];
  mx::array& out = outputs[0];
  out.set_data(mx::allocator::malloc(out.nbytes()));

  cpu::AttentionProblem problem{};
  problem.batch = q.shape(0);
  problem.heads = q.shape(1);
  problem.kv_heads = k.shape(1);
  problem.q_len = q.shape(2);
  problem.kv_len = k.shape(2);
  problem.head_dim = q.shape(3);
  problem.v_dim = v.shape(3);
  problem.dtype = cpu_dtype(out.dtype());
  problem.causal = mask_ == AttentionMask::causal;
  problem.window = window_;
  problem.scale = scale_;
  problem.softcap = softcap_;
  problem.out = out.data<void>();
  problem.mask = mask_ == AttentionMask::boolean    ? cpu::MaskKind::boolean
                 : mask_ == AttentionMask::additive ? cpu::MaskKind::additive
                                                    : cpu::MaskKind::none;
  if (problem.mask != cpu::MaskKind::none) {
    const mx::array& m = inputs[3];
    problem.mask_values.data = m.data<void>();
    for (int i = 0; i < 4; ++i) problem.mask_values.strides[i] = m.strides()[i];
  }

  auto& encoder = mx::cpu::get_command_encoder(stream());
  for (const auto& x : inputs) encoder.set_input_array(x);
  encoder.set_output_array(out);
  // MLX keeps the input buffers alive until the tasks dispatched here have run; the
  // arrays are captured for their shapes and strides.
  encoder.dispatch([problem, config = config_, q, k, v]() {
    switch (problem.dtype) {
      case cpu::Dtype::f32: return run_attention<float>(problem, config, q, k, v);
      case cpu::Dtype::f16: return run_attention<mx::float16_t>(problem, config, q, k, v);
      case cpu::Dtype::bf16: return run_attention<mx::bfloat16_t>(problem, config, q, k, v);
    }
  });
}

void Attention::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw BackendNotSupported("[kernelevo.attention] not yet supported on this backend (GPU)");
}

// Gradients from MLX ops in f32, recomputing the probabilities (the score matrix is
// materialised here, unlike in the forward kernels).
std::vector<mx::array> Attention::vjp(const std::vector<mx::array>& primals,
                                      const std::vector<mx::array>& cotangents,
                                      const std::vector<int>& argnums,
                                      const std::vector<mx::array>& outputs) {
  const mx::Stream s = stream();
  const mx::array &q = primals[0], &k = primals[1], &v = primals[2];
  const int B = q.shape(0), H = q.shape(1), Hkv = k.shape(1), G = H / Hkv;
  const int Lq = q.shape(2), Lkv = k.shape(2), D = q.shape(3), Dv = v.shape(3);
  auto f32 = [&](const mx::array& x) { return mx::astype(x, mx::float32, s); };
  // Query heads grouped by their key/value head: [B, Hkv, G, L, D].
  const mx::array q5 = mx::reshape(f32(q), {B, Hkv, G, Lq, D}, s);
  const mx::array k5 = mx::expand_dims(f32(k), 2, s);
  const mx::array v5 = mx::expand_dims(f32(v), 2, s);
  const mx::array do5 = mx::reshape(f32(cotangents[0]), {B, Hkv, G, Lq, Dv}, s);
  const mx::array o5 = mx::reshape(f32(outputs[0]), {B, Hkv, G, Lq, Dv}, s);
  const float inf = std::numeric_limits<float>::infinity();

  mx::array z = mx::multiply(mx::matmul(q5, mx::swapaxes(k5, -1, -2, s), s),
                             mx::array(scale_), s);
  std::optional<mx::array> capped;
  if (softcap_ > 0.0f) {
    capped = mx::tanh(mx::multiply(z, mx::array(1.0f / softcap_), s), s);
    z = mx::multiply(*capped, mx::array(softcap_), s);
  }
  auto grouped_mask = [&](const mx::array& m) {
    return mx::reshape(m, {B, Hkv, G, Lq, Lkv}, s);
  };
  if (mask_ == AttentionMask::additive) z = mx::add(z, grouped_mask(f32(primals[3])), s);
  std::optional<mx::array> visible;
  if (mask_ == AttentionMask::boolean) visible = grouped_mask(primals[3]);
  if (mask_ == AttentionMask::causal || window_ > 0) {
    const mx::array pos = mx::reshape(mx::arange(Lkv - Lq, Lkv, s), {Lq, 1}, s);
    const mx::array key = mx::reshape(mx::arange(0, Lkv, s), {1, Lkv}, s);
    mx::array band = mx::less_equal(key, pos, s);
    if (window_ > 0) {
      band = mx::logical_and(
          band, mx::greater(key, mx::subtract(pos, mx::array(static_cast<int>(window_)), s), s), s);
    }
    visible = visible ? mx::logical_and(*visible, band, s) : band;
  }
  if (visible) z = mx::where(*visible, z, mx::array(-inf), s);
  // A row with no finite score outputs the mean of v: uniform probabilities.
  const mx::array dead = mx::equal(mx::max(z, -1, true, s), mx::array(-inf), s);
  const mx::array p = mx::softmax(mx::where(dead, mx::array(0.0f), z, s), -1, true, s);

  std::vector<mx::array> grads;
  std::optional<mx::array> dz;
  auto score_grad = [&]() {
    if (!dz) {
      const mx::array dp = mx::matmul(do5, mx::swapaxes(v5, -1, -2, s), s);
      const mx::array delta = mx::sum(mx::multiply(do5, o5, s), -1, true, s);
      dz = mx::where(dead, mx::array(0.0f), mx::multiply(p, mx::subtract(dp, delta, s), s), s);
    }
    return *dz;
  };
  // d(scale * q k^T) from d(score): through the softcap's tanh when there is one.
  auto raw_grad = [&]() {
    mx::array g = score_grad();
    if (capped) {
      g = mx::multiply(g, mx::subtract(mx::array(1.0f), mx::square(*capped, s), s), s);
    }
    return mx::multiply(g, mx::array(scale_), s);
  };
  for (int arg : argnums) {
    if (arg == 0) {
      mx::array dq = mx::matmul(raw_grad(), k5, s);
      grads.push_back(mx::astype(mx::reshape(dq, {B, H, Lq, D}, s), q.dtype(), s));
    } else if (arg == 1) {
      mx::array dk = mx::sum(mx::matmul(mx::swapaxes(raw_grad(), -1, -2, s), q5, s), 2, false, s);
      grads.push_back(mx::astype(dk, k.dtype(), s));
    } else if (arg == 2) {
      mx::array dv = mx::sum(mx::matmul(mx::swapaxes(p, -1, -2, s), do5, s), 2, false, s);
      grads.push_back(mx::astype(dv, v.dtype(), s));
    } else if (mask_ == AttentionMask::additive) {
      grads.push_back(mx::astype(mx::reshape(score_grad(), {B, H, Lq, Lkv}, s),
                                 primals[3].dtype(), s));
    } else {
      grads.push_back(mx::zeros_like(primals[3], s));
    }
  }
  return grads;
}

bool Attention::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const Attention&>(other);
  return config_ == o.config_ && scale_ == o.scale_ && mask_ == o.mask_ &&
         softcap_ == o.softcap_ && window_ == o.window_;
}

std::vector<mx::Shape> Attention::output_shapes(const std::vector<mx::array>& inputs) {
  return {{inputs[0].shape(0), inputs[0].shape(1), inputs[0].shape(2), inputs[2].shape(3)}};
}

}  // namespace kernelevo
