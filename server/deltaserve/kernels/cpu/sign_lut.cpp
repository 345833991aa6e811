// Segmented 1-bit delta matmul by table lookup (T-MAC's method), over the "lut" layout.
//
// Semantics: those of sign_delta_matmul (kernels/reference.py): for every segment g with tokens
// [s, s + l), slot t, alpha a and output row n:
//     y[s:s+l, n] += (a * scales[t, n]) * (x[s:s+l] @ Sign_t.T)[:, n]      (scales fp32 [S, N])
// up to the int8 rounding of the tables stated below.
//
// Layout (deltaserve.kernels.lut_layout): lut uint8 [S, NB, G, 32], NB = ceil(N / 64) blocks of
// 64 rows, G = 8 * ceil(K / 32) groups of 4 columns. Byte b of (slot, row block r, group j) holds
// in its low nibble the signs of row 64 r + b at columns 4 j .. 4 j + 3 (bit c = column 4 j + c,
// set = +1) and in its high nibble those of row 64 r + 32 + b. Rows past N are zero (never written).
//
// Decode segments (fewer than gemm_min_tokens tokens): per token and group j, the 16 sums
//   table_j[i] = sum_c (bit c of i ? +x[4j+c] : -x[4j+c])
// are computed once in fp32 and rounded to integers with one scale per block of 32 groups (128
// inputs): scale = max over the block's groups of sum_c |x[4j+c]| / Q, so |table| <= Q, with
//   bits = 8:  Q = 127, one int8 table;
//   bits = 16: Q = 32767, split as hi * 256 + lo into a signed and an unsigned byte table.
// A row's block sum is then 32 lookups per table (vpshufb finds 32 rows' entries in one
// instruction), summed exactly in int16 (|sum| <= 32 * 255), recombined, and accumulated in
// fp32 as scale * sum. Error bound per token and row: sum over blocks of 32 * scale / 2 (one
// half-step per lookup), times |a * scales[t, n]|: about 1% of the delta's size with 8 bits,
// 256 times less with 16. The bits of a row block (G * 32 bytes) are read from memory once per
// segment and reused from cache for the segment's other tokens.
// Lookups run in AVX2, or with AVX-512BW two groups per instruction (same integer sums, so the
// same outputs bit for bit), or in a portable scalar loop; isa_cap caps the choice.
// Prefill segments: tiles of 64 rows are unpacked to +-1 fp32 and multiplied with BLAS (exact
// products, fp32 sums), as sign_gemv.cpp does for the row layout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "emit.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kRows = 64;    // rows per block of the layout
constexpr int64_t kBlock = 32;   // groups per scale block (128 inputs)
constexpr int64_t kPrefetch = 2048;  // bytes of bits fetched ahead of the lookups
// a call's lookups go to a second thread only with at least this many bytes of bits a thread:
// a parallel region costs ~5 us on a 2-vCPU VM, the lookups of 256 KiB ~10 us
constexpr int64_t kMinParallelBytes = 256 * 1024;

struct Seg {
  int64_t start, length, slot;
  float alpha;
  const float* scales;  // the slot's row of scales [N]: output n gets alpha * scales[n]
};

// max over groups [b0, b1) of sum_c |x[4j+c]|: the largest |table entry| of a scale block.
inline float block_max(const float* x, int64_t b0, int64_t b1) {
  float m = 0.f;
  for (int64_t j = b0; j < b1; ++j) {
    const float* xj = x + 4 * j;
    m = std::max(m, std::fabs(xj[0]) + std::fabs(xj[1]) + std::fabs(xj[2]) + std::fabs(xj[3]));
  }
  return m;
}

// Tables of one token (x padded to 4 G columns): hi [G][16] int8 (the whole entry with 8 bits;
// its high byte with 16) and, with 16 bits, lo [G][16] (the low byte, unsigned); block scales
// [ceil(G / 32)].
template <int BITS>
void build_tables(const float* x, int64_t G, int8_t* hi, uint8_t* lo, float* scales) {
  constexpr float Q = BITS == 8 ? 127.f : 32767.f;
  float e[16];
  for (int64_t b0 = 0; b0 < G; b0 += kBlock) {
    const int64_t b1 = std::min(G, b0 + kBlock);
    const float m = block_max(x, b0, b1);
    scales[b0 / kBlock] = m / Q;
    const float inv = m > 0.f ? Q / m : 0.f;
    for (int64_t j = b0; j < b1; ++j) {
      const float* xj = x + 4 * j;
      for (int i = 0; i < 16; ++i) {
        e[i] = ((i & 1) ? xj[0] : -xj[0]) + ((i & 2) ? xj[1] : -xj[1]) + ((i & 4) ? xj[2] : -xj[2]) +
               ((i & 8) ? xj[3] : -xj[3]);
      }
      for (int i = 0; i < 16; ++i) {
        const int q = static_cast<int>(std::max(-Q, std::min(Q, std::nearbyint(e[i] * inv))));
        if (BITS == 8) {
          hi[16 * j + i] = static_cast<int8_t>(q);
        } else {
          hi[16 * j + i] = static_cast<int8_t>(q >> 8);  // arithmetic shift: q = hi * 256 + lo
          lo[16 * j + i] = static_cast<uint8_t>(q & 0xFF);
        }
      }
    }
  }
}

