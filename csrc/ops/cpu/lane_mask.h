// Masks of the first `left` lanes of an AVX-512 vector (clamped to none .. all): the tail of a row in masked loads
// and stores. Plain integer code, callable from any function whatever its target attribute.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace torchmoe::cpu {

inline __mmask16 lane_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

inline __mmask32 lane_mask32(int64_t left) {
  return left >= 32 ? __mmask32(0xFFFFFFFFu) : left <= 0 ? __mmask32(0) : __mmask32((1u << left) - 1);
}

}  // namespace torchmoe::cpu
#endif
