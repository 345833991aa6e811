// y = y + round_to_y_dtype(factor * acc), the reference's rounding, shared by the 1-bit kernels.
#pragma once

#include <ATen/ATen.h>

namespace deltaserve {

template <typename T>
inline void emit(T* y, float factor, float acc) {
  const T delta = static_cast<T>(factor * acc);
  *y = static_cast<T>(static_cast<float>(*y) + static_cast<float>(delta));
}

template <>
inline void emit<float>(float* y, float factor, float acc) {
  *y += factor * acc;
}

}  // namespace deltaserve
