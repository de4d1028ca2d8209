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

  nb::class_<ke::gpu::Kernel>(m, "GpuKernel",
                              "A lowered GPU kernel as the launcher takes it (see "
                              "kernelevo.lowering.LoweredKernel, which fills it).")
      .def(nb::init<>())
      .def_rw("backend", &ke::gpu::Kernel::backend)
      .def_rw("name", &ke::gpu::Kernel::name)
      .def_rw("input_names", &ke::gpu::Kernel::input_names)
      .def_rw("output_names", &ke::gpu::Kernel::output_names)
      .def_rw("source", &ke::gpu::Kernel::source)
      .def_rw("header", &ke::gpu::Kernel::header)
      .def_rw("output_shapes", &ke::gpu::Kernel::output_shapes)
      .def_rw("output_dtypes", &ke::gpu::Kernel::output_dtypes)
      .def_rw("grid", &ke::gpu::Kernel::grid)
      .def_rw("threadgroup", &ke::gpu::Kernel::threadgroup)
      .def_rw("template_args", &ke::gpu::Kernel::template_args)
      .def_rw("shared_memory", &ke::gpu::Kernel::shared_memory)
      .def_rw("init_value", &ke::gpu::Kernel::init_value)
      .def_rw("ensure_row_contiguous", &ke::gpu::Kernel::ensure_row_contiguous);

  m.def(
      "launch",
      [](const ke::gpu::Kernel& kernel, const std::vector<mx::array>& inputs,
         const nb::object& stream) { return ke::gpu::launch(kernel, inputs, stream_or_device(stream)); },
      "kernel"_a, "inputs"_a, nb::kw_only(), "stream"_a = nb::none(),
      "Runs a lowered GPU kernel through MLX's fast::cuda_kernel; its kernel function is "
      "created once per name.");

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
