// Shapes and dtypes as text, for error messages.
//
// Built from std::string and std::to_string, not iostreams: with the mlx-cuda-13 wheel's
// libmlx.so loaded, an std::ostringstream made in this extension crashed (H200, MLX 0.32.4),
// while the same code ran with mlx-cpu's.
#pragma once

#include <string>

#include "mlx/array.h"

namespace kernelevo {

// "(2, 3)", "(5,)" or "()", as Python prints a shape tuple.
std::string shape_str(const mlx::core::Shape& shape);

// "float32", "bfloat16", ...: MLX's Python name of the type.
std::string dtype_str(mlx::core::Dtype dtype);

}  // namespace kernelevo
