// Block codecs of pureopt.kernels.encoding in one pass over a chunk (see pureopt/kernels/native.py).
//
// One entry point, `kernel`, for every codec (the Python binding that builds it takes one function):
//
//   op 0  decode, 8-bit codes: out[k] = table[codes[lo + k]] * scale[(lo + k) / block]        (fp8: table = the
//         256 values of the format)
//   op 1  encode, 8-bit codes: per block starting at lo + k: s = max |x| / top (NaN if any x is NaN),
//         scale[b] = s; v = x / (s > 0 ? s : 1); codes = lookup[key(v)] + (v > mids[lookup[key(v)]]),
//         key(v) = (bits of v >> shift) & (2**(32 - shift) - 1): the nearest code value, ties to the lower one
//   op 2  decode, 4-bit codes (two per byte, element 2i in the low nibble): table = the 16 values
//   op 3  encode, 4-bit codes (an odd count leaves the last byte's high nibble 0)
//   op 4  round x stochastically to bfloat16 into `codes` (as uint16): the random bits of element k are
//         fmix32(fmix32((lo + k) ^ seed) ^ mixed) (pureopt.kernels.rounding.random_bits; seed in `block`, mixed in
//         `shift`, places mod 2**32) and the rounding that of pureopt.kernels.rounding.stochastic_round
//   op 5  encode, fp8: per block as op 1, then v clamped to [low, top] (low: *t1) and cast to float8 with `shift`
//         mantissa bits (3: e4m3fn, 2: e5m2), to nearest, ties to even
//   op 6  decode, fp8 (e4m3fn: shift = 3, e5m2: shift = 2): the format's value times the block's scale, as op 0 with
//         the cast's table
//   op | 16: the portable loop instead of the AVX2 one (a CPU without AVX2, or ATEN_CPU_CAPABILITY=default)
//
// Each element goes through the same IEEE operations as the torch-op codecs (a product, a quotient, a maximum,
// a comparison), so both write the same bits on every CPU.
// (exact IEEE semantics whatever flags the toolchain passes: no fast-math rewrites, no contraction into FMAs)
#if defined(__clang__)
#pragma float_control(precise, on)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("no-fast-math", "no-unsafe-math-optimizations", "signed-zeros", "fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PUREOPT_X86 1
#endif

namespace {

inline uint32_t float_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

// the block's scale (absmax / top, NaN if an element is NaN) and the divisor its elements are normalised by
inline float block_scale_scalar(const float* x, int64_t n, float top) {
  float m = 0.0f;
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    nan = nan || std::isnan(a);
    m = a > m ? a : m;
  }
  return nan ? NAN : m / top;
}

inline uint8_t nearest(float v, const uint8_t* lookup, const float* mids, int shift, uint32_t mask) {
  const uint32_t below = lookup[(float_bits(v) >> shift) & mask];
  return static_cast<uint8_t>(below + (v > mids[below] ? 1 : 0));
}

// murmur3's 32-bit finaliser and the random bits of pureopt.kernels.rounding.random_bits for element place j
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

