// One pass over encoded optimizer state (see pureopt/kernels/onepass.py).
//
// Appended to codecs.cpp (built with PUREOPT_CODECS_ONLY, whose codecs it calls); the algorithm's math, generated
// from its definition, replaces the marked line below. Per tile of a tensor (a multiple of every field's block, at most
// kTile elements): decode the fields the math reads into buffers in cache, run the math over the tile (8 lanes at a
// time, the rest one by one, through the same IEEE operations), encode the fields it wrote. Tiles run on torch's
// intra-op threads (OpenMP); each is written by one thread, so the bits do not depend on the thread count.

#include <vector>

namespace {

// --- the math's operations, on one float and on 8 lanes, each as torch's CPU kernels compute it ----------------
// (primitives only: onepass.py expands lerp, addcmul, addcdiv, ... into them as torch's kernels do)

inline float bc(float s) { return s; }
inline float add(float a, float b) { return a + b; }
inline float sub(float a, float b) { return a - b; }
inline float mul(float a, float b) { return a * b; }
inline float div(float a, float b) { return a / b; }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float sqrt(float a) { return std::sqrt(a); }
inline float neg(float a) { return -a; }
inline float abs(float a) { return std::fabs(a); }
inline float sign(float a) { return static_cast<float>((0.0f < a) - (a < 0.0f)); }
inline float maximum(float a, float b) { return (a > b || a != a) ? a : b; }  // (NaN if either is; b if equal)
inline float clamp_min(float a, float lo) { return lo > a ? lo : a; }         // (NaN stays NaN)
inline float clamp_max(float a, float hi) { return hi < a ? hi : a; }

#ifdef PUREOPT_X86
struct F8 {
  __m256 v;
};
#define PUREOPT_AVX __attribute__((target("avx2,fma"))) inline
PUREOPT_AVX F8 bc8(float s) { return {_mm256_set1_ps(s)}; }
PUREOPT_AVX F8 add(F8 a, F8 b) { return {_mm256_add_ps(a.v, b.v)}; }
PUREOPT_AVX F8 sub(F8 a, F8 b) { return {_mm256_sub_ps(a.v, b.v)}; }
PUREOPT_AVX F8 mul(F8 a, F8 b) { return {_mm256_mul_ps(a.v, b.v)}; }
PUREOPT_AVX F8 div(F8 a, F8 b) { return {_mm256_div_ps(a.v, b.v)}; }
PUREOPT_AVX F8 fma(F8 a, F8 b, F8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
PUREOPT_AVX F8 sqrt(F8 a) { return {_mm256_sqrt_ps(a.v)}; }
PUREOPT_AVX F8 neg(F8 a) { return {_mm256_xor_ps(a.v, _mm256_set1_ps(-0.0f))}; }
PUREOPT_AVX F8 abs(F8 a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
PUREOPT_AVX F8 sign(F8 a) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  return {_mm256_sub_ps(_mm256_and_ps(_mm256_cmp_ps(zero, a.v, _CMP_LT_OQ), one),
                        _mm256_and_ps(_mm256_cmp_ps(a.v, zero, _CMP_LT_OQ), one))};
}
PUREOPT_AVX F8 maximum(F8 a, F8 b) {  // (max_ps gives b where unordered or equal; a where a is NaN)
  return {_mm256_blendv_ps(_mm256_max_ps(a.v, b.v), a.v, _mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q))};
}
PUREOPT_AVX F8 clamp_min(F8 a, F8 lo) { return {_mm256_max_ps(lo.v, a.v)}; }
PUREOPT_AVX F8 clamp_max(F8 a, F8 hi) { return {_mm256_min_ps(hi.v, a.v)}; }
PUREOPT_AVX F8 load8(const float* p) { return {_mm256_loadu_ps(p)}; }
PUREOPT_AVX void store8(float* p, F8 a) { _mm256_storeu_ps(p, a.v); }

// bfloat16 fields, 8 at a time (return how many elements they did)
__attribute__((target("avx2"))) int64_t bf16_decode_avx2(const uint16_t* in, float* out, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + k)));
    _mm256_storeu_ps(out + k, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  return k;
}

__attribute__((target("avx2"))) int64_t bf16_encode_avx2(const float* x, uint16_t* out, int64_t n) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
  const __m256i half = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1), nan16 = _mm256_set1_epi32(0x7FC0);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256i p = _mm256_castps_si256(_mm256_loadu_ps(x + k));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(p, magnitude), inf);
    const __m256i even = _mm256_and_si256(_mm256_srli_epi32(p, 16), one);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(p, half), even), 16);
    const __m256i q = _mm256_blendv_epi8(r, nan16, nan);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
  }
  return k;
}
#endif

// clang-format off
@MATH@
// clang-format on

// --- the driver --------------------------------------------------------------------------------------------------

