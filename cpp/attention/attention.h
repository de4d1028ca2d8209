// kernelevo's attention: the op (validation, configuration choice, graph construction) and
// its primitive (evaluation, autodiff). The kernels live in cpu_attention.*.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <variant>

#include "common/config.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace kernelevo {

namespace mx = mlx::core;

enum class AttentionMask { none, causal, boolean, additive };

// What a configuration is chosen from: the call's features.
struct AttentionCall {
  int64_t batch, heads, kv_heads, q_len, kv_len, head_dim, v_dim;
  mx::Dtype dtype;
  AttentionMask mask;
  float softcap;   // 0: none
  int64_t window;  // 0: none
  mx::Device::DeviceType device;
};

const char* mask_name(AttentionMask mask);

// Chooses a configuration when none is given (registered by the Python package, so that
// every call is chosen by the DSL heuristics in force).
using AttentionSelector = std::function<KernelConfig(const AttentionCall&)>;
void set_attention_selector(AttentionSelector selector);

// None, "causal", or a boolean / additive array broadcastable to [B, Hq, Lq, Lkv].
using MaskArg = std::variant<std::monostate, std::string, mx::array>;

// softmax(mask(softcap(scale * q k^T))) v with the semantics of
// mx.fast.scaled_dot_product_attention; softcap <= 0 and window <= 0 mean none.
mx::array attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                    const MaskArg& mask, std::optional<float> softcap,
                    std::optional<int64_t> window, const std::optional<KernelConfig>& config,
                    mx::StreamOrDevice s = {});

// The features of a call, validating it (throws std::invalid_argument).
AttentionCall describe_attention(const mx::array& q, const mx::array& k, const mx::array& v,
                                 const MaskArg& mask, std::optional<float> softcap,
                                 std::optional<int64_t> window, mx::Device::DeviceType device);

class Attention : public mx::Primitive {
 public:
  Attention(mx::Stream stream, KernelConfig config, float scale, AttentionMask mask,
            float softcap, int64_t window)
      : mx::Primitive(stream),
        config_(std::move(config)),
        scale_(scale),
        mask_(mask),
        softcap_(softcap),
        window_(window) {}

  void eval_cpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs,
                std::vector<mx::array>& outputs) override;

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals,
                             const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums,
                             const std::vector<mx::array>& outputs) override;

  const char* name() const override { return "KernelevoAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;

  const KernelConfig& config() const { return config_; }

 private:
  KernelConfig config_;
  float scale_;
  AttentionMask mask_;
  float softcap_;
  int64_t window_;
};

}  // namespace kernelevo