// x rounded stochastically to bfloat16 (its bit pattern) with the random bits r: pureopt.kernels.rounding's rule;
// NaN becomes torch's bfloat16 NaN 0x7FC0
inline uint16_t round_bf16(float x, uint32_t r) {
  const uint32_t p = float_bits(x);
  if ((p & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>(((r & 0xFFFFu) + p) >> 16);
}

void stochastic_bf16_scalar(const float* x, uint16_t* out, int64_t n, uint32_t first, uint32_t seed, uint32_t mixed) {
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t r = fmix32(fmix32((first + static_cast<uint32_t>(k)) ^ seed) ^ mixed);
    out[k] = round_bf16(x[k], r);
  }
}

// out[k] = value(lo + k) * the scale of element lo + k's block, a block at a time
template <typename Value>
void decode_scalar(const float* scale, float* out, int64_t lo, int64_t n, int64_t block, Value value) {
  for (int64_t k = 0; k < n;) {
    const int64_t b = (lo + k) / block;
    const int64_t end = std::min(n, (b + 1) * block - lo);
    const float s = scale[b];
    for (; k < end; ++k) out[k] = value(lo + k) * s;
  }
}

void decode8_scalar(const uint8_t* codes, const float* scale, const float* table, float* out, int64_t lo, int64_t n,
                    int64_t block) {
  decode_scalar(scale, out, lo, n, block, [=](int64_t j) { return table[codes[j]]; });
}

// the float32 value of the float8 pattern b (`mbits` mantissa bits, exponent bias `bias`; e5m2 keeps infinities),
// as torch's cast gives it: normal values rebiased, subnormals m * 2**(1 - bias - mbits), NaN for NaN patterns
inline float from_float8(uint8_t b, int mbits, int bias) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80) << 24;
  const uint32_t e = (b & 0x7F) >> mbits, m = b & ((1u << mbits) - 1);
  const uint32_t top = (1u << (7 - mbits)) - 1;  // (the largest exponent field)
  uint32_t bits;
  if (mbits == 3 && (b & 0x7F) == 0x7F) {
    bits = 0x7FC00000u;  // (e4m3fn: NaN)
  } else if (mbits == 2 && e == top) {
    bits = m ? 0x7FC00000u : 0x7F800000u;  // (e5m2: NaN or infinity)
  } else if (e == 0) {
    return (sign ? -1.0f : 1.0f) * (static_cast<float>(m) * std::ldexp(1.0f, 1 - bias - mbits));
  } else {
    bits = ((e + 127 - bias) << 23) | (m << (23 - mbits));
  }
  bits |= sign;
  float v;
  std::memcpy(&v, &bits, 4);
  return v;
}

void decode_fp8_scalar(const uint8_t* codes, const float* scale, float* out, int64_t lo, int64_t n, int64_t block,
                       int mbits) {
  const int bias = mbits == 3 ? 7 : 15;
  decode_scalar(scale, out, lo, n, block, [=](int64_t j) { return from_float8(codes[j], mbits, bias); });
}

void decode4_scalar(const uint8_t* codes, const float* scale, const float* table, float* out, int64_t lo, int64_t n,
                    int64_t block) {
  decode_scalar(scale, out, lo, n, block, [=](int64_t j) {
    const uint8_t byte = codes[j >> 1];
    return table[(j & 1) ? (byte >> 4) : (byte & 15)];
  });
}

// encode one block of n elements at element `at` (a block start) into `idx` (one index per element)
void encode_block_scalar(const float* x, int64_t n, float top, float* scale_out, uint8_t* idx, const uint8_t* lookup,
                         const float* mids, int shift) {
  const uint32_t mask = (uint32_t(1) << (32 - shift)) - 1;
  const float s = block_scale_scalar(x, n, top);
  *scale_out = s;
  const float safe = s > 0.0f ? s : 1.0f;
  for (int64_t i = 0; i < n; ++i) idx[i] = nearest(x[i] / safe, lookup, mids, shift, mask);
}

// v (finite, within the format's range, or NaN) as a float8 bit pattern with `mbits` mantissa bits and exponent bias
// `bias` (e4m3fn: 3, 7; e5m2: 2, 15), rounded to nearest, ties to even, as torch's cast rounds; NaN -> 0x7F | sign
inline uint8_t to_float8(float v, int mbits, int bias, float min_normal, float per_unit) {
  const uint32_t bits = float_bits(v);
  const auto sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  const uint32_t mag = bits & 0x7FFFFFFFu;
  if (mag > 0x7F800000u) return sign | 0x7F;
  const float a = std::fabs(v);
  if (a < min_normal) {  // subnormal (or the smallest normal, reached by rounding up): units of the least step
    return sign | static_cast<uint8_t>(std::nearbyint(a * per_unit));  // (an exact product: a power of two)
  }
  const int drop = 23 - mbits;  // round the float32 mantissa to mbits bits (a carry moves into the exponent)
  uint32_t r = mag + ((1u << (drop - 1)) - 1) + ((mag >> drop) & 1);
  r >>= drop;
  r -= static_cast<uint32_t>(127 - bias) << mbits;  // rebias the exponent
  return sign | static_cast<uint8_t>(r);
}

using BlockScale = float (*)(const float*, int64_t, float);

