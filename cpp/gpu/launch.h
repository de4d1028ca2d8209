// Launching lowered GPU kernels through MLX's custom-kernel API. MLX exports
// fast::cuda_kernel and fast::metal_kernel but not the CustomKernel primitive, so a GPU op
// of kernelevo is the output of one of these calls: Python selects and lowers
// (kernelevo/lowering/, whose LoweredKernel is the one statement of what a launch is),
// this launches. A Launch is made once per lowered kernel (one configuration at one call
// shape) and never changes, so threads may share it; the kernel function behind it is
// created once per kernel name (the name carries every template argument), and MLX
// compiles its source once per template arguments.
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "mlx/fast.h"
#include "mlx/mlx.h"

namespace kernelevo::gpu {

namespace mx = mlx::core;

// A template argument: an int, a bool, or a dtype given by its MLX name ("bfloat16").
using TemplateValue = std::variant<bool, int, std::string>;

// What decides the compiled kernel function (LoweredKernel's fields of the same names).
struct KernelSource {
  std::string backend;  // "cuda" or "metal"
  std::string name;
  std::vector<std::string> input_names, output_names;
  std::string source, header;
  int shared_memory = 0;  // dynamic shared memory (CUDA; Metal kernels declare theirs)
  bool ensure_row_contiguous = true;
};

// What a call adds (LoweredKernel's fields of the same names).
struct LaunchShape {
  std::vector<std::vector<int>> output_shapes;
  std::vector<std::string> output_dtypes;
  std::tuple<int, int, int> grid, threadgroup;  // grid in threads
  std::vector<std::pair<std::string, TemplateValue>> template_args;
  std::optional<float> init_value;
};

class Launch {
 public:
  // Throws BackendNotSupported when the backend is not available in this MLX build, and
  // std::invalid_argument for an unknown backend or dtype name or mismatched outputs.
  Launch(const KernelSource& kernel, const LaunchShape& shape);

  // Runs the kernel on the inputs; returns its outputs (lazy arrays, as any MLX op).
  std::vector<mx::array> operator()(const std::vector<mx::array>& inputs,
                                    mx::StreamOrDevice stream) const;

  const std::string& name() const { return name_; }

 private:
  std::string backend_, name_;
  size_t inputs_ = 0;
  mx::fast::CustomKernelFunction function_;
  std::vector<mx::Shape> output_shapes_;
  std::vector<mx::Dtype> output_dtypes_;
  std::tuple<int, int, int> grid_, threadgroup_;
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> template_args_;
  std::optional<float> init_value_;
};

// How many kernel functions have been created (each distinct name once).
size_t cached_kernels();

// Whether any of the arrays is being traced by a transformation (grad, vjp, compile): only
// then does a GPU op need the custom VJP that MLX's custom kernels lack.
bool any_tracer(const std::vector<mx::array>& arrays);

}  // namespace kernelevo::gpu