// The same tables, 16 entries of a group at once: entries as 4 fused multiply-adds of x with
// constant sign patterns, rounded by the default (nearest-even) mode as std::nearbyint does.
template <int BITS>
__attribute__((target("avx2,fma"))) void build_tables_avx2(const float* x, int64_t G, int8_t* hi, uint8_t* lo,
                                                            float* scales) {
  constexpr float Q = BITS == 8 ? 127.f : 32767.f;
  const __m256 s0 = _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
  const __m256 s1 = _mm256_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1);
  const __m256 s2 = _mm256_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1);
  const __m256 neg = _mm256_set1_ps(-1.f), pos = _mm256_set1_ps(1.f);
  const __m256i qmax = _mm256_set1_epi32(static_cast<int>(Q)), qmin = _mm256_set1_epi32(-static_cast<int>(Q));
  const __m128i low_byte = _mm_set1_epi16(0xFF);
  for (int64_t b0 = 0; b0 < G; b0 += kBlock) {
    const int64_t b1 = std::min(G, b0 + kBlock);
    const float m = block_max(x, b0, b1);
    scales[b0 / kBlock] = m / Q;
    const __m256 inv = _mm256_set1_ps(m > 0.f ? Q / m : 0.f);
    for (int64_t j = b0; j < b1; ++j) {
      const float* xj = x + 4 * j;
      const __m256 x0 = _mm256_broadcast_ss(xj), x1 = _mm256_broadcast_ss(xj + 1);
      const __m256 x2 = _mm256_broadcast_ss(xj + 2), x3 = _mm256_broadcast_ss(xj + 3);
      const __m256 common = _mm256_fmadd_ps(x2, s2, _mm256_fmadd_ps(x1, s1, _mm256_mul_ps(x0, s0)));
      const __m256 ea = _mm256_fmadd_ps(x3, neg, common);  // entries 0-7 (bit 3 clear)
      const __m256 eb = _mm256_fmadd_ps(x3, pos, common);  // entries 8-15
      __m256i qa = _mm256_cvtps_epi32(_mm256_mul_ps(ea, inv));
      __m256i qb = _mm256_cvtps_epi32(_mm256_mul_ps(eb, inv));
      qa = _mm256_max_epi32(qmin, _mm256_min_epi32(qmax, qa));
      qb = _mm256_max_epi32(qmin, _mm256_min_epi32(qmax, qb));
      // int16 entries 0..15 in order (packs works per 128-bit lane; the permute restores order)
      const __m256i e16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(qa, qb), 0xD8);
      const __m128i e_lo = _mm256_castsi256_si128(e16), e_hi = _mm256_extracti128_si256(e16, 1);
      if (BITS == 8) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * j), _mm_packs_epi16(e_lo, e_hi));
      } else {
        const __m128i h = _mm_packs_epi16(_mm_srai_epi16(e_lo, 8), _mm_srai_epi16(e_hi, 8));
        const __m128i l = _mm_packus_epi16(_mm_and_si128(e_lo, low_byte), _mm_and_si128(e_hi, low_byte));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * j), h);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + 16 * j), l);
      }
    }
  }
}

// out[0..63] = sum over groups of the looked-up entries of one row block for one token.
template <int BITS>
void lut_block_scalar(const uint8_t* w, const int8_t* hi, const uint8_t* lo, const float* scales, int64_t G,
                      float* out) {
  for (int64_t r = 0; r < kRows; ++r) out[r] = 0.f;
  for (int64_t b0 = 0; b0 < G; b0 += kBlock) {
    const int64_t b1 = std::min(G, b0 + kBlock);
    int32_t acc[kRows] = {};
    for (int64_t j = b0; j < b1; ++j) {
      const uint8_t* wj = w + 32 * j;
      const int8_t* t = hi + 16 * j;
      const int mul = BITS == 8 ? 1 : 256;
      for (int b = 0; b < 32; ++b) {
        acc[b] += mul * t[wj[b] & 15];
        acc[32 + b] += mul * t[wj[b] >> 4];
      }
      if (BITS == 16) {
        const uint8_t* u = lo + 16 * j;
        for (int b = 0; b < 32; ++b) {
          acc[b] += u[wj[b] & 15];
          acc[32 + b] += u[wj[b] >> 4];
        }
      }
    }
    const float s = scales[b0 / kBlock];
    for (int64_t r = 0; r < kRows; ++r) out[r] += s * static_cast<float>(acc[r]);
  }
}

// Widening without shuffles: vpmaddubsw with a constant (1, 0) or (0, 1) byte pair extracts the
// even or odd bytes of a lookup as int16 on the multiply ports (vpmovsxbw and vextracti128 would
// take the two shuffle ports, which the lookups themselves need). Accumulators therefore hold,
// per 32 looked-up rows r0..r0+31, the even rows in one vector and the odd rows in another
// (each as rows r0 + 2i, i < 8, in lane 0 and r0 + 16 + 2i in lane 1); the end of a row block
// interleaves them back into row order.

// int16 sums of 16 rows -> fp32, times the block scale, into two accumulators of 8 rows
__attribute__((target("avx2,fma"))) inline void widen_fma(__m256i a, __m256 s, __m256* lo, __m256* hi) {
  const __m256 f0 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));
  const __m256 f1 = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)));
  *lo = _mm256_fmadd_ps(f0, s, *lo);
  *hi = _mm256_fmadd_ps(f1, s, *hi);
}

// (hi * 256 + lo) sums of 16 rows -> fp32 (exact in int32), times the block scale
__attribute__((target("avx2,fma"))) inline void widen_fma2(__m256i h, __m256i l, __m256 s, __m256* lo,
                                                          __m256* hi) {
  const __m256i h0 = _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(h)), 8);
  const __m256i h1 = _mm256_slli_epi32(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(h, 1)), 8);
  const __m256i l0 = _mm256_cvtepu16_epi32(_mm256_castsi256_si128(l));
  const __m256i l1 = _mm256_cvtepu16_epi32(_mm256_extracti128_si256(l, 1));
  *lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(h0, l0)), s, *lo);
  *hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(h1, l1)), s, *hi);
}