// one fp8 block: scale, v = x / scale clamped to [low, top] (NaN stays NaN), the float8 pattern of v; `vector`
// (the AVX2 loop, or null) encodes the first elements 8 at a time and returns how many
using Fp8Vector = int64_t (*)(const float*, int64_t, float, float, float, int, int, float, float, uint8_t*);

void encode_fp8_block(const float* x, int64_t n, float top, float* scale_out, uint8_t* out, float low, int mbits,
                      BlockScale block_scale, Fp8Vector vector) {
  const int bias = mbits == 3 ? 7 : 15;
  const float min_normal = std::ldexp(1.0f, 1 - bias), per_unit = std::ldexp(1.0f, bias - 1 + mbits);
  const float s = block_scale(x, n, top);
  *scale_out = s;
  const float safe = s > 0.0f ? s : 1.0f;
  const int64_t done = vector ? vector(x, n, safe, low, top, mbits, bias, min_normal, per_unit, out) : 0;
  for (int64_t i = done; i < n; ++i) {
    float v = x[i] / safe;
    v = v < low ? low : v;
    v = v > top ? top : v;
    out[i] = to_float8(v, mbits, bias, min_normal, per_unit);
  }
}

#ifdef PUREOPT_X86

__attribute__((target("avx2"))) float block_scale_avx2(const float* x, int64_t n, float top) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  __m256 vnan = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_and_ps(_mm256_loadu_ps(x + i), absmask);
    vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
    vmax = _mm256_max_ps(vmax, a);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float m = 0.0f;
  bool nan = _mm256_movemask_ps(vnan) != 0;
  for (float lane : lanes) m = lane > m ? lane : m;
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    nan = nan || std::isnan(a);
    m = a > m ? a : m;
  }
  return nan ? NAN : m / top;
}

// out[k] = value of element lo + k times its block's scale, a block at a time: `lanes(j)` gives elements j..j+7,
// `one(j)` element j (a block's last elements)
template <typename Lanes, typename One>
__attribute__((target("avx2"))) void decode_blocks_avx2(const float* scale, float* out, int64_t lo, int64_t n,
                                                        int64_t block, const Lanes& lanes, const One& one) {
  int64_t k = 0;
  while (k < n) {
    const int64_t b = (lo + k) / block;
    const int64_t end = std::min(n, (b + 1) * block - lo);
    const float s = scale[b];
    const __m256 vs = _mm256_set1_ps(s);
    for (; k + 8 <= end; k += 8) _mm256_storeu_ps(out + k, _mm256_mul_ps(lanes(lo + k), vs));
    for (; k < end; ++k) out[k] = one(lo + k) * s;
  }
}

// 8-bit codes: eight scalar reads of the code table (an AVX2 gather was ~1.8x slower on AMD EPYC)
struct Table8 {
  const uint8_t* codes;
  const float* table;
  __attribute__((target("avx2"))) __m256 operator()(int64_t j) const {
    const uint8_t* c = codes + j;
    return _mm256_setr_ps(table[c[0]], table[c[1]], table[c[2]], table[c[3]], table[c[4]], table[c[5]], table[c[6]],
                          table[c[7]]);
  }
};

