// Launching lowered GPU kernels through MLX's custom-kernel API. MLX exports
// fast::cuda_kernel and fast::metal_kernel but not the CustomKernel primitive, so a GPU op
// of kernelevo is the output of one of these calls: Python selects and lowers
// (kernelevo/lowering/), this launches. Each configuration's kernel function is created
// once and cached by name (the name carries every template argument), and MLX compiles
// its source once per template arguments.
#pragma once

#include <optional>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

#include "mlx/mlx.h"

namespace kernelevo::gpu {

namespace mx = mlx::core;

// A template argument: an int, a bool, or a dtype given by its MLX name ("bfloat16").
using TemplateValue = std::variant<bool, int, std::string>;

struct Kernel {
  std::string backend;  // "cuda" or "metal"
  std::string name;
  std::vector<std::string> input_names, output_names;
  std::string source, header;
  std::vector<std::vector<int>> output_shapes;
  std::vector<std::string> output_dtypes;
  std::tuple<int, int, int> grid, threadgroup;  // grid in threads
  std::vector<std::pair<std::string, TemplateValue>> template_args;
  int shared_memory = 0;  // dynamic shared memory (CUDA; Metal kernels declare theirs)
  std::optional<float> init_value;
  bool ensure_row_contiguous = true;
};

// Runs the kernel on the inputs; returns its outputs (lazy arrays, as any MLX op).
// Throws BackendNotSupported when the backend is not available in this MLX build, and
// std::invalid_argument for an unknown backend or dtype name.
std::vector<mx::array> launch(const Kernel& kernel, const std::vector<mx::array>& inputs,
                              mx::StreamOrDevice stream);

// How many kernel functions have been created (each distinct name once).
size_t cached_kernels();

}  // namespace kernelevo::gpu
