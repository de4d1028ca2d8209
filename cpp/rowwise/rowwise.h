// Row-wise ops of a transformer layer that MLX's CPU back-end runs as a chain of generic ops
// (its fast::rms_norm and fast::rope have no CPU kernel): each here is one primitive with
// one pass over the data. The same results as MLX's ops within the dtype's rounding; their
// gradients are MLX's (the VJP differentiates MLX's op).
#pragma once

#include <optional>

#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace kernelevo {

namespace mx = mlx::core;

// x * rsqrt(mean(x^2 over the last axis) + eps), rounded to the output type, then times
// weight ([D], optional), as mx.fast.rms_norm; the output type is x's promoted with weight's.
mx::array rms_norm(const mx::array& x, const std::optional<mx::array>& weight, float eps,
                   mx::StreamOrDevice s = {});

// Rotary position embedding of the first `dims` features of x's last axis, as
// mx.fast.rope: x is [batch, ..., positions, features]; position t of batch b is rotated by
// scale * (offset[b or 0] + t) * f_i, with f_i = base^(-2i/dims) or 1 / freqs[i].
mx::array rope(const mx::array& x, int dims, bool traditional, std::optional<float> base,
               float scale, const mx::array& offset, const std::optional<mx::array>& freqs,
               mx::StreamOrDevice s = {});

class RmsNorm : public mx::Primitive {
 public:
  RmsNorm(mx::Stream stream, float eps, bool has_weight)
      : mx::Primitive(stream), eps_(eps), has_weight_(has_weight) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "KernelevoRmsNorm"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  float eps_;
  bool has_weight_;
};

class Rope : public mx::Primitive {
 public:
  Rope(mx::Stream stream, int dims, bool traditional, float base, float scale, bool has_freqs)
      : mx::Primitive(stream),
        dims_(dims),
        traditional_(traditional),
        base_(base),
        scale_(scale),
        has_freqs_(has_freqs) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;
  const char* name() const override { return "KernelevoRope"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape()};
  }

 private:
  int dims_;
  bool traditional_;
  float base_, scale_;
  bool has_freqs_;
};

}  // namespace kernelevo