// fp8 codes: from_float8 on 8 lanes (integer steps; subnormals by an exact int -> float conversion and product)
struct Float8Lanes {
  const uint8_t* codes;
  int mbits;
  __m128i vm, vshift;
  __m256i low7, mmask, top, rebias, nan, inf, zero;
  __m256 unit;
  __attribute__((target("avx2"))) Float8Lanes(const uint8_t* codes_, int mbits_) : codes(codes_), mbits(mbits_) {
    const int bias = mbits == 3 ? 7 : 15;
    vm = _mm_cvtsi32_si128(mbits), vshift = _mm_cvtsi32_si128(23 - mbits);
    low7 = _mm256_set1_epi32(0x7F), mmask = _mm256_set1_epi32((1 << mbits) - 1);
    top = _mm256_set1_epi32((1 << (7 - mbits)) - 1), rebias = _mm256_set1_epi32(127 - bias);
    nan = _mm256_set1_epi32(0x7FC00000), inf = _mm256_set1_epi32(0x7F800000), zero = _mm256_setzero_si256();
    unit = _mm256_set1_ps(std::ldexp(1.0f, 1 - bias - mbits));
  }
  __attribute__((target("avx2"))) __m256 operator()(int64_t j) const {
    const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + j)));
    const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(c, 7), 31);
    const __m256i mag = _mm256_and_si256(c, low7);
    const __m256i e = _mm256_srl_epi32(mag, vm), m = _mm256_and_si256(mag, mmask);
    __m256i bits = _mm256_or_si256(_mm256_slli_epi32(_mm256_add_epi32(e, rebias), 23), _mm256_sll_epi32(m, vshift));
    const __m256i sub = _mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(m), unit));  // (exact)
    bits = _mm256_blendv_epi8(bits, sub, _mm256_cmpeq_epi32(e, zero));
    if (mbits == 3) {
      bits = _mm256_blendv_epi8(bits, nan, _mm256_cmpeq_epi32(mag, low7));
    } else {
      const __m256i special = _mm256_blendv_epi8(inf, nan, _mm256_cmpgt_epi32(m, zero));
      bits = _mm256_blendv_epi8(bits, special, _mm256_cmpeq_epi32(e, top));
    }
    return _mm256_castsi256_ps(_mm256_or_si256(bits, sign));
  }
};

__attribute__((target("avx2"))) void decode8_avx2(const uint8_t* codes, const float* scale, const float* table,
                                                  float* out, int64_t lo, int64_t n, int64_t block) {
  decode_blocks_avx2(scale, out, lo, n, block, Table8{codes, table}, [=](int64_t j) { return table[codes[j]]; });
}

__attribute__((target("avx2"))) void decode_fp8_avx2(const uint8_t* codes, const float* scale, float* out, int64_t lo,
                                                     int64_t n, int64_t block, int mbits) {
  const int bias = mbits == 3 ? 7 : 15;
  decode_blocks_avx2(scale, out, lo, n, block, Float8Lanes(codes, mbits),
                     [=](int64_t j) { return from_float8(codes[j], mbits, bias); });
}

// 4-bit codes: the 16 values sit in two registers; each lane picks its value with a permute (no table reads)
__attribute__((target("avx2"))) void decode4_avx2(const uint8_t* codes, const float* scale, const float* table,
                                                  float* out, int64_t lo, int64_t n, int64_t block) {
  const __m256 low8 = _mm256_loadu_ps(table), high8 = _mm256_loadu_ps(table + 8);
  const __m256i twice = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);  // (byte i feeds elements 2i and 2i + 1)
  const __m256i nibble = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  int64_t k = 0;
  if (lo & 1) {  // (an odd first element: the high nibble of its byte)
    decode4_scalar(codes, scale, table, out, lo, 1, block);
    k = 1;
  }
  while (k < n) {
    const int64_t b = (lo + k) / block;
    const int64_t end = std::min(n, (b + 1) * block - lo);
    const __m256 vs = _mm256_set1_ps(scale[b]);
    for (; k + 8 <= end; k += 8) {  // (lo + k even here)
      int32_t four;
      std::memcpy(&four, codes + ((lo + k) >> 1), 4);
      const __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four)), twice);
      const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(bytes, nibble), _mm256_set1_epi32(15));
      const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // (sign bit: index >= 8)
      const __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low8, idx), _mm256_permutevar8x32_ps(high8, idx),
                                        upper);
      _mm256_storeu_ps(out + k, _mm256_mul_ps(v, vs));
    }
    if (k < end) {
      decode4_scalar(codes, scale, table, out + k, lo + k, end - k, block);
      k = end;
    }
  }
}

// One block, AVX2: the block's scale, the quotients 8 at a time, `indices(v)` (int32 lanes) packed to bytes, the
// tail element by element; a NaN quotient (an infinite or NaN block) takes the bucket table's index, as elsewhere.
template <typename Indices>
__attribute__((target("avx2"))) void encode_block_avx2(const float* x, int64_t n, float top, float* scale_out,
                                                       uint8_t* idx, const uint8_t* lookup, const float* mids,
                                                       int shift, const Indices& indices) {
  const float s = block_scale_avx2(x, n, top);
  *scale_out = s;
  const float safe = s > 0.0f ? s : 1.0f;
  const __m256 vsafe = _mm256_set1_ps(safe);
  const uint32_t mask = (uint32_t(1) << (32 - shift)) - 1;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + i), vsafe);
    const __m256i q = indices(v);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(idx + i), _mm_packus_epi16(w, w));
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) {
      for (int j = 0; j < 8; ++j) idx[i + j] = nearest(x[i + j] / safe, lookup, mids, shift, mask);
    }
  }
  for (; i < n; ++i) idx[i] = nearest(x[i] / safe, lookup, mids, shift, mask);
}

