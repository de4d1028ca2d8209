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

#include "common/errors.h"
#include "common/threadpool.h"
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
        return std::nullopt;
      },
      "x"_a,
      "The kernel configuration of the kernelevo primitive that produces x (before "
      "evaluation), or None.");

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