// end of a scale block: its int16 sums (even/odd rows of the low- and high-nibble lookups; with
// 16 bits also those of the unsigned low-byte table) widened to fp32, times the block's scale
template <int BITS>
__attribute__((target("avx2,fma"))) inline void block_end(__m256i a0, __m256i a1, __m256i a2, __m256i a3, __m256i u0,
                                                         __m256i u1, __m256i u2, __m256i u3, float scale,
                                                         __m256* f) {
  const __m256 s = _mm256_set1_ps(scale);
  if (BITS == 8) {
    widen_fma(a0, s, &f[0], &f[1]);
    widen_fma(a1, s, &f[2], &f[3]);
    widen_fma(a2, s, &f[4], &f[5]);
    widen_fma(a3, s, &f[6], &f[7]);
  } else {
    widen_fma2(a0, u0, s, &f[0], &f[1]);
    widen_fma2(a1, u1, s, &f[2], &f[3]);
    widen_fma2(a2, u2, s, &f[4], &f[5]);
    widen_fma2(a3, u3, s, &f[6], &f[7]);
  }
}

// rows back in order: f[2h] holds the even rows of 16 (0, 2, .., 14 of rows 16 h .. 16 h + 15 in
// two 4-row lanes), f[2h + 2] the odd ones; within each 128-bit lane unpacklo/hi interleave them
// into rows (0-3 | 8-11) and (4-7 | 12-15), and the lane permutes make 0-7 and 8-15
__attribute__((target("avx2,fma"))) inline void store_rows(const __m256* f, float* out) {
  for (int q = 0; q < 4; ++q) {  // q: rows 16 q .. 16 q + 15, from f[e] (even) and f[e + 2] (odd)
    const int e = (q / 2) * 4 + (q % 2);
    const __m256 lo = _mm256_unpacklo_ps(f[e], f[e + 2]), hi = _mm256_unpackhi_ps(f[e], f[e + 2]);
    _mm256_storeu_ps(out + 16 * q, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + 16 * q + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

// the int16 sums of the two groups of a 512-bit accumulator (low and high 256 bits) added
__attribute__((target("avx512f,avx512bw,avx2"))) inline __m256i fold16(__m512i a) {
  return _mm256_add_epi16(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
}

template <int BITS>
__attribute__((target("avx2,fma"))) void lut_block_avx2(const uint8_t* w, const int8_t* hi, const uint8_t* lo,
                                                         const float* scales, int64_t G, float* out) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i even = _mm256_set1_epi16(0x0001), odd = _mm256_set1_epi16(0x0100);  // byte pairs (1,0), (0,1)
  __m256 f[8];
  for (int i = 0; i < 8; ++i) f[i] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < G; b0 += kBlock) {
    const int64_t b1 = std::min(G, b0 + kBlock);
    // signed sums: even/odd rows of the low-nibble lookup (rows 0-31), then of the high (32-63);
    // with 16 bits, the same for the unsigned low-byte table
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    __m256i u0 = a0, u1 = a0, u2 = a0, u3 = a0;
    for (int64_t j = b0; j < b1; ++j) {
      // the bits stream from memory once: fetch 2 KiB ahead (+15-25% over the hardware prefetcher alone
      // on the 2-core Zen 3 host; past the block's end it reaches the next row block, read next)
      _mm_prefetch(reinterpret_cast<const char*>(w + 32 * j + kPrefetch), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * j));
      const __m256i il = _mm256_and_si256(v, m4);
      const __m256i ih = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + 16 * j)));
      const __m256i rl = _mm256_shuffle_epi8(t, il);
      const __m256i rh = _mm256_shuffle_epi8(t, ih);
      a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(even, rl));  // unsigned 1/0 times signed entries
      a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(odd, rl));
      a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(even, rh));
      a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(odd, rh));
      if (BITS == 16) {
        const __m256i tu = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 16 * j)));
        const __m256i ul = _mm256_shuffle_epi8(tu, il);
        const __m256i uh = _mm256_shuffle_epi8(tu, ih);
        u0 = _mm256_add_epi16(u0, _mm256_maddubs_epi16(ul, even));  // unsigned entries times signed 1/0
        u1 = _mm256_add_epi16(u1, _mm256_maddubs_epi16(ul, odd));
        u2 = _mm256_add_epi16(u2, _mm256_maddubs_epi16(uh, even));
        u3 = _mm256_add_epi16(u3, _mm256_maddubs_epi16(uh, odd));
      }
    }
    block_end<BITS>(a0, a1, a2, a3, u0, u1, u2, u3, scales[b0 / kBlock], f);
  }
  store_rows(f, out);
}