// 16-value codes: the number of the 15 midpoints below v, by 15 comparisons (torch.bucketize's count)
struct Below16 {
  __m256 m[15];
  __attribute__((target("avx2"))) explicit Below16(const float* mids) {
    for (int j = 0; j < 15; ++j) m[j] = _mm256_set1_ps(mids[j]);
  }
  __attribute__((target("avx2"))) __m256i operator()(__m256 v) const {
    __m256i q = _mm256_setzero_si256();  // (v > mid: all ones, i.e. -1, where true: subtracting it adds one)
    for (int j = 0; j < 15; ++j) q = _mm256_sub_epi32(q, _mm256_castps_si256(_mm256_cmp_ps(v, m[j], _CMP_GT_OQ)));
    return q;
  }
};

// 256-value codes: bucket keys and the comparison 8 at a time, the two table reads element by element (AVX2
// gathers from the tables were slower on AMD EPYC)
struct BelowTable {
  const uint8_t* lookup;
  const float* mids;
  __m128i shift;
  __m256i mask;
  __attribute__((target("avx2"))) __m256i operator()(__m256 v) const {
    alignas(32) int32_t key[8];
    alignas(32) int32_t below[8];
    alignas(32) float bound[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(key),
                       _mm256_and_si256(_mm256_srl_epi32(_mm256_castps_si256(v), shift), mask));
    for (int j = 0; j < 8; ++j) below[j] = lookup[key[j]];
    for (int j = 0; j < 8; ++j) bound[j] = mids[below[j]];
    const __m256i up = _mm256_castps_si256(_mm256_cmp_ps(v, _mm256_load_ps(bound), _CMP_GT_OQ));
    return _mm256_sub_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(below)), up);
  }
};

__attribute__((target("avx2"))) void encode_block16_avx2(const float* x, int64_t n, float top, float* scale_out,
                                                         uint8_t* idx, const uint8_t* lookup, const float* mids,
                                                         int shift) {
  encode_block_avx2(x, n, top, scale_out, idx, lookup, mids, shift, Below16(mids));
}

__attribute__((target("avx2"))) void encode_block256_avx2(const float* x, int64_t n, float top, float* scale_out,
                                                          uint8_t* idx, const uint8_t* lookup, const float* mids,
                                                          int shift) {
  const BelowTable below{lookup, mids, _mm_cvtsi32_si128(shift),
                         _mm256_set1_epi32(static_cast<int>((uint32_t(1) << (32 - shift)) - 1))};
  encode_block_avx2(x, n, top, scale_out, idx, lookup, mids, shift, below);
}