enum Kind : int64_t { kPlain = 0, kCode8 = 1, kCode4 = 2, kFloat8 = 3, kBf16 = 4, kBf16Stochastic = 5 };
constexpr int64_t kTile = 4096, kHead = 7, kFieldInts = 10, kFieldVals = 2;
// how the parameter and the gradient are stored (kHead's last two), and where the math's first output goes
enum Tensors : int64_t { kFloat32 = 0, kBfloat16 = 1, kBfloat16Add = 2 };

// a field of one tensor: kind, block, shift (float8: mantissa bits), stored values in and out (plain: float32
// values in `codes_*`, bfloat16: their bits), the code's tables, its largest value and (float8) lowest written value;
// bfloat16 written stochastically: the seed, the mixed seed and the place of element 0 in `table`, `lookup`, `mids`
struct Field {
  int64_t kind, block, shift;
  const uint8_t* codes_in;
  const float* scale_in;
  uint8_t* codes_out;
  float* scale_out;
  const float* table;
  const uint8_t* lookup;
  const float* mids;
  float top, low;
};

Field field(const int64_t* row, const double* vals, int64_t j) {
  const int64_t* r = row + kHead + j * kFieldInts;
  const double* v = vals + kSlots + j * kFieldVals;
  return {r[0],
          r[1],
          r[2],
          reinterpret_cast<const uint8_t*>(r[3]),
          reinterpret_cast<const float*>(r[4]),
          reinterpret_cast<uint8_t*>(r[5]),
          reinterpret_cast<float*>(r[6]),
          reinterpret_cast<const float*>(r[7]),
          reinterpret_cast<const uint8_t*>(r[8]),
          reinterpret_cast<const float*>(r[9]),
          static_cast<float>(v[0]),
          static_cast<float>(v[1])};
}

// bfloat16 <-> float32: the bits shifted by 16; to nearest, ties to even (NaN: 0x7FC0), as torch's scalar cast
inline uint16_t nearest_bf16(float x) {
  const uint32_t p = float_bits(x);
  if ((p & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((p + 0x7FFFu + ((p >> 16) & 1u)) >> 16);
}

void bf16_decode(const uint16_t* in, float* out, int64_t n, bool portable) {
  int64_t k = 0;
#ifdef PUREOPT_X86
  if (!portable) k = bf16_decode_avx2(in, out, n);
#endif
  for (; k < n; ++k) {
    const uint32_t bits = static_cast<uint32_t>(in[k]) << 16;
    std::memcpy(out + k, &bits, 4);
  }
}

void bf16_encode(const float* x, uint16_t* out, int64_t n, bool portable) {
  int64_t k = 0;
#ifdef PUREOPT_X86
  if (!portable) k = bf16_encode_avx2(x, out, n);
#endif
  for (; k < n; ++k) out[k] = nearest_bf16(x[k]);
}

void decode_tile(const Field& f, int64_t lo, int64_t n, float* out, bool portable) {
  if (f.kind == kBf16 || f.kind == kBf16Stochastic) {
    return bf16_decode(reinterpret_cast<const uint16_t*>(f.codes_in) + lo, out, n, portable);
  }
  if (f.kind == kPlain) {
    std::memcpy(out, reinterpret_cast<const float*>(f.codes_in) + lo, n * sizeof(float));
    return;
  }
  const auto mbits = static_cast<int>(f.shift);
#ifdef PUREOPT_X86
  if (!portable) {
    if (f.kind == kCode8) return decode8_avx2(f.codes_in, f.scale_in, f.table, out, lo, n, f.block);
    if (f.kind == kCode4) return decode4_avx2(f.codes_in, f.scale_in, f.table, out, lo, n, f.block);
    return decode_fp8_avx2(f.codes_in, f.scale_in, out, lo, n, f.block, mbits);
  }
#endif
  if (f.kind == kCode8) return decode8_scalar(f.codes_in, f.scale_in, f.table, out, lo, n, f.block);
  if (f.kind == kCode4) return decode4_scalar(f.codes_in, f.scale_in, f.table, out, lo, n, f.block);
  decode_fp8_scalar(f.codes_in, f.scale_in, out, lo, n, f.block, mbits);
}

void encode_tile(const Field& f, int64_t lo, int64_t n, const float* x, bool portable) {
  if (f.kind == kBf16) return bf16_encode(x, reinterpret_cast<uint16_t*>(f.codes_out) + lo, n, portable);
  if (f.kind == kBf16Stochastic) {
    uint16_t* out = reinterpret_cast<uint16_t*>(f.codes_out) + lo;
    const auto seed = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(f.table));
    const auto mixed = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(f.lookup));
    const auto first = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(f.mids)) + static_cast<uint32_t>(lo);
#ifdef PUREOPT_X86
    if (!portable) return stochastic_bf16_avx2(x, out, n, first, seed, mixed);
#endif
    return stochastic_bf16_scalar(x, out, n, first, seed, mixed);
  }
  if (f.kind == kPlain) {
    std::memcpy(reinterpret_cast<float*>(f.codes_out) + lo, x, n * sizeof(float));
    return;
  }
  if (f.kind == kFloat8) {
    BlockScale block_scale = block_scale_scalar;
    Fp8Vector vector = nullptr;
#ifdef PUREOPT_X86
    if (!portable) block_scale = block_scale_avx2, vector = fp8_avx2;
#endif
    for (int64_t k = 0; k < n; k += f.block) {
      encode_fp8_block(x + k, std::min(f.block, n - k), f.top, f.scale_out + (lo + k) / f.block,
                       f.codes_out + lo + k, f.low, static_cast<int>(f.shift), block_scale, vector);
    }
    return;
  }
  const bool four = f.kind == kCode4;
  EncodeBlock block = encode_block_scalar;
