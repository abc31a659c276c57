// moegi's native int4 kernels for x86 CPUs: AutoAWQ 4-bit weights (asymmetric, with zero points)
// for dense linears and whole MoE layers. Built on first use by vllm_plugins/native.py
// (torch.utils.cpp_extension, with the g++ that vLLM's compiled mode needs) and registered as
// torch ops `moegi_native::*`, which vLLM's compiled model calls directly.
//
// Written by hand because no maintained package runs AWQ zero points fast on x86 CPUs without
// AMX: torch's `_weight_int4pack_mm_for_cpu` multiplies in float32 and reads the weight again for
// every 4 rows; vLLM's `cpu_gemm_wna16` is fast only with AMX tiles; zentorch takes symmetric
// weights only; IPEX is archived. What the fast CPU engines do (llama.cpp's Q4_0 x Q8_0 dot
// products, vLLM's W4A8 AMX kernel, SGLang's sgl-kernel CPU MoE) is done here:
//   - weights repacked once at load into the order the kernel reads (`repack`): one 64-byte
//     vector holds 16 output channels x 8 inputs, and a 64-channel block's bytes are contiguous;
//   - activations quantized to int8 per row and per 32 inputs (absmax, as llama.cpp's Q8_0),
//     so one `vpdpbusd` (AVX512-VNNI) multiplies 64 weight nibbles by 64 activations; a nibble
//     becomes a byte with one AND (low) or one shift and AND (high), nothing per element else;
//   - the zero point and the scales are folded in per block of 32 and per group, never per
//     element: sum_k x_k (q_k - z) s = s (sum_b d_b sum_{k in b} xq_k q_k - z sum_b d_b sum xq_k);
//   - each packed weight is read once for all the rows in flight (4 rows held in registers);
//   - output blocks split across torch's OpenMP threads (the ones vLLM binds to cores).
// One kernel for every row count, so results do not depend on the batch: each row's
// activations are quantized on their own and summed in the same order, and a token gets the same
// output alone or in a batch. Measured against oneDNN's bfloat16 matmul on a resident bf16
// weight (`python -m bench.kernel`), it is faster at every row count up to 512 without AMX, so
// no dequantize-then-matmul path is needed for prefill.
// Dispatch at run time: AVX512-VNNI, else AVX2 (the same products with vpmaddubsw), else scalar.
//
// Shapes: M rows, K inputs, N outputs, G group size, E experts, H hidden, I intermediate.
// Packed layout of one linear (N % 64 == 0, G % 32 == 0, K % G == 0):
//   w [N/64, K/8, 4, 16, 4] uint8: block b, step s (inputs 8s..8s+7), tile t, channel c
//     (64b + 16t + c), byte p: the low nibble holds q[8s + p][channel], the high one
//     q[8s + 4 + p][channel] (unsigned 0..15);
//   s [N/64, K/G, 64] float16 scales; z [N/64, K/G, 64] uint8 zero points (0..15).

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace moegi {
namespace {

enum class Isa { kAvx512Vnni, kAvx2, kScalar };
Isa isa_now();

constexpr int64_t BLOCK = 64;        // output channels per block
constexpr int64_t STEP = 8;          // inputs per packed vector
constexpr int64_t STEP_BYTES = 256;  // one step of one block: 4 tiles of 64 bytes
constexpr int64_t QBLOCK = 32;       // inputs per activation scale
constexpr int ROWS = 4;              // rows held in registers at once

using bf16 = uint16_t;

struct Packed {
  const uint8_t* w;
  const c10::Half* s;
  const uint8_t* z;
  int64_t n, k, g;
  int64_t groups() const { return k / g; }
  const uint8_t* wb(int64_t b) const { return w + b * (k / STEP) * STEP_BYTES; }
  const c10::Half* sb(int64_t b) const { return s + b * groups() * BLOCK; }
  const uint8_t* zb(int64_t b) const { return z + b * groups() * BLOCK; }
};

Packed packed(const at::Tensor& w, const at::Tensor& s, const at::Tensor& z) {
  TORCH_CHECK(w.scalar_type() == at::kByte && s.scalar_type() == at::kHalf &&
                  z.scalar_type() == at::kByte,
              "moegi int4: packed weights must be uint8, scales float16, zeros uint8");
  TORCH_CHECK(w.is_contiguous() && s.is_contiguous() && z.is_contiguous(),
              "moegi int4: packed tensors must be contiguous");
  TORCH_CHECK(w.dim() == 2 && s.dim() == 3 && z.sizes() == s.sizes(),
              "moegi int4: expected w [N, K/2], s and z [N/64, K/G, 64]");
  const int64_t n = w.size(0), k = w.size(1) * 2;
  TORCH_CHECK(n % BLOCK == 0 && s.size(0) == n / BLOCK && s.size(2) == BLOCK,
              "moegi int4: scales do not match the weight");
  const int64_t g = k / s.size(1);
  TORCH_CHECK(g * s.size(1) == k && g % QBLOCK == 0, "moegi int4: group size ", g,
              " is not a multiple of ", QBLOCK);
  return {w.data_ptr<uint8_t>(), s.data_ptr<c10::Half>(), z.data_ptr<uint8_t>(), n, k, g};
}

// Rows quantized for the kernels, one scale per 32 inputs, and per group the sum over its blocks
// of scale x (sum of the block's integers), which carries the zero point. Two widths:
//   - int8 (for bfloat16 inputs, the default): absmax / 127, as llama.cpp's Q8_0; about 0.5% of a
//     linear's output norm, the precision of the bfloat16 it replaces;
//   - int16 (for float16 and float32 inputs: a user who asks for them wants precision): absmax /
//     32767, stored with each 8 inputs in the order 0 2 4 6 1 3 5 7, the pairs `vpdpwssd` reads.
// Both are per row, so a row's output does not depend on the others in the batch.
constexpr int kPairOrder[8] = {0, 2, 4, 6, 1, 3, 5, 7};   // stored position -> input
constexpr int kPairSlot[8] = {0, 4, 1, 5, 2, 6, 3, 7};    // input -> stored position

struct Rows {
  const int8_t* q8;    // [M][K] (int8 width)
  const int16_t* q16;  // [M][K] (int16 width, pair order)
  const float* d;      // [M][K/32]
  const float* zsum;   // [M][K/G]
  int64_t k, g;
  const int8_t* r8(int64_t r) const { return q8 + r * k; }
  const int16_t* r16(int64_t r) const { return q16 + r * k; }
  const float* dr(int64_t r) const { return d + r * (k / QBLOCK); }
  const float* zr(int64_t r) const { return zsum + r * (k / g); }
};

struct RowBuffers {
  bool wide = false;
  std::vector<int8_t> q8;
  std::vector<int16_t> q16;
  std::vector<float> d, zsum;
  Rows view(int64_t k, int64_t g) const {
    return {q8.data(), q16.data(), d.data(), zsum.data(), k, g};
  }
};

template <typename T>
float load_float(const T* x, int64_t i) {
  if constexpr (std::is_same_v<T, bf16>) {
    return static_cast<float>(c10::BFloat16(x[i], c10::BFloat16::from_bits()));
  } else {
    return x[i];
  }
}

// One block of 32 inputs -> integers A (round to nearest even), its scale, the integers' sum.
template <typename A, typename T>
void quantize_block_scalar(const T* x, A* q, float* d, int32_t* sum) {
  constexpr float kMax = std::is_same_v<A, int8_t> ? 127.f : 32767.f;
  float amax = 0.f;
  for (int64_t i = 0; i < QBLOCK; ++i) amax = std::max(amax, std::fabs(load_float(x, i)));
  *d = amax / kMax;
  const float inv = amax > 0.f ? kMax / amax : 0.f;
  int32_t total = 0;
  for (int64_t i = 0; i < QBLOCK; ++i) {
    const A v = static_cast<A>(std::nearbyint(load_float(x, i) * inv));
    if constexpr (std::is_same_v<A, int8_t>) {
      q[i] = v;
    } else {
      q[8 * (i / 8) + kPairSlot[i % 8]] = v;
    }
    total += v;
  }
  *sum = total;
}

#define MOEGI_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,fma,f16c")))

template <typename A, typename T>
MOEGI_AVX512 void quantize_block_avx512(const T* x, A* q, float* d, int32_t* sum) {
  constexpr float kMax = std::is_same_v<A, int8_t> ? 127.f : 32767.f;
  __m512 v[2];
  for (int h = 0; h < 2; ++h) {
    if constexpr (std::is_same_v<T, bf16>) {
      v[h] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * h))), 16));
    } else {
      v[h] = _mm512_loadu_ps(x + 16 * h);
    }
  }
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
  *d = amax / kMax;
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? kMax / amax : 0.f);
  // round to nearest even, as the scalar path
  const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v[0], inv));
  const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v[1], inv));
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  if constexpr (std::is_same_v<A, int8_t>) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(i1));
  } else {
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtsepi32_epi16(i0)),
                                            _mm512_cvtsepi32_epi16(i1), 1);
    // Stored position j holds input 8 (j / 8) + kPairOrder[j % 8].
    alignas(64) static const int16_t order[32] = {
        0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15,
        16, 18, 20, 22, 17, 19, 21, 23, 24, 26, 28, 30, 25, 27, 29, 31};
    _mm512_storeu_si512(q, _mm512_permutexvar_epi16(_mm512_load_si512(order), both));
  }
}