// to_float8 on 8 lanes: the same integer and float steps, each lane's case chosen by masks
__attribute__((target("avx2"))) int64_t fp8_avx2(const float* x, int64_t n, float safe, float low, float top,
                                                 int mbits, int bias, float min_normal, float per_unit, uint8_t* out) {
  const __m256 vsafe = _mm256_set1_ps(safe), vlow = _mm256_set1_ps(low), vtop = _mm256_set1_ps(top);
  const __m256 vmin_normal = _mm256_set1_ps(min_normal), vper_unit = _mm256_set1_ps(per_unit);
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
  const int drop = 23 - mbits;
  const __m128i vdrop = _mm_cvtsi32_si128(drop);
  const __m256i half = _mm256_set1_epi32((1 << (drop - 1)) - 1), one = _mm256_set1_epi32(1);
  const __m256i rebias = _mm256_set1_epi32((127 - bias) << mbits), nan8 = _mm256_set1_epi32(0x7F);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    // (max / min return their second operand for a NaN: NaN stays NaN, as in the scalar clamp)
    const __m256 v = _mm256_min_ps(vtop, _mm256_max_ps(vlow, _mm256_div_ps(_mm256_loadu_ps(x + i), vsafe)));
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i mag = _mm256_and_si256(bits, magnitude);
    const __m256i sign = _mm256_and_si256(_mm256_srli_epi32(bits, 24), _mm256_set1_epi32(0x80));
    const __m256 a = _mm256_castsi256_ps(mag);
    const __m256i sub = _mm256_cvtps_epi32(  // (the default rounding: to nearest, ties to even)
        _mm256_round_ps(_mm256_mul_ps(a, vper_unit), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    __m256i r = _mm256_add_epi32(_mm256_add_epi32(mag, half), _mm256_and_si256(_mm256_srl_epi32(mag, vdrop), one));
    r = _mm256_sub_epi32(_mm256_srl_epi32(r, vdrop), rebias);
    r = _mm256_blendv_epi8(r, sub, _mm256_castps_si256(_mm256_cmp_ps(a, vmin_normal, _CMP_LT_OQ)));
    r = _mm256_blendv_epi8(r, nan8, _mm256_cmpgt_epi32(mag, inf));
    const __m256i q = _mm256_or_si256(r, sign);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(w, w));
  }
  return i;
}

__attribute__((target("avx2"))) inline __m256i fmix32_avx2(__m256i h) {
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
}

__attribute__((target("avx2"))) void stochastic_bf16_avx2(const float* x, uint16_t* out, int64_t n, uint32_t first,
                                                          uint32_t seed, uint32_t mixed) {
  const __m256i vseed = _mm256_set1_epi32(static_cast<int>(seed));
  const __m256i vmixed = _mm256_set1_epi32(static_cast<int>(mixed));
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i inf = _mm256_set1_epi32(0x7F800000);
  const __m256i nan16 = _mm256_set1_epi32(0x7FC0);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(first + static_cast<uint32_t>(k))), lanes);
    const __m256i r = fmix32_avx2(_mm256_xor_si256(fmix32_avx2(_mm256_xor_si256(idx, vseed)), vmixed));
    const __m256i p = _mm256_castps_si256(_mm256_loadu_ps(x + k));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(p, magnitude), inf);  // (magnitudes are non-negative)
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_and_si256(r, low16), p), 16);
    const __m256i q = _mm256_blendv_epi8(rounded, nan16, nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
  }
  stochastic_bf16_scalar(x + k, out + k, n - k, first + static_cast<uint32_t>(k), seed, mixed);
}

#endif

using EncodeBlock = void (*)(const float*, int64_t, float, float*, uint8_t*, const uint8_t*, const float*, int);

void encode(const float* x, uint8_t* codes, float* scale, const uint8_t* lookup, const float* mids, int64_t lo,
            int64_t n, int64_t block, float top, int shift, bool four, EncodeBlock encode_block) {
  uint8_t idx[4096];  // (one block's indices at a time: blocks hold at most 4096 elements, see native.py)
  for (int64_t k = 0; k < n; k += block) {
    const int64_t m = std::min(block, n - k);
    encode_block(x + k, m, top, scale + (lo + k) / block, four ? idx : codes + lo + k, lookup, mids, shift);
    if (four) {
      uint8_t* dst = codes + (lo + k) / 2;
      for (int64_t i = 0; i + 1 < m; i += 2) dst[i / 2] = static_cast<uint8_t>(idx[i] | (idx[i + 1] << 4));
      if (m & 1) dst[m / 2] = idx[m - 1];
    }
  }
}

#ifndef PUREOPT_CODECS_ONLY  // (onepass.cpp includes these codecs with its own entry point)

// Runs f(a, m) over [0, n) in segments on torch's intra-op threads (OpenMP: torch.set_num_threads): each segment
// after the first starts at a block start (element lo + a), so that every block is written by one thread and the
// result is the same bits whatever the thread count. Chunks under two grains run on the calling thread.
template <typename F>
void segments(int64_t lo, int64_t n, int64_t block, const F& f) {
#ifdef _OPENMP
  constexpr int64_t grain = int64_t(1) << 15;
  const int64_t threads = omp_in_parallel() ? 1 : std::min<int64_t>(omp_get_max_threads(), n / grain);
  if (threads > 1) {
    const int64_t per = (n + threads - 1) / threads;
    const auto edge = [&](int64_t s) {  // (segment s's first element: the first block start at or after s * per)
      if (s == 0) return int64_t(0);
      const int64_t at = ((lo + s * per + block - 1) / block) * block - lo;
      return std::min(n, at);
    };
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int64_t s = 0; s < threads; ++s) {
      const int64_t a = edge(s), b = edge(s + 1);
      if (b > a) f(a, b - a);
    }
    return;
  }
