// The trainer's models (LibTorch) and the one flat buffer per worker that gcomp
// works on: every parameter tensor is a view into flat parameters, and every
// .grad a view into flat gradients, so gcomp reads gradients from and writes
// parameters to the LibTorch tensors through spans, with no copies.
#pragma once

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <gcomp/core/error.hpp>
#include <gcomp/core/layout.hpp>

namespace fmnist {

/// MLP 784-256-128-10 with ReLU.
struct mlp_impl : torch::nn::Module {
  mlp_impl()
      : fc1(register_module("fc1", torch::nn::Linear(784, 256))),
        fc2(register_module("fc2", torch::nn::Linear(256, 128))),
        fc3(register_module("fc3", torch::nn::Linear(128, 10))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = torch::relu(fc1->forward(x.view({x.size(0), 784})));
    x = torch::relu(fc2->forward(x));
    return fc3->forward(x);
  }
  torch::nn::Linear fc1, fc2, fc3;
};

/// A small CNN: conv 5x5 (16) - pool - conv 5x5 (32) - pool - FC 128 - FC 10.
struct cnn_impl : torch::nn::Module {
  cnn_impl()
      : conv1(register_module("conv1", torch::nn::Conv2d(torch::nn::Conv2dOptions(1, 16, 5).padding(2)))),
        conv2(register_module("conv2", torch::nn::Conv2d(torch::nn::Conv2dOptions(16, 32, 5).padding(2)))),
        fc1(register_module("fc1", torch::nn::Linear(32 * 7 * 7, 128))),
        fc2(register_module("fc2", torch::nn::Linear(128, 10))) {}
  torch::Tensor forward(torch::Tensor x) {
    x = x.view({x.size(0), 1, 28, 28});
    x = torch::max_pool2d(torch::relu(conv1->forward(x)), 2);
    x = torch::max_pool2d(torch::relu(conv2->forward(x)), 2);
    x = torch::relu(fc1->forward(x.view({x.size(0), 32 * 7 * 7})));
    return fc2->forward(x);
  }
  torch::nn::Conv2d conv1, conv2;
  torch::nn::Linear fc1, fc2;
};

enum class model_kind { mlp, cnn };

inline model_kind parse_model(std::string_view name) {
  if (name == "mlp") return model_kind::mlp;
  if (name == "cnn") return model_kind::cnn;
  gcomp::fail("--model", "unknown model '", name, "' (expected mlp or cnn)");
}

/// One worker's replica. Parameters live in `params` (one flat float tensor,
/// in registration order: weight then bias of each module) and gradients in
/// `grads`; each parameter and its .grad are views into them.
class flat_model {
 public:
  /// Built from torch's default initialization under `seed`; every worker
  /// that builds with the same seed holds the same initial parameters.
  /// (torch's generator is global: build replicas one at a time.)
  flat_model(model_kind kind, std::uint64_t seed) : kind_(kind) {
    torch::manual_seed(seed);
    if (kind == model_kind::mlp)
      module_ = std::make_shared<mlp_impl>();
    else
      module_ = std::make_shared<cnn_impl>();
    std::int64_t total = 0;
    for (const auto& p : module_->parameters()) total += p.numel();
    params_ = torch::empty({total});
    grads_ = torch::zeros({total});

    std::vector<gcomp::layer> tensor_layers, module_layers;
    std::int64_t offset = 0;
    for (const auto& item : module_->named_parameters()) {
      torch::Tensor p = item.value();
      const std::int64_t n = p.numel();
      torch::Tensor view = params_.narrow(0, offset, n).view(p.sizes());
      view.copy_(p.detach());
      p.set_data(view);
      p.mutable_grad() = grads_.narrow(0, offset, n).view(p.sizes());
      std::vector<std::size_t> shape(p.sizes().begin(), p.sizes().end());
      tensor_layers.push_back({item.key(), std::size_t(offset), std::size_t(n), shape});
      // A module is "<name>.weight" + "<name>.bias", adjacent in the buffer.
      const std::string module = item.key().substr(0, item.key().rfind('.'));
      if (!module_layers.empty() && module_layers.back().name == module)
        module_layers.back().size += std::size_t(n);
      else
        module_layers.push_back({module, std::size_t(offset), std::size_t(n), {}});
      tensors_.push_back(p);
      tensor_module_.push_back(module_layers.size() - 1);
      offset += n;
    }
    tensor_layout_ = gcomp::layout::from_layers(std::move(tensor_layers));
    module_layout_ = gcomp::layout::from_layers(std::move(module_layers));
  }

  flat_model(const flat_model&) = delete;
  flat_model& operator=(const flat_model&) = delete;

  torch::Tensor forward(const torch::Tensor& x) {
    if (kind_ == model_kind::mlp) return static_cast<mlp_impl&>(*module_).forward(x);
    return static_cast<cnn_impl&>(*module_).forward(x);
  }

  std::span<float> params() { return {params_.data_ptr<float>(), std::size_t(params_.numel())}; }
  std::span<float> grads() { return {grads_.data_ptr<float>(), std::size_t(grads_.numel())}; }
  torch::Tensor& grads_tensor() { return grads_; }
  std::size_t size() const { return std::size_t(params_.numel()); }

  /// One layer per parameter tensor, with its shape (PowerSGD, LARS, top-k per layer).
  const gcomp::layout& tensor_layout() const { return tensor_layout_; }
  /// One layer per module (weight and bias together): JointSpar's layers,
  /// whose backward pass is skipped as a whole when the layer is inactive.
  const gcomp::layout& module_layout() const { return module_layout_; }

  /// Layers of module_layout() with mask[d] == 0 get requires_grad(false), so
  /// backward computes neither their gradients nor anything only they need.
  /// An empty mask makes every layer trainable.
  void set_trainable(std::span<const std::uint8_t> mask) {
    for (std::size_t i = 0; i < tensors_.size(); ++i)
      tensors_[i].requires_grad_(mask.empty() || mask[tensor_module_[i]] != 0);
  }

  /// Zeroes the flat gradients and runs backward of `loss`; the gradients
  /// land in the flat buffer (autograd accumulates into the existing views).
  void backward(const torch::Tensor& loss) {
    grads_.zero_();
    loss.backward();
    for (const auto& p : tensors_)
      if (p.grad().data_ptr() < grads_.data_ptr() ||
          p.grad().data_ptr<float>() >= grads_.data_ptr<float>() + grads_.numel())
        gcomp::fail("fmnist::flat_model::backward", "autograd replaced a .grad view; the flat "
                                                    "gradient buffer would miss it");
  }

  void train(bool on) { module_->train(on); }

 private:
  model_kind kind_;
  std::shared_ptr<torch::nn::Module> module_;
  torch::Tensor params_, grads_;
  std::vector<torch::Tensor> tensors_;
  std::vector<std::size_t> tensor_module_;
  gcomp::layout tensor_layout_, module_layout_;
};

}  // namespace fmnist