#ifdef PUREOPT_X86
  if (!portable) block = four ? encode_block16_avx2 : encode_block256_avx2;
#endif
  encode(x, f.codes_out, f.scale_out, f.lookup, f.mids, lo, n, f.block, f.top, static_cast<int>(f.shift), four,
         block);
}

// one tile: elements lo:lo + n of the tensor in `row` (bfloat16 parameters and gradients read as float32; with
// kBfloat16Add the math's first output is the update, added to the bfloat16 parameter and rounded to nearest, as
// torch's p.add_(u))
void run_tile(const int64_t* row, const double* vals, int64_t lo, int64_t n, bool portable) {
  alignas(32) float bufs[kFields][kTile];
  alignas(32) float pbuf[kTile], gbuf[kTile], ubuf[kTile];
  const float* in[2 + kFields];
  float* out[1 + kFields];
  const int64_t pkind = row[5], gkind = row[6];
  if (row[1] == 0) {
    in[0] = nullptr;
  } else if (pkind == kFloat32) {
    in[0] = reinterpret_cast<const float*>(row[1]) + lo;
  } else {
    bf16_decode(reinterpret_cast<const uint16_t*>(row[1]) + lo, pbuf, n, portable);
    in[0] = pbuf;
  }
  if (gkind == kFloat32) {
    in[1] = reinterpret_cast<const float*>(row[2]) + lo;
  } else {
    bf16_decode(reinterpret_cast<const uint16_t*>(row[2]) + lo, gbuf, n, portable);
    in[1] = gbuf;
  }
  out[0] = pkind == kBfloat16Add ? ubuf : reinterpret_cast<float*>(row[3]) + lo;
  Field fields[kFields];
  for (int64_t j = 0; j < kFields; ++j) {
    fields[j] = field(row, vals, j);
    if (kReads[j]) decode_tile(fields[j], lo, n, bufs[j], portable);
    in[2 + j] = bufs[j];
    out[1 + j] = bufs[j];
  }
  float s[kSlots + 1];
  for (int64_t k = 0; k < kSlots; ++k) s[k] = static_cast<float>(vals[k]);
  int64_t done = 0;
#ifdef PUREOPT_X86
  if (!portable) done = avx::math(in, out, 0, n, s);
#endif
  portable::math(in, out, done, n, s);
  if (pkind == kBfloat16Add) {
    for (int64_t k = 0; k < n; ++k) pbuf[k] += ubuf[k];
    bf16_encode(pbuf, reinterpret_cast<uint16_t*>(row[3]) + lo, n, portable);
  }
  for (int64_t j = 0; j < kFields; ++j) {
    if (kWrites[j]) encode_tile(fields[j], lo, n, bufs[j], portable);
  }
}

}  // namespace

// desc: per tensor, kHead ints (elements, parameter, gradient, destination of the new parameter or the update, tile,
// how the parameter and the gradient are stored) and kFieldInts per field; vals: per tensor, the math's kSlots scalars, then (top, low) per field
extern "C" void kernel(const int64_t* desc, const double* vals, int64_t tensors, int64_t portable) {
  const int64_t rows = kHead + kFields * kFieldInts, cols = kSlots + kFields * kFieldVals;
  std::vector<int64_t> first(tensors + 1, 0);  // (each tensor's first tile among all)
  int64_t elements = 0;
  for (int64_t t = 0; t < tensors; ++t) {
    const int64_t n = desc[t * rows], tile = desc[t * rows + 4];
    first[t + 1] = first[t] + (n + tile - 1) / tile;
    elements += n;
  }
  const int64_t total = first[tensors];
  const auto work = [&](int64_t item) {
    const int64_t t = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
    const int64_t* row = desc + t * rows;
    const int64_t lo = (item - first[t]) * row[4];
    run_tile(row, vals + t * cols, lo, std::min(row[4], row[0] - lo), portable != 0);
  };
#ifdef _OPENMP
  const int64_t threads = omp_in_parallel() ? 1 : std::min<int64_t>(omp_get_max_threads(), elements >> 15);
  if (threads > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t item = 0; item < total; ++item) work(item);
    return;
  }
#endif
  for (int64_t item = 0; item < total; ++item) work(item);
}