#endif
  f(0, n);
}

void run(int64_t op, float* x, uint8_t* codes, float* scale, const void* t1, const void* t2, int64_t lo, int64_t n,
         int64_t block, float top, int64_t shift) {
  const bool portable = (op & 16) != 0;
  if ((op & 15) == 5) {  // (t1: the lowest value (float32), shift: the mantissa bits)
    const float low = *static_cast<const float*>(t1);
    BlockScale block_scale = block_scale_scalar;
    Fp8Vector vector = nullptr;
#ifdef PUREOPT_X86
    if (!portable) block_scale = block_scale_avx2, vector = fp8_avx2;
#endif
    for (int64_t k = 0; k < n; k += block) {
      encode_fp8_block(x + k, std::min(block, n - k), top, scale + (lo + k) / block, codes + lo + k, low,
                       static_cast<int>(shift), block_scale, vector);
    }
    return;
  }
  if ((op & 15) == 4) {  // (lo: the first element's place mod 2**32, block: the seed, shift: the mixed seed)
    uint16_t* out = reinterpret_cast<uint16_t*>(codes);
    const auto first = static_cast<uint32_t>(lo), seed = static_cast<uint32_t>(block);
    const auto mixed = static_cast<uint32_t>(shift);
#ifdef PUREOPT_X86
    if (!portable) return stochastic_bf16_avx2(x, out, n, first, seed, mixed);
#endif
    return stochastic_bf16_scalar(x, out, n, first, seed, mixed);
  }
  const int64_t which = op & 15;
  const float* table = static_cast<const float*>(t1);
  const uint8_t* lookup = static_cast<const uint8_t*>(t1);
  const float* mids = static_cast<const float*>(t2);
#ifdef PUREOPT_X86
  if (!portable) {
    if (which == 6) return decode_fp8_avx2(codes, scale, x, lo, n, block, static_cast<int>(shift));
    if (which == 0) return decode8_avx2(codes, scale, table, x, lo, n, block);
    if (which == 2) return decode4_avx2(codes, scale, table, x, lo, n, block);
    return encode(x, codes, scale, lookup, mids, lo, n, block, top, static_cast<int>(shift), which == 3,
                  which == 3 ? encode_block16_avx2 : encode_block256_avx2);
  }
#endif
  if (which == 6) return decode_fp8_scalar(codes, scale, x, lo, n, block, static_cast<int>(shift));
  if (which == 0) return decode8_scalar(codes, scale, table, x, lo, n, block);
  if (which == 2) return decode4_scalar(codes, scale, table, x, lo, n, block);
  encode(x, codes, scale, lookup, mids, lo, n, block, top, static_cast<int>(shift), which == 3, encode_block_scalar);
}

#endif

}  // namespace

#ifndef PUREOPT_CODECS_ONLY
extern "C" void kernel(int64_t op, float* x, uint8_t* codes, float* scale, const void* t1, const void* t2, int64_t lo,
                       int64_t n, int64_t block, float top, int64_t shift) {
  if ((op & 15) == 4) {  // (any split: element lo + a has place lo + a; the values x and out start at element 0)
    uint16_t* out = reinterpret_cast<uint16_t*>(codes);
    segments(lo, n, 1, [&](int64_t a, int64_t m) {
      run(op, x + a, reinterpret_cast<uint8_t*>(out + a), scale, t1, t2, lo + a, m, block, top, shift);
    });
    return;
  }
  // (decode writes x[k] for element lo + k; encode reads x[k] for element lo + k: the same offsets either way)
  segments(lo, n, block,
           [&](int64_t a, int64_t m) { run(op, x + a, codes, scale, t1, t2, lo + a, m, block, top, shift); });
}
#endif
