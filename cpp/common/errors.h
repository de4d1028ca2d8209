// Errors the extension raises to Python with their own types (see bindings.cpp).
#pragma once

#include <stdexcept>

namespace kernelevo {

// An op was asked to run on a device whose backend kernelevo does not (yet) provide.
struct BackendNotSupported : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace kernelevo