bool avx512_vnni();

// x [M][K] (bfloat16 bits or float32) -> Rows of width A, rows in parallel.
template <typename A, typename T>
void quantize_rows_as(const T* x, int64_t m, int64_t k, int64_t g, std::vector<A>& q,
                      RowBuffers& out) {
  const int64_t blocks = k / QBLOCK, per_group = g / QBLOCK;
  q.resize(m * k);
  out.d.resize(m * blocks);
  out.zsum.resize(m * (k / g));
  const bool fast = avx512_vnni();
  at::parallel_for(0, m, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        float d;
        int32_t sum;
        const int64_t at = r * k + b * QBLOCK;
        if (fast)
          quantize_block_avx512(x + at, q.data() + at, &d, &sum);
        else
          quantize_block_scalar(x + at, q.data() + at, &d, &sum);
        out.d[r * blocks + b] = d;
        float& z = out.zsum[r * (k / g) + b / per_group];
        z = (b % per_group == 0 ? 0.f : z) + d * static_cast<float>(sum);
      }
  });
}

template <typename T>
void quantize_rows(const T* x, int64_t m, int64_t k, int64_t g, bool wide, RowBuffers& out) {
  out.wide = wide;
  if (wide)
    quantize_rows_as(x, m, k, g, out.q16, out);
  else
    quantize_rows_as(x, m, k, g, out.q8, out);
}

