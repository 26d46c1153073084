// A slot that keeps one object of a type fixed at first use; lets a non-template
// part (an aggregator) own buffers whose type depends on the compressor it meets.
#pragma once

#include <memory>
#include <type_traits>
#include <typeinfo>
#include <utility>

#include "gcomp/core/error.hpp"

namespace gcomp::detail {

/// Value semantics: copying a slot copies its object, so a copied aggregator
/// never shares buffers or stored messages with the original. An object whose
/// type cannot be copied (a pending request) is not carried over: the copy
/// starts empty and makes a fresh one on first use.
class typed_slot {
 public:
  typed_slot() = default;
  typed_slot(const typed_slot& other) { copy_from(other); }
  typed_slot& operator=(const typed_slot& other) {
    if (this != &other) {
      reset();
      copy_from(other);
    }
    return *this;
  }
  typed_slot(typed_slot&& other) noexcept { swap(other); }
  typed_slot& operator=(typed_slot&& other) noexcept {
    if (this != &other) {
      reset();
      swap(other);
    }
    return *this;
  }
  ~typed_slot() { reset(); }

  /// The object of type U, default-constructed on first use. A later call
  /// with another type is a usage error (one part serving two compressors).
  template <class U>
  U& get(const char* where) {
    if (!object_) {
      object_ = new U();
      type_ = &typeid(U);
      destroy_ = [](void* p) { delete static_cast<U*>(p); };
      if constexpr (std::is_copy_constructible_v<U>)
        clone_ = [](const void* p) -> void* { return new U(*static_cast<const U*>(p)); };
      else
        clone_ = nullptr;
    } else if (*type_ != typeid(U)) {
      fail(where, "this object already serves a compressor with payload type ", type_->name(),
           " and cannot also serve one with payload type ", typeid(U).name(),
           "; use one object per compressor");
    }
    return *static_cast<U*>(object_);
  }

  /// The object of type U the slot already holds (for reading it, e.g. to
  /// save it); an empty slot or another type is a usage error.
  template <class U>
  const U& get(const char* where) const {
    if (!object_ || *type_ != typeid(U))
      fail(where, "this object holds ", object_ ? type_->name() : "nothing",
           ", not the payload state of type ", typeid(U).name());
    return *static_cast<const U*>(object_);
  }

 private:
  void reset() noexcept {
    if (object_) destroy_(object_);
    object_ = nullptr;
    type_ = nullptr;
    destroy_ = nullptr;
    clone_ = nullptr;
  }
  void copy_from(const typed_slot& other) {
    if (!other.object_ || !other.clone_) return;
    object_ = other.clone_(other.object_);
    type_ = other.type_;
    destroy_ = other.destroy_;
    clone_ = other.clone_;
  }
  void swap(typed_slot& other) noexcept {
    std::swap(object_, other.object_);
    std::swap(type_, other.type_);
    std::swap(destroy_, other.destroy_);
    std::swap(clone_, other.clone_);
  }

  void* object_ = nullptr;
  const std::type_info* type_ = nullptr;
  void (*destroy_)(void*) = nullptr;
  void* (*clone_)(const void*) = nullptr;
};

}  // namespace gcomp::detail