// AVX-512BW: the same lookups two groups at a time. One 64-byte load holds the bits of groups j
// (bytes 0-31) and j + 1 (32-63); their two tables sit in 128-bit lanes 0-1 and 2-3 of one
// 64-byte "placed" table (place_tables_avx512: placed once per token, not per lookup), so one
// vpshufb looks up 32 rows of both groups.
//
// Sums with half the widening: a lookup's 64 bytes are added as 32 int16 words (vpaddw, any
// vector port) into W, and only the odd bytes are widened (vpmaddubsw with (0, 1), a multiply
// port) into O. Per word, W = sum(even) + 256 * sum(odd) mod 2^16, so at the end of a scale block
// sum(even) = W - 256 * O mod 2^16, exact while sum(even) < 2^16: the entries are unsigned,
// which the placed signed tables become by a bias of +128 (x ^ 0x80), at most 32 * 255 a block.
// The bias (128 per group) comes off both sums. The fixed-up even/odd sums are exactly the AVX2
// loop's integer sums (the same entries added in another order, exact in int16), so the outputs
// are bitwise those of lut_block_avx2. G is a multiple of 8, so every scale block has an even
// number of groups.
//
// NP planes of one matrix (1 for a 1-bit matrix) for one token in one pass: each group pair's
// tables are loaded once and indexed with every plane's bits, so the table loads and the loop
// are shared. out[64 p + r] is plane p's row r, bitwise what a pass of that plane alone gives
// (the same integer sums and block-end arithmetic per plane). NP is small (accumulators: 4 or 8
// registers a plane).

// The placed tables of one token: for each group pair (j, j + 1), 64 bytes [t_j, t_j, t_j+1,
// t_j+1]; hi entries biased to unsigned (^ 0x80), lo entries (16-bit tables) as they are.
template <int BITS>
__attribute__((target("avx2"))) void place_tables_avx512(const int8_t* hi, const uint8_t* lo, int64_t G, uint8_t* hi2,
                                                        uint8_t* lo2) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = 0; j < G; ++j) {  // group j: its 16 entries twice, at byte 32 j
    const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + 16 * j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi2 + 32 * j), _mm256_xor_si256(t, flip));
    if (BITS == 16) {
      const __m256i u = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo + 16 * j)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo2 + 32 * j), u);
    }
  }
}

// a scale block's int16 sums of one lookup's rows from its W and O sums (both folded to 256
// bits): the even rows (W - 256 O) and odd rows (O), each less the bias of its n groups
__attribute__((target("avx2"))) inline void unbias(__m256i w, __m256i o, __m256i bias, __m256i* even,
                                                  __m256i* odd) {
  *even = _mm256_sub_epi16(_mm256_sub_epi16(w, _mm256_slli_epi16(o, 8)), bias);
  *odd = _mm256_sub_epi16(o, bias);
}

// pf[0..npf): bits to fetch into L2 meanwhile (the next item's planes), as many bytes as w's
template <int BITS, int NP>
__attribute__((target("avx512f,avx512bw,avx2,fma"))) void lut_planes_avx512(const uint8_t* const* w,
                                                                           const uint8_t* const* pf, int npf,
                                                                           const uint8_t* hi2, const uint8_t* lo2,
                                                                           const float* scales, int64_t G, float* out) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i odd = _mm512_set1_epi16(0x0100);  // byte pairs (0, 1): the odd byte, widened
  __m256 f[NP][8];
  for (int p = 0; p < NP; ++p)
    for (int i = 0; i < 8; ++i) f[p][i] = _mm256_setzero_ps();
  for (int64_t b0 = 0; b0 < G; b0 += kBlock) {
    const int64_t b1 = std::min(G, b0 + kBlock);
    __m512i a[NP][4], u[NP][4];
    for (int p = 0; p < NP; ++p)
      for (int i = 0; i < 4; ++i) a[p][i] = u[p][i] = _mm512_setzero_si512();
    for (int64_t j = b0; j < b1; j += 2) {
      const __m512i t = _mm512_loadu_si512(reinterpret_cast<const void*>(hi2 + 32 * j));
      __m512i tu = t;
      if (BITS == 16) tu = _mm512_loadu_si512(reinterpret_cast<const void*>(lo2 + 32 * j));
      for (int q = 0; q < npf; ++q) _mm_prefetch(reinterpret_cast<const char*>(pf[q] + 32 * j), _MM_HINT_T1);
      for (int p = 0; p < NP; ++p) {
        _mm_prefetch(reinterpret_cast<const char*>(w[p] + 32 * j + kPrefetch), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(w[p] + 32 * j));
        const __m512i il = _mm512_and_si512(v, m4);
        const __m512i ih = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
        const __m512i rl = _mm512_shuffle_epi8(t, il);
        const __m512i rh = _mm512_shuffle_epi8(t, ih);
        a[p][0] = _mm512_add_epi16(a[p][0], rl);
        a[p][1] = _mm512_add_epi16(a[p][1], _mm512_maddubs_epi16(rl, odd));
        a[p][2] = _mm512_add_epi16(a[p][2], rh);
        a[p][3] = _mm512_add_epi16(a[p][3], _mm512_maddubs_epi16(rh, odd));
        if (BITS == 16) {
          const __m512i ul = _mm512_shuffle_epi8(tu, il);
          const __m512i uh = _mm512_shuffle_epi8(tu, ih);
          u[p][0] = _mm512_add_epi16(u[p][0], ul);
          u[p][1] = _mm512_add_epi16(u[p][1], _mm512_maddubs_epi16(ul, odd));
          u[p][2] = _mm512_add_epi16(u[p][2], uh);
          u[p][3] = _mm512_add_epi16(u[p][3], _mm512_maddubs_epi16(uh, odd));
        }
      }
    }
    const __m256i bias = _mm256_set1_epi16(static_cast<int16_t>(128 * (b1 - b0))), none = _mm256_setzero_si256();
    for (int p = 0; p < NP; ++p) {
      __m256i e[4], d[4] = {none, none, none, none};
      unbias(fold16(a[p][0]), fold16(a[p][1]), bias, &e[0], &e[1]);
      unbias(fold16(a[p][2]), fold16(a[p][3]), bias, &e[2], &e[3]);
      if (BITS == 16) {
        unbias(fold16(u[p][0]), fold16(u[p][1]), none, &d[0], &d[1]);
        unbias(fold16(u[p][2]), fold16(u[p][3]), none, &d[2], &d[3]);
      }
      block_end<BITS>(e[0], e[1], e[2], e[3], d[0], d[1], d[2], d[3], scales[b0 / kBlock], f[p]);
    }
  }
  for (int p = 0; p < NP; ++p) store_rows(f[p], out + kRows * p);
}

