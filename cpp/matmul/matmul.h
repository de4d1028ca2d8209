// kernelevo's matmul: the op (graph construction, validation, configuration choice) and
// its primitive (evaluation, autodiff, vmap). The kernels live in cpu_gemm.*.
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "common/config.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace kernelevo {

namespace mx = mlx::core;

// What is applied to the product, in this order: act(product * scale + bias) + residual.
// Bias and residual broadcast to the result's shape (bias of shape (N,) is a linear
// layer's); they are cast to the result's dtype.
struct MatmulEpilogue {
  float scale = 1.0f;
  std::optional<mx::array> bias;
  std::string activation = "none";  // none | relu | gelu | gelu_tanh | silu
  std::optional<mx::array> residual;

  // The call feature `epilogue`: none, bias, activation, residual, scale or mixed.
  std::string kind() const;
};

// What a configuration is chosen from: the call's features.
struct MatmulCall {
  int64_t M, N, K, batch;
  mx::Dtype dtype;
  bool transpose_a, transpose_b;
  std::string epilogue;  // MatmulEpilogue::kind()
  mx::Device::DeviceType device;
};

// Chooses a configuration when none is given: the Python package registers its DSL
// heuristics here at import, so products the extension creates itself (gradients) are
// chosen by the same rules as the user's calls.
using MatmulSelector = std::function<KernelConfig(const MatmulCall&)>;
void set_matmul_selector(MatmulSelector selector);

// op(a) @ op(b) over the last two axes, where op transposes those axes when asked;
// leading axes broadcast as in numpy. 1-D operands behave as in mx.matmul.
mx::array matmul(const mx::array& a, const mx::array& b,
                 const std::optional<KernelConfig>& config, bool transpose_a,
                 bool transpose_b, const MatmulEpilogue& epilogue = {},
                 mx::StreamOrDevice s = {});

// The features of a call, validating shapes and dtypes (throws std::invalid_argument).
MatmulCall describe_matmul(const mx::Shape& a_shape, const mx::Shape& b_shape,
                           mx::Dtype a_dtype, mx::Dtype b_dtype, bool transpose_a,
                           bool transpose_b, mx::Device::DeviceType device);

// The primitive's inputs: a, b, then bias and residual when present (each already
// broadcast to the output's shape and dtype).
class Matmul : public mx::Primitive {
 public:
  Matmul(mx::Stream stream, KernelConfig config, bool transpose_a, bool transpose_b,
         float scale, std::string activation, bool has_bias, bool has_residual)
      : mx::Primitive(stream),
        config_(std::move(config)),
        transpose_a_(transpose_a),
        transpose_b_(transpose_b),
        scale_(scale),
        activation_(std::move(activation)),
        has_bias_(has_bias),
        has_residual_(has_residual) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs, const std::vector<int>& axes) override;

  const char* name() const override { return "KernelevoMatmul"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  const KernelConfig& config() const { return config_; }

 private:
  // The epilogue of this node with the given epilogue operands (or none).
  MatmulEpilogue epilogue(const std::vector<mx::array>& inputs) const;
  bool has_epilogue() const {
    return scale_ != 1.0f || activation_ != "none" || has_bias_ || has_residual_;
  }

  KernelConfig config_;
  bool transpose_a_, transpose_b_;
  float scale_;
  std::string activation_;
  bool has_bias_, has_residual_;
};

}  // namespace kernelevo
