#include "gpu/launch.h"

#include <mutex>
#include <unordered_map>

#include "common/errors.h"
#include "mlx/backend/cuda/cuda.h"
#include "mlx/fast.h"

namespace kernelevo::gpu {

namespace {

mx::Dtype dtype_named(const std::string& name) {
  static const std::unordered_map<std::string, mx::Dtype> dtypes = {
      {"float32", mx::float32}, {"float16", mx::float16}, {"bfloat16", mx::bfloat16},
      {"bool", mx::bool_},      {"int32", mx::int32},     {"uint32", mx::uint32}};
  auto it = dtypes.find(name);
  if (it == dtypes.end()) {
    throw std::invalid_argument("[kernelevo.launch] unknown dtype name '" + name + "'");
  }
  return it->second;
}

struct Cache {
  std::mutex mutex;
  std::unordered_map<std::string, mx::fast::CustomKernelFunction> functions;
};

Cache& cache() {
  static Cache* instance = new Cache();  // outlives interpreter teardown
  return *instance;
}

mx::fast::CustomKernelFunction create(const Kernel& k) {
  if (k.backend == "cuda") {
    if (!mx::cu::is_available()) {
      throw BackendNotSupported(
          "[kernelevo.launch] this MLX has no CUDA back-end (install mlx-cuda-13 instead of "
          "mlx-cpu to run CUDA kernels)");
    }
    return mx::fast::cuda_kernel(k.name, k.input_names, k.output_names, k.source, k.header,
                                 k.ensure_row_contiguous, k.shared_memory);
  }
  if (k.backend == "metal") {
    // Creating works without Metal; MLX throws "No Metal back-end" when it is called.
    return mx::fast::metal_kernel(k.name, k.input_names, k.output_names, k.source, k.header,
                                  k.ensure_row_contiguous, /*atomic_outputs=*/false);
  }
  throw std::invalid_argument("[kernelevo.launch] unknown GPU backend '" + k.backend + "'");
}

}  // namespace

std::vector<mx::array> launch(const Kernel& k, const std::vector<mx::array>& inputs,
                              mx::StreamOrDevice stream) {
  if (inputs.size() != k.input_names.size()) {
    throw std::invalid_argument("[kernelevo.launch] " + k.name + " takes " +
                                std::to_string(k.input_names.size()) + " inputs, got " +
                                std::to_string(inputs.size()));
  }
  if (k.output_shapes.size() != k.output_names.size() ||
      k.output_dtypes.size() != k.output_names.size()) {
    throw std::invalid_argument("[kernelevo.launch] " + k.name +
                                ": one shape and one dtype per output");
  }
  mx::fast::CustomKernelFunction function;
  {
    auto& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    const std::string key = k.backend + "/" + k.name;
    auto it = c.functions.find(key);
    if (it == c.functions.end()) it = c.functions.emplace(key, create(k)).first;
    function = it->second;
  }
  std::vector<mx::Shape> shapes;
  for (const auto& shape : k.output_shapes) shapes.emplace_back(shape.begin(), shape.end());
  std::vector<mx::Dtype> dtypes;
  for (const auto& name : k.output_dtypes) dtypes.push_back(dtype_named(name));
  std::vector<std::pair<std::string, mx::fast::TemplateArg>> args;
  for (const auto& [name, value] : k.template_args) {
    if (auto* b = std::get_if<bool>(&value)) {
      args.emplace_back(name, *b);
    } else if (auto* i = std::get_if<int>(&value)) {
      args.emplace_back(name, *i);
    } else {
      args.emplace_back(name, dtype_named(std::get<std::string>(value)));
    }
  }
  try {
    return function(inputs, shapes, dtypes, k.grid, k.threadgroup, args, k.init_value, false,
                    stream);
  } catch (const std::runtime_error& e) {
    if (k.backend == "metal" && std::string(e.what()).find("No Metal back-end") != std::string::npos) {
      throw BackendNotSupported("[kernelevo.launch] " + k.name +
                                ": this MLX has no Metal back-end (Metal kernels run on Apple "
                                "silicon under macOS, with the `mlx` wheel built for it)");
    }
    throw;
  }
}

size_t cached_kernels() {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.functions.size();
}

}  // namespace kernelevo::gpu