// bfloat16 inputs get int8 rows; float16 and float32 ones, int16 rows (see Rows).
bool wide_for(at::ScalarType dtype) { return dtype != at::kBFloat16; }

void quantize_input(const at::Tensor& x2, int64_t g, RowBuffers& out) {
  const int64_t m = x2.size(0), k = x2.size(1);
  if (x2.scalar_type() == at::kBFloat16) {
    quantize_rows(reinterpret_cast<const bf16*>(x2.data_ptr<at::BFloat16>()), m, k, g, false, out);
  } else {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    quantize_rows(xf.data_ptr<float>(), m, k, g, true, out);
  }
}

// ---------------------------------------------------------------------------------------------
// AVX512-VNNI.

// R rows x one block's 64 channels -> out [R][64] float32, with int8 (`vpdpbusd`: 4 products a
// lane) or int16 (`vpdpwssd`: 2) activations.
template <int R, typename A>
MOEGI_AVX512 void block_avx512(const Packed& p, int64_t b, const Rows& x, int64_t r0, float* out) {
  const __m512i* wp = reinterpret_cast<const __m512i*>(p.wb(b));
  const c10::Half* sp = p.sb(b);
  const uint8_t* zp = p.zb(b);
  __m512 o[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) o[r][t] = _mm512_setzero_ps();
  const int64_t per_group = p.g / QBLOCK;
  for (int64_t g = 0; g < p.groups(); ++g) {
    __m512 f[R][4];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < 4; ++t) f[r][t] = _mm512_setzero_ps();
    for (int64_t qb = g * per_group; qb < (g + 1) * per_group; ++qb) {
      __m512i a[R][4];
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < 4; ++t) a[r][t] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int st = 0; st < QBLOCK / STEP; ++st, wp += 4) {
        const int64_t k0 = qb * QBLOCK + st * STEP;
        __m512i v[4];
        for (int t = 0; t < 4; ++t) v[t] = _mm512_loadu_si512(wp + t);
        if constexpr (std::is_same_v<A, int8_t>) {
          // Bytes of a lane: low nibbles are inputs k0..k0+3, high ones k0+4..k0+7.
          const __m512i m4 = _mm512_set1_epi8(15);
          __m512i lo[4], hi[4];
          for (int t = 0; t < 4; ++t) {
            lo[t] = _mm512_and_si512(v[t], m4);
            hi[t] = _mm512_and_si512(_mm512_srli_epi16(v[t], 4), m4);
          }
          for (int r = 0; r < R; ++r) {
            int32_t x0, x1;
            std::memcpy(&x0, x.r8(r0 + r) + k0, 4);
            std::memcpy(&x1, x.r8(r0 + r) + k0 + 4, 4);
            const __m512i b0 = _mm512_set1_epi32(x0), b1 = _mm512_set1_epi32(x1);
            for (int t = 0; t < 4; ++t)
              a[r][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a[r][t], lo[t], b0), hi[t], b1);
          }
        } else {
          // 16-bit halves of a lane, shifted by 4i: inputs (k0, k0+2), (k0+4, k0+6), (k0+1, k0+3),
          // (k0+5, k0+7), the pairs at 2i of the rows' pair order.
          const __m512i m4 = _mm512_set1_epi32(0x000F000F);
#pragma GCC unroll 4
          for (int i = 0; i < 4; ++i) {
            __m512i w[4];
            for (int t = 0; t < 4; ++t)
              w[t] = _mm512_and_si512(_mm512_srli_epi32(v[t], 4 * i), m4);
            for (int r = 0; r < R; ++r) {
              int32_t pair;
              std::memcpy(&pair, x.r16(r0 + r) + k0 + 2 * i, 4);
              const __m512i bx = _mm512_set1_epi32(pair);
              for (int t = 0; t < 4; ++t) a[r][t] = _mm512_dpwssd_epi32(a[r][t], w[t], bx);
            }
          }
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 d = _mm512_set1_ps(x.dr(r0 + r)[qb]);
        for (int t = 0; t < 4; ++t) f[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[r][t]), d, f[r][t]);
      }
    }
    for (int t = 0; t < 4; ++t) {
      const __m512 s = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + g * BLOCK + 16 * t)));
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(zp + g * BLOCK + 16 * t))));
      for (int r = 0; r < R; ++r) {
        const __m512 v = _mm512_fnmadd_ps(z, _mm512_set1_ps(x.zr(r0 + r)[g]), f[r][t]);
        o[r][t] = _mm512_fmadd_ps(s, v, o[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) _mm512_storeu_ps(out + r * BLOCK + 16 * t, o[r][t]);
}

// ---------------------------------------------------------------------------------------------
// AVX2: the same products with vpmaddubsw + vpmaddwd, 256 bits (8 channels) at a time.

#define MOEGI_AVX2 __attribute__((target("avx2,fma,f16c")))

template <int R, typename A>
MOEGI_AVX2 void block_avx2(const Packed& p, int64_t b, const Rows& x, int64_t r0, float* out) {
  const uint8_t* wp = p.wb(b);
  const c10::Half* sp = p.sb(b);
  const uint8_t* zp = p.zb(b);
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t per_group = p.g / QBLOCK;
  for (int h = 0; h < 8; ++h) {  // 8 eighths of the block: tile h / 2, half h % 2
    __m256 o[R];
    for (int r = 0; r < R; ++r) o[r] = _mm256_setzero_ps();
    const uint8_t* wh = wp + (h / 2) * 64 + (h % 2) * 32;
    for (int64_t g = 0; g < p.groups(); ++g) {
      __m256 f[R];
      for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
      for (int64_t qb = g * per_group; qb < (g + 1) * per_group; ++qb) {
        __m256i a[R];
        for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_si256();
        for (int st = 0; st < QBLOCK / STEP; ++st) {
          const int64_t k0 = qb * QBLOCK + st * STEP;
          const __m256i v = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(wh + (k0 / STEP) * STEP_BYTES));
          if constexpr (std::is_same_v<A, int8_t>) {
            const __m256i m4 = _mm256_set1_epi8(15);
            const __m256i lo = _mm256_and_si256(v, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
            for (int r = 0; r < R; ++r) {
              int32_t x0, x1;
              std::memcpy(&x0, x.r8(r0 + r) + k0, 4);
              std::memcpy(&x1, x.r8(r0 + r) + k0 + 4, 4);
              const __m256i s0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)), ones);
              const __m256i s1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)), ones);
              a[r] = _mm256_add_epi32(a[r], _mm256_add_epi32(s0, s1));
            }
          } else {
            const __m256i m4 = _mm256_set1_epi32(0x000F000F);
            for (int i = 0; i < 4; ++i) {
              const __m256i w = _mm256_and_si256(_mm256_srli_epi32(v, 4 * i), m4);
              for (int r = 0; r < R; ++r) {
                int32_t pair;
                std::memcpy(&pair, x.r16(r0 + r) + k0 + 2 * i, 4);
                a[r] = _mm256_add_epi32(a[r], _mm256_madd_epi16(w, _mm256_set1_epi32(pair)));
              }
            }
          }
        }
        for (int r = 0; r < R; ++r)
          f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(x.dr(r0 + r)[qb]), f[r]);
      }
      const __m256 s = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + g * BLOCK + 8 * h)));
      const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp + g * BLOCK + 8 * h))));
      for (int r = 0; r < R; ++r)
        o[r] = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, _mm256_set1_ps(x.zr(r0 + r)[g]), f[r]), o[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * BLOCK + 8 * h, o[r]);
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar (any x86-64): the same sums in the same order.

