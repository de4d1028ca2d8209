// kernelevo._ext: registration only. The ops, primitives and kernels live beside it.
#include <nanobind/nanobind.h>
#include <nanobind/stl/function.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "attention/attention.h"
#include "attention/cpu_attention.h"
#include "common/errors.h"
#include "common/threadpool.h"
#include "gpu/launch.h"
#include "matmul/cpu_gemm.h"
#include "matmul/matmul.h"
#include "mlx/version.h"
#include "rowwise/rowwise.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace ke = kernelevo;
namespace mx = mlx::core;

namespace {

const char* dtype_name(mx::Dtype d) {
  if (d == mx::float32) return "float32";
  if (d == mx::float16) return "float16";
  return "bfloat16";
}

// mlx.core converts a Device argument to its default Stream implicitly, which fails for
// a GPU on a CPU-only build before kernelevo can say what is wrong; read it ourselves.
mx::StreamOrDevice stream_or_device(const nb::object& obj) {
  if (obj.is_none()) return std::monostate{};
  if (nb::isinstance<mx::Device>(obj)) return nb::cast<mx::Device>(obj);
  if (nb::isinstance<mx::Device::DeviceType>(obj)) {
    return mx::Device(nb::cast<mx::Device::DeviceType>(obj));  // mx.cpu / mx.gpu
  }
  return nb::cast<mx::Stream>(obj);
}

std::optional<ke::KernelConfig> make_config(const std::optional<std::string>& family,
                                            const ke::ParamMap& params) {
  if (!family) {
    if (!params.empty()) throw std::invalid_argument("parameters given without a family");
    return std::nullopt;
  }
  return ke::KernelConfig{*family, params};
}

ke::MaskArg mask_arg(const nb::object& obj) {
  if (obj.is_none()) return std::monostate{};
  if (nb::isinstance<nb::str>(obj)) return nb::cast<std::string>(obj);
  if (nb::isinstance<mx::array>(obj)) return nb::cast<mx::array>(obj);
  throw std::invalid_argument("[kernelevo.attention] mask must be None, \"causal\" or an mx.array");
}

}  // namespace