// lut_planes_avx512 for np (1..4) planes
template <int BITS>
void lut_planes(int np, const uint8_t* const* w, const uint8_t* const* pf, int npf, const uint8_t* hi, const uint8_t* lo,
                const float* scales, int64_t G, float* out) {
  switch (np) {
    case 1: lut_planes_avx512<BITS, 1>(w, pf, npf, hi, lo, scales, G, out); break;
    case 2: lut_planes_avx512<BITS, 2>(w, pf, npf, hi, lo, scales, G, out); break;
    case 3: lut_planes_avx512<BITS, 3>(w, pf, npf, hi, lo, scales, G, out); break;
    default: lut_planes_avx512<BITS, 4>(w, pf, npf, hi, lo, scales, G, out); break;
  }
}

// y[0..63] += (alpha * scales[r]) * acc[r] for a full 64-row block of fp32 outputs.
__attribute__((target("avx2,fma"))) inline void emit_rows_avx2(float* y, float alpha, const float* scales,
                                                               const float* acc) {
  const __m256 a = _mm256_set1_ps(alpha);
  for (int r = 0; r < kRows; r += 8) {
    const __m256 factor = _mm256_mul_ps(a, _mm256_loadu_ps(scales + r));
    // (alpha * scale) * acc + y: the scalar emit's rounding (one product, then the add), no FMA
    const __m256 d = _mm256_mul_ps(factor, _mm256_loadu_ps(acc + r));
    _mm256_storeu_ps(y + r, _mm256_add_ps(_mm256_loadu_ps(y + r), d));
  }
}

using deltaserve::emit;

// One layer's signs in the LUT layout and the segments that read them; jobs of the same `part`
// add into the same columns of y (the planes of one multi-bit matrix), other parts into others.
struct Job {
  const uint8_t* lut;
  int64_t NB, N, col, part;
  std::vector<Seg> dec, pre;
};