uint32_t nibble_at(const uint8_t* wb, int64_t k, int64_t c) {
  // The packed byte of input k and channel c within one block, and which nibble.
  const uint8_t byte = wb[(k / STEP) * STEP_BYTES + (c / 16) * 64 + (c % 16) * 4 + (k % 4)];
  return (k % STEP) < 4 ? (byte & 15u) : (byte >> 4);
}

template <typename A>
void block_scalar(const Packed& p, int64_t b, const Rows& x, int64_t r0, int rows, float* out) {
  const uint8_t* wp = p.wb(b);
  const int64_t per_group = p.g / QBLOCK;
  for (int r = 0; r < rows; ++r)
    for (int64_t c = 0; c < BLOCK; ++c) {
      float o = 0.f;
      for (int64_t g = 0; g < p.groups(); ++g) {
        float f = 0.f;
        for (int64_t qb = g * per_group; qb < (g + 1) * per_group; ++qb) {
          int32_t a = 0;
          for (int64_t i = 0; i < QBLOCK; ++i) {
            const int64_t k = qb * QBLOCK + i;
            const int32_t xv = std::is_same_v<A, int8_t>
                                   ? x.r8(r0 + r)[k]
                                   : x.r16(r0 + r)[8 * (k / 8) + kPairSlot[k % 8]];
            a += static_cast<int32_t>(nibble_at(wp, k, c)) * xv;
          }
          f += static_cast<float>(a) * x.dr(r0 + r)[qb];
        }
        const float s = static_cast<float>(p.sb(b)[g * BLOCK + c]);
        const float z = static_cast<float>(p.zb(b)[g * BLOCK + c]);
        o += s * (f - z * x.zr(r0 + r)[g]);
      }
      out[r * BLOCK + c] = o;
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch.

// `MOEGI_NATIVE_ISA` (avx2, scalar) holds the kernels below what the CPU has, so that the tests
// run every path on one machine.
Isa isa_now() {
  static const Isa isa = [] {
    const char* cap = std::getenv("MOEGI_NATIVE_ISA");
    const std::string limit = cap ? cap : "";
    if (limit.empty() && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16"))
      return Isa::kAvx512Vnni;
    if (limit != "scalar" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::kAvx2;
    return Isa::kScalar;
  }();
  return isa;
}

bool avx512_vnni() { return isa_now() == Isa::kAvx512Vnni; }

template <template <int, typename> class Kernel, typename A>
void rows_by_four(const Packed& p, int64_t b, const Rows& x, int64_t r0, int64_t rows, float* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) Kernel<4, A>::run(p, b, x, r0 + r, out + r * BLOCK);
  switch (rows - r) {
    case 3: Kernel<3, A>::run(p, b, x, r0 + r, out + r * BLOCK); break;
    case 2: Kernel<2, A>::run(p, b, x, r0 + r, out + r * BLOCK); break;
    case 1: Kernel<1, A>::run(p, b, x, r0 + r, out + r * BLOCK); break;
    default: break;
  }
}

template <int R, typename A> struct Avx512 {
  static void run(const Packed& p, int64_t b, const Rows& x, int64_t r0, float* out) {
    block_avx512<R, A>(p, b, x, r0, out);
  }
};
template <int R, typename A> struct Avx2 {
  static void run(const Packed& p, int64_t b, const Rows& x, int64_t r0, float* out) {
    block_avx2<R, A>(p, b, x, r0, out);
  }
};

template <typename A>
void block_rows_as(const Packed& p, int64_t b, const Rows& x, int64_t r0, int64_t rows,
                   float* out) {
  switch (isa_now()) {
    case Isa::kAvx512Vnni: rows_by_four<Avx512, A>(p, b, x, r0, rows, out); break;
    case Isa::kAvx2: rows_by_four<Avx2, A>(p, b, x, r0, rows, out); break;
    case Isa::kScalar:
      for (int64_t r = 0; r < rows; r += ROWS)
        block_scalar<A>(p, b, x, r0 + r, static_cast<int>(std::min<int64_t>(ROWS, rows - r)),
                        out + r * BLOCK);
      break;
  }
}

// Rows [r0, r0 + rows) x block b -> out [rows][64] float32, at the rows' width.
void block_rows(const Packed& p, int64_t b, const RowBuffers& rb, const Rows& x, int64_t r0,
                int64_t rows, float* out) {
  if (rb.wide)
    block_rows_as<int16_t>(p, b, x, r0, rows, out);
  else
    block_rows_as<int8_t>(p, b, x, r0, rows, out);
}

// SiLU(gate) * up in float32, vectorised by the compiler.
inline float silu_mul(float g, float u) { return g / (1.f + std::exp(-g)) * u; }

// ---------------------------------------------------------------------------------------------
// Ops.

// Dense linear: x [..., K] @ the packed weight -> [..., N] in x's dtype (bias added in float32).
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                  const at::Tensor& z, const std::optional<at::Tensor>& bias) {
  const Packed p = packed(w, s, z);
  TORCH_CHECK(x.size(-1) == p.k, "moegi int4 linear: x has ", x.size(-1), " inputs, weight ", p.k);
  const at::Tensor x2 = x.reshape({-1, p.k}).contiguous();
  const int64_t m = x2.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = p.n;
  at::Tensor out = at::empty({m, p.n}, at::TensorOptions().dtype(at::kFloat));
  RowBuffers rb;
  quantize_input(x2, p.g, rb);
  const Rows rows = rb.view(p.k, p.g);
  float* o = out.data_ptr<float>();
  at::Tensor bias_f;
  const float* bi = nullptr;
  if (bias) {
    bias_f = bias->to(at::kFloat).contiguous();
    bi = bias_f.data_ptr<float>();
  }
  at::parallel_for(0, p.n / BLOCK, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(m * BLOCK);
    for (int64_t b = lo; b < hi; ++b) {
      block_rows(p, b, rb, rows, 0, m, buf.data());
      for (int64_t r = 0; r < m; ++r)
        for (int64_t c = 0; c < BLOCK; ++c)
          o[r * p.n + b * BLOCK + c] = buf[r * BLOCK + c] + (bi ? bi[b * BLOCK + c] : 0.f);
    }
  });
  return out.to(x.scalar_type()).view(shape);
}

// Routing: assignments sorted by expert (stable, so each expert's rows keep token order).
struct Routing {
  std::vector<int64_t> start;  // [E + 1]: expert e's rows are [start[e], start[e + 1])
  std::vector<int64_t> token;  // [M k]
  std::vector<float> weight;   // [M k]
};

Routing route(const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t experts) {
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* wt = wts.data_ptr<float>();
  const int64_t assignments = ids.numel(), topk = ids.size(1);
  Routing rt;
  rt.start.assign(experts + 1, 0);
  for (int64_t a = 0; a < assignments; ++a) {
    TORCH_CHECK(id[a] >= 0 && id[a] < experts, "moegi int4 moe: expert id ", id[a], " out of range");
    ++rt.start[id[a] + 1];
  }
  for (int64_t e = 0; e < experts; ++e) rt.start[e + 1] += rt.start[e];
  std::vector<int64_t> fill(rt.start.begin(), rt.start.end() - 1);
  rt.token.resize(assignments);
  rt.weight.resize(assignments);
  for (int64_t a = 0; a < assignments; ++a) {
    const int64_t slot = fill[id[a]]++;
    rt.token[slot] = a / topk;
    rt.weight[slot] = wt[a];
  }
  return rt;
}

// One MoE layer's routed experts in one call: gate and up (w13, whose 64-channel blocks
// alternate gate, up, gate, up, ... after `repack(..., interleave=true)`), SiLU(gate) * up, down
// (w2), weighted by the router and summed per token. x [M, H], topk_weights/ids [M, k].
at::Tensor moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
               const at::Tensor& w13, const at::Tensor& s13, const at::Tensor& z13,
               const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& z2,
               bool weight_on_input) {
  const int64_t experts = w13.size(0), m = x.size(0), h = x.size(1);
  const int64_t inter = w13.size(1) / 2;
  TORCH_CHECK(w2.size(0) == experts && w2.size(1) == h && w2.size(2) * 2 == inter,
              "moegi int4 moe: w2 does not match w13");
  std::vector<Packed> up(experts), down(experts);
  for (int64_t e = 0; e < experts; ++e) {
    up[e] = packed(w13[e], s13[e], z13[e]);
    down[e] = packed(w2[e], s2[e], z2[e]);
  }
  TORCH_CHECK(up[0].k == h, "moegi int4 moe: w13 has ", up[0].k, " inputs, x ", h);
  const Routing rt = route(topk_weights, topk_ids, experts);
  const int64_t rows = static_cast<int64_t>(rt.token.size());
  // Each assignment's input row, in expert order (scaled by its weight first if weight_on_input).
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor xg = at::empty({rows, h}, at::TensorOptions().dtype(at::kFloat));
  float* xgp = xg.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const float* src = xf.data_ptr<float>() + rt.token[r] * h;
      const float f = weight_on_input ? rt.weight[r] : 1.f;
      for (int64_t c = 0; c < h; ++c) xgp[r * h + c] = src[c] * f;
    }
  });
  std::vector<int64_t> used;  // experts that received rows
  for (int64_t e = 0; e < experts; ++e)
    if (rt.start[e + 1] > rt.start[e]) used.push_back(e);
  // Gate, up and SiLU: act [rows, I] float32.
  at::Tensor act = at::empty({rows, inter}, at::TensorOptions().dtype(at::kFloat));
  float* actp = act.data_ptr<float>();
  if (!used.empty()) {
    RowBuffers rb;
    quantize_rows(xg.data_ptr<float>(), rows, h, up[0].g, wide_for(x.scalar_type()), rb);
    const Rows xr = rb.view(h, up[0].g);
    const int64_t pairs = inter / BLOCK;
    at::parallel_for(0, static_cast<int64_t>(used.size()) * pairs, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> gate, upv;
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t e = used[item / pairs], j = item % pairs;
        const int64_t r0 = rt.start[e], n = rt.start[e + 1] - r0;
        gate.resize(n * BLOCK);
        upv.resize(n * BLOCK);
        block_rows(up[e], 2 * j, rb, xr, r0, n, gate.data());
        block_rows(up[e], 2 * j + 1, rb, xr, r0, n, upv.data());
        for (int64_t r = 0; r < n; ++r)
          for (int64_t c = 0; c < BLOCK; ++c)
            actp[(r0 + r) * inter + j * BLOCK + c] = silu_mul(gate[r * BLOCK + c], upv[r * BLOCK + c]);
      }
    });
  }
  // Down, weighted and summed per token: each thread owns whole output blocks, so no two
  // threads add into the same place.
  at::Tensor out = at::zeros({m, h}, at::TensorOptions().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  if (!used.empty()) {
    RowBuffers rb;
    quantize_rows(actp, rows, inter, down[0].g, wide_for(x.scalar_type()), rb);
    const Rows ar = rb.view(inter, down[0].g);
    at::parallel_for(0, h / BLOCK, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> y;
      for (int64_t b = lo; b < hi; ++b)
        for (const int64_t e : used) {
          const int64_t r0 = rt.start[e], n = rt.start[e + 1] - r0;
          y.resize(n * BLOCK);
          block_rows(down[e], b, rb, ar, r0, n, y.data());
          for (int64_t r = 0; r < n; ++r) {
            const float f = weight_on_input ? 1.f : rt.weight[r0 + r];
            float* dst = op + rt.token[r0 + r] * h + b * BLOCK;
            for (int64_t c = 0; c < BLOCK; ++c) dst[c] += f * y[r * BLOCK + c];
          }
        }
    });
  }
  return out.to(x.scalar_type());
}

