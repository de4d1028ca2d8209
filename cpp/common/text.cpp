#include "common/text.h"

#include <utility>

namespace kernelevo {

namespace mx = mlx::core;

std::string shape_str(const mx::Shape& shape) {
  std::string text = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) text += ", ";
    text += std::to_string(shape[i]);
  }
  return text + (shape.size() == 1 ? ",)" : ")");
}

std::string dtype_str(mx::Dtype dtype) {
  static const std::pair<mx::Dtype, const char*> names[] = {
      {mx::bool_, "bool"},         {mx::uint8, "uint8"},     {mx::uint16, "uint16"},
      {mx::uint32, "uint32"},      {mx::uint64, "uint64"},   {mx::int8, "int8"},
      {mx::int16, "int16"},        {mx::int32, "int32"},     {mx::int64, "int64"},
      {mx::float16, "float16"},    {mx::float32, "float32"}, {mx::float64, "float64"},
      {mx::bfloat16, "bfloat16"},  {mx::complex64, "complex64"}};
  for (const auto& [type, name] : names) {
    if (type == dtype) return name;
  }
  return "an unknown type";
}

}  // namespace kernelevo