template <typename T, int BITS>
void run_decode(int isa, bool fuse_planes, const std::vector<Job>& jobs, const float* xpad, int64_t T_, int64_t Kp,
                int64_t G, T* y, int64_t ys) {
  // tables of every token of a decode segment, built once for all jobs, by the thread that
  // first needs them (one parallel region a call: on a 2-vCPU VM each region costs ~5 us, as
  // much as a K = 576 row block's lookups for 10 tokens)
  std::vector<int64_t> row_of(T_, -1), tok;
  for (const Job& j : jobs)
    for (const Seg& s : j.dec)
      for (int64_t t = s.start; t < s.start + s.length; ++t)
        if (row_of[t] < 0) {
          row_of[t] = static_cast<int64_t>(tok.size());
          tok.push_back(t);
        }
  if (tok.empty()) return;
  const int64_t ntok = static_cast<int64_t>(tok.size());
  const int64_t nblk = (G + kBlock - 1) / kBlock;
  // with AVX-512 the lookups read the placed tables (twice the bytes, see place_tables_avx512);
  // the others read hi/lo as built. Uninitialised: every token's are written before they are read.
  const int64_t placed = isa >= 2 ? G * 32 : 0;
  std::unique_ptr<int8_t[]> his(new int8_t[ntok * G * 16]);
  std::unique_ptr<uint8_t[]> los(new uint8_t[BITS == 16 ? ntok * G * 16 : 1]);
  std::unique_ptr<uint8_t[]> his2(new uint8_t[placed ? ntok * placed : 1]);
  std::unique_ptr<uint8_t[]> los2(new uint8_t[placed && BITS == 16 ? ntok * placed : 1]);
  std::unique_ptr<float[]> scales(new float[ntok * nblk]);
  std::unique_ptr<std::atomic<int>[]> state(new std::atomic<int>[ntok]);  // 0 none, 1 building, 2 built
  for (int64_t i = 0; i < ntok; ++i) state[i].store(0, std::memory_order_relaxed);
  const auto tables = [&](int64_t i) {  // token i's tables, built now if no thread has yet
    int none = 0;
    if (state[i].compare_exchange_strong(none, 1, std::memory_order_acq_rel)) {
      int8_t* hi = his.get() + i * G * 16;
      uint8_t* lo = BITS == 16 ? los.get() + i * G * 16 : nullptr;
      if (isa >= 1) {
        build_tables_avx2<BITS>(xpad + tok[i] * Kp, G, hi, lo, scales.get() + i * nblk);
      } else {
        build_tables<BITS>(xpad + tok[i] * Kp, G, hi, lo, scales.get() + i * nblk);
      }
      if (placed) place_tables_avx512<BITS>(hi, lo, G, his2.get() + i * placed, los2.get() + i * placed);
      state[i].store(2, std::memory_order_release);
    } else {
      while (state[i].load(std::memory_order_acquire) != 2) _mm_pause();  // another thread builds them
    }
  };
  // work items (job, segment, row block); the jobs of one part that cover the same tokens (its
  // planes) go into one item, run one after the other, so no two threads add into the same y.
  // Ordered by token, so a thread's share of the items needs the tables of its share of tokens.
  struct Item {
    int64_t first_job, seg, rb, start;
  };
  std::vector<Item> items;
  int64_t item_bytes = 0;  // bits read by all items
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (j > 0 && jobs[j].part == jobs[j - 1].part) continue;  // planes after the part's first job
    for (size_t g = 0; g < jobs[j].dec.size(); ++g)
      for (int64_t rb = 0; rb < jobs[j].NB; ++rb) {
        items.push_back({static_cast<int64_t>(j), static_cast<int64_t>(g), rb, jobs[j].dec[g].start});
        item_bytes += G * 32 * jobs[j].dec[g].length;
      }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.start < b.start; });
  // a second thread only for calls with at least kMinParallelBytes a thread
  const int64_t grain = std::max<int64_t>(
      1, static_cast<int64_t>(items.size()) * kMinParallelBytes / std::max<int64_t>(1, item_bytes));
  // with AVX-512 the planes of a part over the same tokens are looked up together: up to 4 a pass
  // with 8-bit tables, 2 with 16-bit ones (their accumulators must stay in the 32 registers)
  const size_t max_fused = isa >= 2 && fuse_planes ? (BITS == 8 ? 4 : 2) : 1;
  using Planes = std::vector<std::pair<const Job*, const Seg*>>;
  const auto planes_of = [&](const Item& item, Planes& planes) {
    const Seg& lead = jobs[item.first_job].dec[item.seg];
    planes.clear();
    for (size_t j = item.first_job; j < jobs.size() && jobs[j].part == jobs[item.first_job].part; ++j) {
      // this plane's segment over the same tokens (planes list a subset of the first job's segments)
      const Seg* sg = nullptr;
      for (const Seg& s : jobs[j].dec)
        if (s.start == lead.start) sg = &s;
      if (sg != nullptr) planes.push_back({&jobs[j], sg});
    }
  };
  const auto bits_of = [&](const Item& item, const std::pair<const Job*, const Seg*>& plane) {
    return plane.first->lut + (plane.second->slot * plane.first->NB + item.rb) * G * 32;
  };
  at::parallel_for(0, static_cast<int64_t>(items.size()), grain, [&](int64_t begin, int64_t end) {
    float acc[4 * kRows];
    Planes planes, next;
    if (begin < end) planes_of(items[begin], next);
    for (int64_t it = begin; it < end; ++it) {
      const Item& item = items[it];
      std::swap(planes, next);
      // the next item's bits (up to 4 planes) are fetched into L2 during this item's first pass:
      // items are a few KiB of a tenant's matrix, too short for the hardware prefetcher to ramp
      // up on each (0.91-0.96 of the time on SmolLM2's shapes streamed from DRAM)
      const uint8_t* pf[4];
      int npf = 0;
      if (it + 1 < end) {
        planes_of(items[it + 1], next);
        for (size_t k = 0; k < next.size() && npf < 4; ++k) pf[npf++] = bits_of(items[it + 1], next[k]);
      }
      for (size_t p0 = 0; p0 < planes.size();) {
        size_t p1 = p0 + 1;  // planes [p0, p1) in one pass: same tokens
        while (p1 < planes.size() && p1 - p0 < max_fused && planes[p1].second->length == planes[p0].second->length)
          ++p1;
        const int np = static_cast<int>(p1 - p0);
        const uint8_t* ws[4];
        for (int k = 0; k < np; ++k) ws[k] = bits_of(item, planes[p0 + k]);
        const Seg& s0 = *planes[p0].second;
        for (int64_t t = s0.start; t < s0.start + s0.length; ++t) {
          const int64_t i = row_of[t];
          tables(i);
          const int8_t* hi = his.get() + i * G * 16;
          const uint8_t* lo = BITS == 16 ? los.get() + i * G * 16 : nullptr;
          const float* sc = scales.get() + i * nblk;
          if (isa >= 2) {
            const int n_pf = p0 == 0 && t == s0.start ? npf : 0;
            lut_planes<BITS>(np, ws, pf, n_pf, his2.get() + i * placed, los2.get() + i * placed, sc, G, acc);
          } else if (isa == 1) {
            lut_block_avx2<BITS>(ws[0], hi, lo, sc, G, acc);
          } else {
            lut_block_scalar<BITS>(ws[0], hi, lo, sc, G, acc);
          }
          // each plane's terms into y in plane order, as a pass per plane would add them
          for (int k = 0; k < np; ++k) {
            const Job& job = *planes[p0 + k].first;
            const Seg& sg = *planes[p0 + k].second;
            const int64_t rows = std::min(kRows, job.N - item.rb * kRows);
            T* yr = y + t * ys + job.col + item.rb * kRows;
            const float* sr = sg.scales + item.rb * kRows;
            const float* ak = acc + k * kRows;
            if (std::is_same<T, float>::value && isa >= 1 && rows == kRows) {
              emit_rows_avx2(reinterpret_cast<float*>(yr), sg.alpha, sr, ak);
            } else {
              for (int64_t r = 0; r < rows; ++r) emit<T>(yr + r, sg.alpha * sr[r], ak[r]);
            }
          }
        }
        p0 = p1;
      }
    }
  });
}