// AutoAWQ GEMM tensors -> the packed layout. qweight [K, N/8] and qzeros [K/G, N/8] int32, eight
// nibbles per word along N in the order 0 2 4 6 1 3 5 7; scales [K/G, N] float16. With
// `interleave`, the two halves of N (an MoE's gate and up) alternate block by block.
std::tuple<at::Tensor, at::Tensor, at::Tensor> repack(const at::Tensor& qweight_in,
                                                      const at::Tensor& qzeros_in,
                                                      const at::Tensor& scales_in,
                                                      bool interleave) {
  const at::Tensor qweight = qweight_in.to(at::kInt).contiguous();
  const at::Tensor qzeros = qzeros_in.to(at::kInt).contiguous();
  const at::Tensor scales = scales_in.to(at::kHalf).contiguous();
  const int64_t k = qweight.size(0), n = qweight.size(1) * 8, groups = qzeros.size(0);
  TORCH_CHECK(n % BLOCK == 0, "moegi int4: output channels (", n, ") must be a multiple of 64");
  TORCH_CHECK(groups > 0 && k % groups == 0 && (k / groups) % QBLOCK == 0,
              "moegi int4: the group size must be a multiple of ", QBLOCK);
  TORCH_CHECK(!interleave || n % (2 * BLOCK) == 0, "moegi int4: halves must be whole blocks");
  TORCH_CHECK(scales.size(0) == groups && scales.size(1) == n && qzeros.size(1) * 8 == n,
              "moegi int4: qzeros and scales do not match qweight");
  const int64_t blocks = n / BLOCK;
  static constexpr int kInverse[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // column -> nibble in a word
  at::Tensor w = at::empty({n, k / 2}, at::TensorOptions().dtype(at::kByte));
  at::Tensor s = at::empty({blocks, groups, BLOCK}, at::TensorOptions().dtype(at::kHalf));
  at::Tensor z = at::empty({blocks, groups, BLOCK}, at::TensorOptions().dtype(at::kByte));
  const int32_t* qw = qweight.data_ptr<int32_t>();
  const int32_t* qz = qzeros.data_ptr<int32_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  uint8_t* wo = w.data_ptr<uint8_t>();
  c10::Half* so = s.data_ptr<c10::Half>();
  uint8_t* zo = z.data_ptr<uint8_t>();
  auto nibble = [](const int32_t* row, int64_t col) {
    return static_cast<uint8_t>((static_cast<uint32_t>(row[col / 8]) >> (4 * kInverse[col % 8])) & 15u);
  };
  at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      // Output block b holds source channels from `first` on.
      const int64_t first = interleave ? ((b % 2) * (n / 2) + (b / 2) * BLOCK) : b * BLOCK;
      uint8_t* dst = wo + b * (k / STEP) * STEP_BYTES;
      for (int64_t st = 0; st < k / STEP; ++st)
        for (int64_t c = 0; c < BLOCK; ++c)
          for (int pb = 0; pb < 4; ++pb) {
            const int32_t* row = qw + (st * STEP + pb) * (n / 8);
            dst[st * STEP_BYTES + (c / 16) * 64 + (c % 16) * 4 + pb] = static_cast<uint8_t>(
                nibble(row, first + c) | (nibble(row + 4 * (n / 8), first + c) << 4));
          }
      for (int64_t q = 0; q < groups; ++q)
        for (int64_t c = 0; c < BLOCK; ++c) {
          so[(b * groups + q) * BLOCK + c] = sc[q * n + first + c];
          zo[(b * groups + q) * BLOCK + c] = nibble(qz + q * (n / 8), first + c);
        }
    }
  });
  return {w, s, z};
}

std::string isa() {
  switch (isa_now()) {
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace

TORCH_LIBRARY(moegi_native, m) {
  m.def("linear(Tensor x, Tensor w, Tensor s, Tensor z, Tensor? bias) -> Tensor");
  m.def("moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w13, Tensor s13, Tensor z13, "
        "Tensor w2, Tensor s2, Tensor z2, bool weight_on_input) -> Tensor");
  m.def("repack(Tensor qweight, Tensor qzeros, Tensor scales, bool interleave) -> (Tensor, Tensor, Tensor)");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(moegi_native, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe", &moe);
  m.impl("repack", &repack);
}

}  // namespace moegi
