// Named layers (offset, size, optional shape) over one flat parameter/gradient buffer.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "gcomp/core/error.hpp"

namespace gcomp {

/// One block of the model: elements [offset, offset + size) of the flat buffer.
struct layer {
  std::string name;
  std::size_t offset = 0;
  std::size_t size = 0;
  std::vector<std::size_t> shape;  // optional; when given, its product is size

  friend bool operator==(const layer&, const layer&) = default;
};

/// Whether a layout may leave elements of the buffer outside every layer.
enum class gaps { forbidden, allowed };

/// The layers of a model over one flat buffer: per-layer norms, masks and
/// updates (LARS, JointSpar, per-layer top-k) all index through it.
class layout {
 public:
  layout() = default;

  /// Contiguous layers of the given sizes, named "layer0", "layer1", ...
  layout(std::initializer_list<std::size_t> sizes)
      : layout(std::span<const std::size_t>(sizes.begin(), sizes.size())) {}

  explicit layout(std::span<const std::size_t> sizes) {
    std::vector<layer> layers;
    layers.reserve(sizes.size());
    std::size_t offset = 0;
    for (std::size_t d = 0; d < sizes.size(); ++d) {
      layers.push_back({"layer" + std::to_string(d), offset, sizes[d], {}});
      offset += sizes[d];
    }
    assign(std::move(layers), gaps::forbidden);
  }

  /// Contiguous layers from (name, size) pairs, in order.
  explicit layout(std::span<const std::pair<std::string, std::size_t>> named) {
    std::vector<layer> layers;
    layers.reserve(named.size());
    std::size_t offset = 0;
    for (const auto& [name, size] : named) {
      layers.push_back({name, offset, size, {}});
      offset += size;
    }
    assign(std::move(layers), gaps::forbidden);
  }

  layout(std::initializer_list<std::pair<std::string, std::size_t>> named)
      : layout(std::span<const std::pair<std::string, std::size_t>>(named.begin(), named.size())) {}

  /// Layers with explicit offsets (and shapes). They must not overlap; gaps
  /// between them (or before the first) are an error unless allowed.
  static layout from_layers(std::vector<layer> layers, gaps policy = gaps::forbidden) {
    layout result;
    result.assign(std::move(layers), policy);
    return result;
  }

  std::size_t num_layers() const { return layers_.size(); }
  /// Elements a buffer must hold: the end of the last layer.
  std::size_t total_size() const { return total_size_; }
  /// Elements inside some layer (equals total_size() without gaps).
  std::size_t covered_size() const { return covered_size_; }

  const layer& operator[](std::size_t d) const { return layers_[d]; }
  const layer& at(std::size_t d) const {
    if (d >= layers_.size())
      fail("gcomp::layout::at", "layer index ", d, " out of range [0, ", layers_.size(), ")");
    return layers_[d];
  }
  const layer& at(std::string_view name) const { return layers_[index_of(name)]; }

  /// Index of the layer called `name`, if there is one.
  std::optional<std::size_t> find(std::string_view name) const {
    for (std::size_t d = 0; d < layers_.size(); ++d)
      if (layers_[d].name == name) return d;
    return std::nullopt;
  }
  std::size_t index_of(std::string_view name) const {
    if (auto d = find(name)) return *d;
    fail("gcomp::layout::index_of", "no layer named '", name, "'");
  }

  auto begin() const { return layers_.begin(); }
  auto end() const { return layers_.end(); }
  std::span<const layer> layers() const { return layers_; }

  /// Layer d's part of a flat buffer of at least total_size() elements.
  template <class T>
  std::span<T> slice(std::span<T> buffer, std::size_t d) const {
    check_buffer("gcomp::layout::slice", "buffer", buffer.size());
    const layer& l = at(d);
    return buffer.subspan(l.offset, l.size);
  }

  /// Throws unless a buffer of `size` elements fits this layout exactly.
  void check_buffer(std::string_view where, std::string_view name, std::size_t size) const {
    if (size != total_size_)
      fail(where, name, " has size ", size, " but the layout covers ", total_size_,
           " elements; they must match");
  }

  friend bool operator==(const layout&, const layout&) = default;

 private:
  void assign(std::vector<layer> layers, gaps policy) {
    constexpr std::string_view where = "gcomp::layout";
    require(!layers.empty(), where, "a layout needs at least one layer, got none");
    for (std::size_t d = 0; d < layers.size(); ++d) {
      const layer& l = layers[d];
      require(!l.name.empty(), where, "layer ", d, " has an empty name");
      require(l.size > 0, where, "layer '", l.name, "' has size 0");
      require(l.offset <= SIZE_MAX - l.size, where, "layer '", l.name, "' offset ", l.offset,
              " + size ", l.size, " overflows");
      if (!l.shape.empty()) {
        std::size_t product = 1;
        for (std::size_t extent : l.shape) product *= extent;
        require(product == l.size, where, "layer '", l.name, "' has shape with ", product,
                " elements but size ", l.size);
      }
      for (std::size_t e = 0; e < d; ++e)
        require(layers[e].name != l.name, where, "two layers are named '", l.name, "'");
    }
    // Check overlap and gaps in offset order; the layers keep the order given.
    std::vector<std::size_t> order(layers.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return layers[a].offset < layers[b].offset; });
    std::size_t end = 0;
    for (std::size_t k = 0; k < order.size(); ++k) {
      const layer& l = layers[order[k]];
      if (k > 0)
        require(l.offset >= end, where, "layer '", l.name, "' at offset ", l.offset,
                " overlaps layer '", layers[order[k - 1]].name, "' which ends at ", end);
      require(policy == gaps::allowed || l.offset == end, where, "gap before layer '", l.name,
              "': it starts at ", l.offset, " but the previous layer ends at ", end,
              " (pass gaps::allowed to permit this)");
      end = l.offset + l.size;
    }
    total_size_ = end;
    covered_size_ = 0;
    for (const layer& l : layers) covered_size_ += l.size;
    layers_ = std::move(layers);
  }

  std::vector<layer> layers_;
  std::size_t total_size_ = 0;
  std::size_t covered_size_ = 0;
};

}  // namespace gcomp