// +-1 fp32 rows [64, 4 G] of one row block.
void unpack_block(const uint8_t* w, int64_t G, float* out) {
  static const float kSigns[16][4] = {
      {-1, -1, -1, -1}, {1, -1, -1, -1}, {-1, 1, -1, -1}, {1, 1, -1, -1},
      {-1, -1, 1, -1},  {1, -1, 1, -1},  {-1, 1, 1, -1},  {1, 1, 1, -1},
      {-1, -1, -1, 1},  {1, -1, -1, 1},  {-1, 1, -1, 1},  {1, 1, -1, 1},
      {-1, -1, 1, 1},   {1, -1, 1, 1},   {-1, 1, 1, 1},   {1, 1, 1, 1}};
  const int64_t Kp = 4 * G;
  for (int64_t j = 0; j < G; ++j) {
    const uint8_t* wj = w + 32 * j;
    for (int b = 0; b < 32; ++b) {
      std::memcpy(out + b * Kp + 4 * j, kSigns[wj[b] & 15], 16);
      std::memcpy(out + (32 + b) * Kp + 4 * j, kSigns[wj[b] >> 4], 16);
    }
  }
}

// A prefill segment of one part: its planes' +-1 blocks, each row times its factor (alpha * the
// row's scale), summed into one fp32 tile (the delta's rows), then one BLAS product per 64-row
// block for all planes. A single plane is multiplied unscaled and scaled per row at the emit.
template <typename T>
void run_prefill(const std::vector<std::pair<const Job*, const Seg*>>& planes, const at::Tensor& xpad, int64_t G,
                 T* y, int64_t ys) {
  const Job& lead = *planes[0].first;
  const Seg& sg = *planes[0].second;
  const int64_t Kp = 4 * G, NB = lead.NB, N = lead.N;
  const at::Tensor xs = xpad.narrow(0, sg.start, sg.length);
  at::parallel_for(0, NB, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({kRows, Kp}, xpad.options());
    at::Tensor part = planes.size() > 1 ? at::empty({kRows, Kp}, xpad.options()) : tile;
    at::Tensor out = at::empty({sg.length, kRows}, xpad.options());
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t rows = std::min(kRows, N - rb * kRows);
      float factor[kRows];  // per row: alpha * scale, or 1 once the planes are summed scaled
      for (int64_t r = 0; r < rows; ++r) factor[r] = sg.alpha * sg.scales[rb * kRows + r];
      unpack_block(lead.lut + (sg.slot * NB + rb) * G * 32, G, tile.data_ptr<float>());
      if (planes.size() > 1) {
        float* tp = tile.data_ptr<float>();
        const float* pp = part.data_ptr<float>();
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < Kp; ++c) tp[r * Kp + c] *= factor[r];
          factor[r] = 1.f;
        }
        for (size_t p = 1; p < planes.size(); ++p) {
          const Job& job = *planes[p].first;
          const Seg& ps = *planes[p].second;
          unpack_block(job.lut + (ps.slot * NB + rb) * G * 32, G, part.data_ptr<float>());
          for (int64_t r = 0; r < rows; ++r) {
            const float f = ps.alpha * ps.scales[rb * kRows + r];
            for (int64_t c = 0; c < Kp; ++c) tp[r * Kp + c] += f * pp[r * Kp + c];
          }
        }
      }
      at::mm_out(out, xs, tile.t());
      const float* op = out.data_ptr<float>();
      for (int64_t t = 0; t < sg.length; ++t)
        for (int64_t r = 0; r < rows; ++r)
          emit<T>(y + (sg.start + t) * ys + lead.col + rb * kRows + r, factor[r], op[t * kRows + r]);
    }
  });
}

template <typename T>
void dispatch(int isa, bool fuse_planes, int64_t bits, const std::vector<Job>& jobs, const at::Tensor& xpad,
              int64_t G, at::Tensor& y) {
  T* yp = y.data_ptr<T>();
  const int64_t ys = y.stride(0);
  const float* xp = xpad.data_ptr<float>();
  if (bits == 8) run_decode<T, 8>(isa, fuse_planes, jobs, xp, xpad.size(0), xpad.size(1), G, yp, ys);
  if (bits == 16) run_decode<T, 16>(isa, fuse_planes, jobs, xp, xpad.size(0), xpad.size(1), G, yp, ys);
  for (size_t j = 0; j < jobs.size(); ++j) {
    if (j > 0 && jobs[j].part == jobs[j - 1].part) continue;  // planes go with their part's first job
    for (const Seg& s : jobs[j].pre) {
      std::vector<std::pair<const Job*, const Seg*>> planes;
      for (size_t q = j; q < jobs.size() && jobs[q].part == jobs[j].part; ++q)
        for (const Seg& t : jobs[q].pre)
          if (t.start == s.start) planes.push_back({&jobs[q], &t});
      run_prefill<T>(planes, xpad, G, yp, ys);
    }
  }
}

}  // namespace

