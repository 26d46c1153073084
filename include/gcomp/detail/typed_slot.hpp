// A slot that keeps one object of a type fixed at first use; lets a non-template
// part (an aggregator) own buffers whose type depends on the compressor it meets.
#pragma once

#include <memory>
#include <typeinfo>

#include "gcomp/core/error.hpp"

namespace gcomp::detail {

class typed_slot {
 public:
  /// The object of type U, default-constructed on first use. A later call
  /// with another type is a usage error (one part serving two compressors).
  template <class U>
  U& get(const char* where) {
    if (!object_) {
      object_ = std::shared_ptr<void>(new U(), [](void* p) { delete static_cast<U*>(p); });
      type_ = &typeid(U);
    } else if (*type_ != typeid(U)) {
      fail(where, "this object already serves a compressor with payload type ", type_->name(),
           " and cannot also serve one with payload type ", typeid(U).name(),
           "; use one object per compressor");
    }
    return *static_cast<U*>(object_.get());
  }

 private:
  std::shared_ptr<void> object_;
  const std::type_info* type_ = nullptr;
};

}  // namespace gcomp::detail
