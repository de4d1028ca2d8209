#include "gpu/launch.h"

#include <mutex>
#include <unordered_map>

#include "common/errors.h"
#include "mlx/backend/cuda/cuda.h"

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

mx::fast::CustomKernelFunction create(const KernelSource& k) {
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

mx::fast::CustomKernelFunction function_for(const KernelSource& k) {
  auto& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const std::string key = k.backend + "/" + k.name;
  auto it = c.functions.find(key);
  if (it == c.functions.end()) it = c.functions.emplace(key, create(k)).first;
  return it->second;
}

}  // namespace

Launch::Launch(const KernelSource& k, const LaunchShape& shape)
    : backend_(k.backend),
      name_(k.name),
      inputs_(k.input_names.size()),
      grid_(shape.grid),
      threadgroup_(shape.threadgroup),
      init_value_(shape.init_value) {
  if (shape.output_shapes.size() != k.output_names.size() ||
      shape.output_dtypes.size() != k.output_names.size()) {
    throw std::invalid_argument("[kernelevo.launch] " + k.name +
                                ": one shape and one dtype per output");
  }
  for (const auto& s : shape.output_shapes) output_shapes_.emplace_back(s.begin(), s.end());
  for (const auto& name : shape.output_dtypes) output_dtypes_.push_back(dtype_named(name));
  for (const auto& [name, value] : shape.template_args) {
    if (auto* b = std::get_if<bool>(&value)) {
      template_args_.emplace_back(name, *b);
    } else if (auto* i = std::get_if<int>(&value)) {
      template_args_.emplace_back(name, *i);
    } else {
      template_args_.emplace_back(name, dtype_named(std::get<std::string>(value)));
    }
  }
  function_ = function_for(k);
}

std::vector<mx::array> Launch::operator()(const std::vector<mx::array>& inputs,
                                          mx::StreamOrDevice stream) const {
  if (inputs.size() != inputs_) {
    throw std::invalid_argument("[kernelevo.launch] " + name_ + " takes " +
                                std::to_string(inputs_) + " inputs, got " +
                                std::to_string(inputs.size()));
  }
  try {
    return function_(inputs, output_shapes_, output_dtypes_, grid_, threadgroup_, template_args_,
                     init_value_, false, stream);
  } catch (const std::runtime_error& e) {
    if (backend_ == "metal" && std::string(e.what()).find("No Metal back-end") != std::string::npos) {
      throw BackendNotSupported("[kernelevo.launch] " + name_ +
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

bool any_tracer(const std::vector<mx::array>& arrays) {
  for (const auto& a : arrays) {
    if (a.is_tracer()) return true;
  }
  return false;
}

}  // namespace kernelevo::gpu