// In place: y [T, sum of the parts' N] (fp32/bf16/fp16, unit column stride) += the deltas of
// every job: job j reads luts[j] (uint8 [S, NB, G, 32], one layer's signs in the LUT layout)
// with scales[j] fp32 [S, N_j] (a scale per output row) and adds into columns [cols[j], cols[j] + N_j) of y for its segments
// starts/lengths/slots/alphas[seg_begin[j] : seg_end[j]] (jobs may share a range: the parts of
// a fused projection read the same segments). Consecutive jobs with the
// same parts[j] are planes of one matrix (same columns; their segments must be a subset of the
// first such job's). All jobs share x, so each decode token's tables are built once. With
// fuse_planes and AVX-512 the planes of a part are looked up in shared passes (same outputs bit
// for bit as one pass a plane).
void sign_lut_matmul_jobs(const at::Tensor& x, at::Tensor& y, const std::vector<at::Tensor>& luts,
                          const std::vector<at::Tensor>& scales, const std::vector<int64_t>& cols,
                          const std::vector<int64_t>& ns, const std::vector<int64_t>& parts,
                          const std::vector<int64_t>& seg_begin, const std::vector<int64_t>& seg_end,
                          const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                          const std::vector<int64_t>& slots, const std::vector<double>& alphas,
                          int64_t gemm_min_tokens, int64_t isa_cap, int64_t table_bits, int64_t fuse_planes) {
  TORCH_CHECK(table_bits == 8 || table_bits == 16, "table_bits must be 8 or 16");
  TORCH_CHECK(x.device().is_cpu() && y.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && y.size(0) == x.size(0) && y.stride(1) == 1,
              "x [T,K] and y [T,N] with unit column stride expected");
  const size_t J = luts.size();
  TORCH_CHECK(scales.size() == J && cols.size() == J && ns.size() == J && parts.size() == J && seg_begin.size() == J &&
                  seg_end.size() == J,
              "one lut, scales, column, N, part and segment range per job");
  TORCH_CHECK(starts.size() == lengths.size() && lengths.size() == slots.size() && slots.size() == alphas.size(),
              "segment arrays must have equal lengths");
  if (J == 0) return;
  const int64_t K = x.size(1), G = luts[0].size(2), Kp = 4 * G;
  TORCH_CHECK(G % 8 == 0 && K <= Kp && K > Kp - 32, "K does not match the layout's groups");
  std::vector<Job> jobs;
  std::vector<at::Tensor> keep;  // fp32 scales alive while the jobs run
  for (size_t j = 0; j < J; ++j) {
    const at::Tensor& lut = luts[j];
    TORCH_CHECK(lut.device().is_cpu() && lut.dim() == 4 && lut.scalar_type() == at::kByte && lut.is_contiguous() &&
                    lut.size(3) == 32 && lut.size(2) == G,
                "every lut must be contiguous uint8 [S, NB, G, 32] with the same G");
    TORCH_CHECK(lut.size(1) == (ns[j] + kRows - 1) / kRows && cols[j] >= 0 && cols[j] + ns[j] <= y.size(1),
                "a job's N and columns do not match its lut and y");
    TORCH_CHECK(j == 0 || parts[j] != parts[j - 1] || (cols[j] == cols[j - 1] && ns[j] == ns[j - 1]),
                "planes of one part must share its columns");
    TORCH_CHECK(scales[j].dim() == 2 && scales[j].size(0) == lut.size(0) && scales[j].size(1) == ns[j],
                "a job's scales must be [S, N]");
    keep.push_back(scales[j].to(at::kFloat).contiguous());
    const float* sc = keep.back().data_ptr<float>();
    Job job{lut.data_ptr<uint8_t>(), lut.size(1), ns[j], cols[j], parts[j], {}, {}};
    TORCH_CHECK(seg_begin[j] >= 0 && seg_begin[j] <= seg_end[j] && seg_end[j] <= static_cast<int64_t>(starts.size()),
                "a job's segment range is out of bounds");
    for (int64_t g = seg_begin[j]; g < seg_end[j]; ++g) {
      if (lengths[g] <= 0) continue;
      TORCH_CHECK(starts[g] >= 0 && starts[g] + lengths[g] <= x.size(0), "segment out of range");
      TORCH_CHECK(slots[g] >= 0 && slots[g] < lut.size(0), "slot out of range");
      Seg s{starts[g], lengths[g], slots[g], static_cast<float>(alphas[g]), sc + slots[g] * ns[j]};
      (lengths[g] >= gemm_min_tokens ? job.pre : job.dec).push_back(s);
    }
    jobs.push_back(std::move(job));
  }
  at::Tensor xpad;
  if (K == Kp && x.scalar_type() == at::kFloat && x.is_contiguous()) {
    xpad = x;
  } else {
    xpad = at::zeros({x.size(0), Kp}, x.options().dtype(at::kFloat));
    xpad.narrow(1, 0, K).copy_(x);
  }
  __builtin_cpu_init();
  // 0 scalar, 1 AVX2, 2 AVX-512BW lookups (tables and emit stay AVX2), capped by isa_cap
  int isa = isa_cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
  if (isa == 1 && isa_cap >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) isa = 2;
  switch (y.scalar_type()) {
    case at::kFloat: dispatch<float>(isa, fuse_planes != 0, table_bits, jobs, xpad, G, y); break;
    case at::kBFloat16: dispatch<at::BFloat16>(isa, fuse_planes != 0, table_bits, jobs, xpad, G, y); break;
    case at::kHalf: dispatch<at::Half>(isa, fuse_planes != 0, table_bits, jobs, xpad, G, y); break;
    default: TORCH_CHECK(false, "y must be fp32, bf16 or fp16");
  }
}

// In place: y [T, N] (fp32/bf16/fp16, unit column stride) += per-segment deltas from `lut`.
void sign_lut_matmul(const at::Tensor& x, at::Tensor& y, const at::Tensor& lut, const at::Tensor& scales,
                     const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths,
                     const std::vector<int64_t>& slots, const std::vector<double>& alphas,
                     int64_t gemm_min_tokens, int64_t isa_cap, int64_t table_bits) {
  TORCH_CHECK(lut.dim() == 4, "lut must be uint8 [S, NB, G, 32]");
  TORCH_CHECK(y.dim() == 2 && lut.size(1) == (y.size(1) + kRows - 1) / kRows, "N does not match the layout's row blocks");
  sign_lut_matmul_jobs(x, y, {lut}, {scales}, {0}, {y.size(1)}, {0}, {0}, {static_cast<int64_t>(starts.size())}, starts,
                       lengths, slots, alphas, gemm_min_tokens, isa_cap, table_bits, 1);
}
