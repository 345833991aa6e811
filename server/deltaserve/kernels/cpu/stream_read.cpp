// One pass that only reads bytes: the memory-speed floor under a kernel that streams them.
// `deltaserve bench bound` times it over the 1-bit stacks a decode step reads and compares the
// table-lookup kernel's time in the step against it.

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/extension.h>

#include <cstring>
#include <vector>

namespace {

// XOR of the bytes' 64-bit words (a checksum the compiler cannot drop); n a multiple of 8
__attribute__((target("avx512f"))) uint64_t fold_avx512(const uint8_t* p, int64_t n) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 256 <= n; i += 256) {
    a0 = _mm512_xor_si512(a0, _mm512_loadu_si512(p + i));
    a1 = _mm512_xor_si512(a1, _mm512_loadu_si512(p + i + 64));
    a2 = _mm512_xor_si512(a2, _mm512_loadu_si512(p + i + 128));
    a3 = _mm512_xor_si512(a3, _mm512_loadu_si512(p + i + 192));
  }
  alignas(64) uint64_t w[8];
  _mm512_store_si512(w, _mm512_xor_si512(_mm512_xor_si512(a0, a1), _mm512_xor_si512(a2, a3)));
  uint64_t acc = 0;
  for (uint64_t v : w) acc ^= v;
  for (; i < n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    acc ^= v;
  }
  return acc;
}

uint64_t fold_scalar(const uint8_t* p, int64_t n) {
  uint64_t acc = 0;
  for (int64_t i = 0; i < n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    acc ^= v;
  }
  return acc;
}

}  // namespace

// Reads each buffer once, in order, as 64-bit words (a trailing partial word is skipped: the 1-bit
// stacks are whole words), each buffer split into contiguous shares of the intra-op threads (the
// decode kernel's static split of its items); returns the XOR of the words.
int64_t stream_read(const std::vector<at::Tensor>& buffers) {
  constexpr int64_t kChunk = 4096;
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  uint64_t total = 0;
  for (const at::Tensor& b : buffers) {
    TORCH_CHECK(b.device().is_cpu() && b.is_contiguous(), "contiguous CPU tensors expected");
    const auto* p = static_cast<const uint8_t*>(b.data_ptr());
    const int64_t n = (b.numel() * static_cast<int64_t>(b.element_size())) / 8 * 8;
    std::vector<uint64_t> parts(at::get_num_threads(), 0);
    at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      const int64_t lo = c0 * kChunk, hi = std::min(n, c1 * kChunk);
      parts[at::get_thread_num()] ^= avx512 ? fold_avx512(p + lo, hi - lo) : fold_scalar(p + lo, hi - lo);
    });
    for (uint64_t v : parts) total ^= v;
  }
  return static_cast<int64_t>(total);
}