NB_MODULE(_ext, m) {
  m.doc() = "kernelevo's compiled MLX extension: matmul and attention primitives";

  nb::exception<ke::BackendNotSupported>(m, "BackendNotSupportedError", PyExc_RuntimeError);

  m.def(
      "matmul",
      [](const mx::array& a, const mx::array& b, const std::optional<std::string>& family,
         const ke::ParamMap& params, bool transpose_a, bool transpose_b,
         const std::optional<mx::array>& bias, const std::string& activation,
         const std::optional<mx::array>& residual, float scale, const nb::object& stream) {
        return ke::matmul(a, b, make_config(family, params), transpose_a, transpose_b,
                          ke::MatmulEpilogue{scale, bias, activation, residual},
                          stream_or_device(stream));
      },
      "a"_a, "b"_a, "family"_a = nb::none(), "params"_a = ke::ParamMap{},
      "transpose_a"_a = false, "transpose_b"_a = false, nb::kw_only(),
      "bias"_a = nb::none(), "activation"_a = "none", "residual"_a = nb::none(),
      "scale"_a = 1.0f, "stream"_a = nb::none(),
      "act(op(a) @ op(b) * scale + bias) + residual with the given kernel configuration, "
      "or the registered heuristics' choice when family is None.");

  m.def(
      "set_matmul_selector",
      [](nb::callable select) {
        // The callable stays alive for the life of the process (the selector is global).
        auto* held = new nb::object(std::move(select));
        ke::set_matmul_selector([held](const ke::MatmulCall& call) {
          nb::gil_scoped_acquire gil;
          nb::object result = (*held)(call.M, call.N, call.K, call.batch,
                                      dtype_name(call.dtype), call.transpose_a,
                                      call.transpose_b, call.epilogue,
                                      call.device == mx::Device::cpu ? "cpu" : "gpu");
          auto [family, params] = nb::cast<std::pair<std::string, ke::ParamMap>>(result);
          return ke::KernelConfig{family, params};
        });
      },
      "select"_a,
      "Registers select(M, N, K, batch, dtype, transpose_a, transpose_b, epilogue, device) -> "
      "(family, params), used when matmul gets no configuration.");

  m.def(
      "describe_matmul",
      [](const mx::array& a, const mx::array& b, bool transpose_a, bool transpose_b) {
        auto call = ke::describe_matmul(a.shape(), b.shape(), a.dtype(), b.dtype(),
                                        transpose_a, transpose_b, mx::Device::cpu);
        return std::make_tuple(call.M, call.N, call.K, call.batch,
                               std::string(dtype_name(call.dtype)));
      },
      "a"_a, "b"_a, "transpose_a"_a = false, "transpose_b"_a = false,
      "(M, N, K, batch, dtype) of op(a) @ op(b); ValueError when the operands do not fit.");

  m.def(
      "validate_matmul_config",
      [](const std::string& family, const ke::ParamMap& params) {
        ke::cpu::validate_matmul_config(ke::KernelConfig{family, params});
      },
      "family"_a, "params"_a,
      "Raises ValueError unless the CPU matmul kernels take exactly this configuration.");

  m.def("gemm_register_tile_supported", &ke::cpu::gemm_register_tile_supported, "engine"_a,
        "mr"_a, "nr"_a,
        "Whether the CPU gemm family's engine was compiled with an mr x nr register tile.");

  m.def("cpu_engines", &ke::cpu::available_engines,
        "The CPU gemm engines this build can run on this CPU (fma, bf16dot, amx).");

  m.def(
      "config_of",
      [](const mx::array& x) -> std::optional<std::pair<std::string, ke::ParamMap>> {
        if (!x.has_primitive()) return std::nullopt;
        if (auto* p = dynamic_cast<ke::Matmul*>(&x.primitive())) {
          return std::make_pair(p->config().family, p->config().params);
        }
        if (auto* p = dynamic_cast<ke::Attention*>(&x.primitive())) {
          return std::make_pair(p->config().family, p->config().params);
        }
        return std::nullopt;
      },
      "x"_a,
      "The kernel configuration of the kernelevo primitive that produces x (before "
      "evaluation), or None.");

  m.def(
      "attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v, float scale,
         const nb::object& mask, std::optional<float> softcap, std::optional<int64_t> window,
         const std::optional<std::string>& family, const ke::ParamMap& params,
         const nb::object& stream) {
        return ke::attention(q, k, v, scale, mask_arg(mask), softcap, window,
                             make_config(family, params), stream_or_device(stream));
      },
      "q"_a, "k"_a, "v"_a, nb::kw_only(), "scale"_a, "mask"_a = nb::none(),
      "softcap"_a = nb::none(), "window"_a = nb::none(), "family"_a = nb::none(),
      "params"_a = ke::ParamMap{}, "stream"_a = nb::none(),
      "softmax(mask(softcap(scale * q k^T))) v with the given kernel configuration, or the "
      "registered heuristics' choice when family is None.");

  m.def(
      "rms_norm",
      [](const mx::array& x, const std::optional<mx::array>& weight, float eps,
         const nb::object& stream) { return ke::rms_norm(x, weight, eps, stream_or_device(stream)); },
      "x"_a, "weight"_a.none(), "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
      "x * rsqrt(mean(x^2, -1) + eps) * weight in one pass (mx.fast.rms_norm's result).");

  m.def(
      "rope",
      [](const mx::array& x, int dims, bool traditional, std::optional<float> base, float scale,
         const mx::array& offset, const std::optional<mx::array>& freqs, const nb::object& stream) {
        return ke::rope(x, dims, traditional, base, scale, offset, freqs, stream_or_device(stream));
      },
      "x"_a, "dims"_a, nb::kw_only(), "traditional"_a, "base"_a.none(), "scale"_a, "offset"_a,
      "freqs"_a.none() = nb::none(), "stream"_a = nb::none(),
      "Rotary position embedding in one pass (mx.fast.rope's result).");

  m.def(
      "set_attention_selector",
      [](nb::callable select) {
        auto* held = new nb::object(std::move(select));  // lives as long as the process
        ke::set_attention_selector([held](const ke::AttentionCall& call) {
          nb::gil_scoped_acquire gil;
          nb::object result = (*held)(call.batch, call.heads, call.kv_heads, call.q_len,
                                      call.kv_len, call.head_dim, dtype_name(call.dtype),
                                      ke::mask_name(call.mask), call.softcap, call.window,
                                      call.device == mx::Device::cpu ? "cpu" : "gpu");
          auto [family, params] = nb::cast<std::pair<std::string, ke::ParamMap>>(result);
          return ke::KernelConfig{family, params};
        });
      },
      "select"_a,
      "Registers select(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, mask, "
      "softcap, window, device) -> (family, params), used when attention gets no "
      "configuration.");

  m.def(
      "describe_attention",
      [](const mx::array& q, const mx::array& k, const mx::array& v, const nb::object& mask,
         std::optional<float> softcap, std::optional<int64_t> window) {
        auto call = ke::describe_attention(q, k, v, mask_arg(mask), softcap, window,
                                           mx::Device::cpu);
        return std::make_tuple(call.batch, call.heads, call.kv_heads, call.q_len, call.kv_len,
                               call.head_dim, std::string(dtype_name(call.dtype)),
                               std::string(ke::mask_name(call.mask)));
      },
      "q"_a, "k"_a, "v"_a, "mask"_a = nb::none(), "softcap"_a = nb::none(),
      "window"_a = nb::none(),
      "(batch, heads, kv_heads, q_len, kv_len, head_dim, dtype, mask kind) of an attention "
      "call; ValueError when the inputs do not fit.");

  m.def(
      "validate_attention_config",
      [](const std::string& family, const ke::ParamMap& params) {
        ke::cpu::validate_attention_config(ke::KernelConfig{family, params});
      },
      "family"_a, "params"_a,
      "Raises ValueError unless the CPU attention kernels take exactly this configuration.");

  m.attr("decode_max_queries") = ke::cpu::kDecodeMaxQueries;

  nb::class_<ke::gpu::Launch>(m, "GpuLaunch",
                              "A GPU kernel launch for one call shape, made once from a "
                              "kernelevo.lowering.LoweredKernel (read by its field names) and "
                              "immutable; call it with the kernel's inputs.")
      .def(
          "__init__",
          [](ke::gpu::Launch* self, const nb::handle& lowered) {
            auto field = [&](const char* name) { return nb::getattr(lowered, name); };
            ke::gpu::KernelSource source;
            source.backend = nb::cast<std::string>(field("backend"));
            source.name = nb::cast<std::string>(field("name"));
            source.input_names = nb::cast<std::vector<std::string>>(field("input_names"));
            source.output_names = nb::cast<std::vector<std::string>>(field("output_names"));
            source.source = nb::cast<std::string>(field("source"));
            source.header = nb::cast<std::string>(field("header"));
            source.shared_memory = nb::cast<int>(field("shared_memory"));
            source.ensure_row_contiguous = nb::cast<bool>(field("ensure_row_contiguous"));
            ke::gpu::LaunchShape shape;
            shape.output_shapes = nb::cast<std::vector<std::vector<int>>>(field("output_shapes"));
            shape.output_dtypes = nb::cast<std::vector<std::string>>(field("output_dtypes"));
            shape.grid = nb::cast<std::tuple<int, int, int>>(field("grid"));
            shape.threadgroup = nb::cast<std::tuple<int, int, int>>(field("threadgroup"));
            shape.template_args =
                nb::cast<std::vector<std::pair<std::string, ke::gpu::TemplateValue>>>(
                    field("template_args"));
            shape.init_value = nb::cast<std::optional<float>>(field("init_value"));
            new (self) ke::gpu::Launch(source, shape);
          },
          "kernel"_a)
      .def_prop_ro("name", &ke::gpu::Launch::name)
      .def(
          "__call__",
          [](const ke::gpu::Launch& launch, const std::vector<mx::array>& inputs,
             const nb::object& stream) { return launch(inputs, stream_or_device(stream)); },
          "inputs"_a, nb::kw_only(), "stream"_a = nb::none(),
          "Runs the kernel through MLX's fast::cuda_kernel (or fast::metal_kernel).");

  m.def("any_tracer", &ke::gpu::any_tracer, "arrays"_a,
        "Whether any of the arrays is traced by a transformation (grad, vjp, compile).");

  m.def("gpu_kernels_cached", &ke::gpu::cached_kernels,
        "How many GPU kernel functions the launcher has created (one per kernel name).");

  m.def("available_cores", &ke::available_cores,
        "Logical cores this process may run on (what the CPU kernels can use).");

  m.def(
      "build_info",
      []() {
        nb::dict info;
        info["mlx_version"] = mx::version();
        info["mlx_version_built"] = std::to_string(MLX_VERSION_MAJOR) + "." +
                                    std::to_string(MLX_VERSION_MINOR) + "." +
                                    std::to_string(MLX_VERSION_PATCH);
        info["nanobind_version"] = KERNELEVO_NANOBIND_VERSION;
        info["compiler"] = KERNELEVO_COMPILER;
        info["cpu_kernel_hash"] = KERNELEVO_CPU_KERNEL_HASH;
        return info;
      },
      "Versions the extension was built with, and the hash of its CPU kernel sources.");

  m.def(
      "abi_probe", [](const mx::array& x) { return static_cast<int>(x.ndim()); }, "x"_a,
      "Returns x.ndim; fails with a TypeError when this build cannot read mlx.core's "
      "arrays (a nanobind ABI mismatch).");
}
