// Exact paged decode attention on the CPU, reading the pages where they lie.
//
// One query token per request attends its sequence's keys through a block
// table, for one or more units of KV heads of one layer. A unit's pages are
// one contiguous tensor (a view into the host tier, or a resident run):
//
//     pages [N, 2, B, H, D]          N blocks, K then V, B tokens per block,
//                                    H KV heads in the unit, D head dim
//     K of token t (of block b), head h:  pages + ((b * 2 + 0) * B + t) * H * D + h * D
//     V of the same token:                pages + ((b * 2 + 1) * B + t) * H * D + h * D
//
// KV head h of a unit whose first head is f serves query heads
// (f + h) * Q .. (f + h + 1) * Q - 1 (Q query heads per KV head): one pass over
// a head's keys serves all of them.
//
// Work is split into items (unit, request, head range, page range): a long
// sequence is cut into page ranges (split-K) so that one request keeps every
// thread busy. An item attends all the heads of its range over a tile of at
// most kTile tokens before moving on, so the tile's rows (the heads of a token
// side by side) are read from memory once, in order; the heads of a unit are
// cut into ranges only when there would be too few items for the threads.
// Each head runs an online softmax in fp32; items of one split sequence leave
// (max, sum, unnormalized output) partials that a second pass merges by
// log-sum-exp. Pages outside [first key, sequence end) are never read.
//
// Instruction paths, chosen at build time (`headinfer_cpu_attention_isa` names the one built):
//
//   amx         bf16 keys scored by AMX tile products (TDPBF16PS: bf16 products summed in
//               fp32) straight from the pages, 16 keys a tile; values as avx512. Needs
//               __AMX_TILE__ and __AMX_BF16__ and Linux's permission (else avx512 at run time).
//   avx512bf16pv  AVX-512 (16 floats a register), bf16 multiplied with VDPBF16PS (bf16 products
//               summed in fp32, twice an FMA's work): keys scored (the query unscaled, the scale
//               applied to the sums), and values weighted by the probabilities rounded to bf16 (as the
//               prefill paths, torch's SDPA and vLLM's CPU kernel round them). Needs __AVX512BF16__.
//   avx512bf16  keys scored as avx512bf16pv, values weighted as avx512 (fp32 probabilities, fp32
//               FMAs). Needs __AVX512BF16__.
//   avx512      AVX-512F/BW: 32 keys' or values' elements widened to fp32 in registers per
//               load, fp32 FMAs; scores of 16 (query, key) pairs reduced by one transpose.
//   portable    GCC/Clang vector extensions of 8 floats (AVX2 on x86, two NEON registers on
//               Arm): no intrinsics needed.
//
// Prefill (headinfer_prefill_attention), bf16 (headinfer_cpu_prefill_isa() names the path built):
//   amx         AMX tiles where the compiler, CPU and Linux allow (run_prefill_item_amx): the default
//               build's and the amx path's.
//   avx512bf16  VDPBF16PS over bf16 pairs, fp32 softmax (run_prefill_item_wide with DotProducts): the
//               avx512bf16 and avx512bf16pv paths', and the default build's where the CPU has AVX-512
//               BF16 but no AMX (or Linux refuses it).
//   avx512      fp32 FMAs (run_prefill_item_wide with FmaProducts): the avx512 path's, and float32
//               and float16 on every AVX-512 path.
//
// The AVX-512 paths serve head dims that are a multiple of 32; other head dims take the
// portable code in the same build (AMX also wants bf16, blocks of >= 16 tokens and <= 16 query
// heads per KV head, else avx512; VDPBF16PS wants bf16, else avx512). A default build takes, for
// decode, avx512 on a CPU with AMX tiles (on the one measured, Sapphire Rapids, VDPBF16PS ran at
// half the FMAs' rate and neither amx nor avx512bf16pv beat avx512); on one with AVX-512 BF16 and
// no AMX, avx512bf16pv where 512-bit FMAs are split in two halves (AMD Zen 4, family 0x19, where
// VDPBF16PS runs at the FMAs' rate: the bf16 weighted sum raised the in-cache rate 1.10-1.23x) and
// avx512bf16 elsewhere (AMD Zen 5, family 0x1a: 0-7% slower in cache, 5-17% faster from DRAM;
// decided at run time, bf16_values()); else avx512 where the CPU has AVX-512, else portable
// (benchmarks/bench_cpu_attention.py measures each). -DHEADINFER_CPU_ATTENTION_AMX,
// -DHEADINFER_CPU_ATTENTION_BF16_PV, -DHEADINFER_CPU_ATTENTION_BF16_DOT and
// -DHEADINFER_CPU_ATTENTION_FMA (FMAs only, decode and prefill) ask for amx, avx512bf16pv,
// avx512bf16 and avx512; -DHEADINFER_CPU_ATTENTION_PORTABLE for the portable code (tests and
// benchmarks build each).
// C++17 and OpenMP; no torch headers.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__) || defined(__F16C__) || defined(__FMA__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(HEADINFER_CPU_ATTENTION_PORTABLE)
#define HEADINFER_AVX512 1
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define HEADINFER_AMX_TILES 1  // this compiler and CPU take AMX tiles (used if Linux permits, at run time)
#include <sys/syscall.h>
#include <unistd.h>
#if !defined(HEADINFER_CPU_ATTENTION_FMA) && !defined(HEADINFER_CPU_ATTENTION_BF16_DOT) && \
    !defined(HEADINFER_CPU_ATTENTION_BF16_PV)
#define HEADINFER_AMX_PREFILL 1
#endif
#if defined(HEADINFER_CPU_ATTENTION_AMX)
#define HEADINFER_AMX 1
#endif
#endif
#if defined(__AVX512BF16__) && !defined(HEADINFER_CPU_ATTENTION_FMA)
#if !defined(HEADINFER_AMX) && (defined(HEADINFER_CPU_ATTENTION_BF16_DOT) || defined(HEADINFER_CPU_ATTENTION_BF16_PV) || \
                                !defined(HEADINFER_AMX_TILES))
#define HEADINFER_AVX512_BF16 1  // decode by VDPBF16PS: asked for, or the default without AMX tiles (see above)
#include <cpuid.h>                // bf16_values()
#endif
#define HEADINFER_BF16_DOT_PREFILL 1  // bf16 prefill by VDPBF16PS where AMX prefill is not built or not permitted
#endif
#endif

namespace {

typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

constexpr int kTile = 32;                // tokens scored and accumulated together
constexpr int kPrefetchTiles = 1;        // tiles prefetched ahead of the one attended
constexpr int64_t kMinSplitTokens = 512;  // a split reads at least this many keys per head
constexpr int kItemsPerThread = 2;        // split until there are this many items per thread
constexpr int64_t kMinBytesPerThread = 256 << 10;  // smaller calls use fewer threads

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum Status : int {
  kOk = 0,
  kBadDType = 1,
  kBadShape = 2,
  kBlockOutOfRange = 3,
  kSequenceTooLong = 4,
};

// Conversions -------------------------------------------------------------------------------

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    return bits_to_float(float_to_bits(float(mantissa) * 0x1p-24f) | sign);
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

// Round to nearest even (F. Giesen's float_to_half_fast3_rtne).
inline uint16_t float_to_half(float value) {
  uint32_t f = float_to_bits(value);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  const uint32_t f32_infinity = 255u << 23, f16_overflow = (127u + 16) << 23;
  const uint32_t denormal_magic = ((127u - 15) + (23 - 10) + 1) << 23;
  uint16_t out;
  if (f >= f16_overflow) {
    out = f > f32_infinity ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {  // subnormal or zero in fp16: let the fp32 adder round
    out = uint16_t(float_to_bits(bits_to_float(f) + bits_to_float(denormal_magic)) - denormal_magic);
  } else {
    const uint32_t mantissa_odd = (f >> 13) & 1u;
    f += (uint32_t(15 - 127) << 23) + 0xfffu + mantissa_odd;
    out = uint16_t(f >> 13);
  }
  return uint16_t(out | (sign >> 16));
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float value) {  // round to nearest even; NaN stays NaN
  const uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// Element<DT>::load16 converts 16 consecutive elements to two vectors of 8 floats, in an order
// that is cheapest for the dtype: element i lands in slot(i) of (first vector, second vector).
// Queries and accumulators are kept in that order too (see `to_slots`), so dot products and
// sums need no shuffles; only the last head_dim % 16 elements stay in natural order.
template <int DT>
struct Element;

template <>
struct Element<kFloat32> {
  using T = float;
  static float to_float(T x) { return x; }
  static T from_float(float x) { return x; }
  static int slot(int i) { return i; }
  static int wide_slot(int i) { return i; }
  static void load16(const T* p, f32x8& first, f32x8& second) {
    std::memcpy(&first, p, sizeof first);
    std::memcpy(&second, p + 8, sizeof second);
  }
};

template <>
struct Element<kBFloat16> {  // even elements, then odd ones: one load, a shift and a mask
  using T = uint16_t;
  static float to_float(T x) { return bf16_to_float(x); }
  static T from_float(float x) { return float_to_bf16(x); }
  static int slot(int i) { return (i & 1) * 8 + (i >> 1); }
  static int wide_slot(int i) { return (i & 1) * 16 + (i >> 1); }
  static void load16(const T* p, f32x8& first, f32x8& second) {
    u32x8 pairs;
    std::memcpy(&pairs, p, sizeof pairs);
    first = (f32x8)(pairs << 16);
    second = (f32x8)(pairs & 0xffff0000u);
  }
};

template <>
struct Element<kFloat16> {
  using T = uint16_t;
  static float to_float(T x) { return half_to_float(x); }
  static T from_float(float x) { return float_to_half(x); }
  static int slot(int i) { return i; }
  static int wide_slot(int i) { return i; }
  static f32x8 load8(const T* p) {
#if defined(__F16C__)
    return (f32x8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#elif defined(__aarch64__)
    typedef __fp16 f16x8 __attribute__((vector_size(16)));
    f16x8 h;
    std::memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, f32x8);
#else
    f32x8 v;
    for (int i = 0; i < 8; ++i) v[i] = half_to_float(p[i]);
    return v;
#endif
  }
  static void load16(const T* p, f32x8& first, f32x8& second) {
    first = load8(p);
    second = load8(p + 8);
  }
};

// Vector helpers ----------------------------------------------------------------------------

inline f32x8 load_floats(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_floats(float* p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

inline f32x8 broadcast(float x) { return f32x8{x, x, x, x, x, x, x, x}; }

inline f32x8 multiply_add(f32x8 a, f32x8 b, f32x8 c) {  // a * b + c, fused where the CPU has FMA
#if defined(__FMA__) && defined(__AVX__)
  return (f32x8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

inline float horizontal_sum(f32x8 v) {
#if defined(__AVX__)
  __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
#else
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
#endif
}

#if defined(__AVX512F__)
typedef float f32x16 __attribute__((vector_size(64)));

inline f32x16 multiply_add(f32x16 a, f32x16 b, f32x16 c) {  // a * b + c, fused, 16 lanes
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
#endif

// exp(x) for x <= 0 (Cephes expf: about 1 ulp); 0 below fp32's normal range; NaN stays NaN. V: a
// vector of 8 floats, or of 16 where the build has AVX-512 (the same polynomial, lane for lane).
template <typename V>
inline V exp_nonpositive(V x) {
  using I = decltype(x < x);  // the integer vector of V's width
  const V lowest = V{} - 87.33f;
  const I in_range = ~(x < lowest);  // all ones where x >= lowest, or NaN
  x = x < lowest ? lowest : x;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V n = (x * 1.44269504088896341f + magic) - magic;
  x = multiply_add(n, V{} - 0.693359375f, x);
  x = multiply_add(n, V{} + 2.12194440e-4f, x);
  V y = V{} + 1.9875691500e-4f;
  y = multiply_add(y, x, V{} + 1.3981999507e-3f);
  y = multiply_add(y, x, V{} + 8.3334519073e-3f);
  y = multiply_add(y, x, V{} + 4.1665795894e-2f);
  y = multiply_add(y, x, V{} + 1.6666665459e-1f);
  y = multiply_add(y, x, V{} + 5.0000001201e-1f);
  y = multiply_add(y, x * x, x) + 1.0f;
  const I exponent = (__builtin_convertvector(n, I) + 127) << 23;
  return (V)((I)(y * (V)exponent) & in_range);
}

// Kernels over one tile ---------------------------------------------------------------------
//
// A tile is up to kTile consecutive keys of one head, in runs that each lie in one page (a run's
// rows are `stride` elements apart). Queries and accumulators: rows of D fp32 in slot order.
// Scores, then probabilities: row q at q * kTile.

template <typename T>
struct Tile {
  int num_runs = 0, num_tokens = 0;
  const T* keys[kTile];
  const T* values[kTile];
  int lengths[kTile];

  void add(const T* key_rows, const T* value_rows, int length) {
    keys[num_runs] = key_rows, values[num_runs] = value_rows, lengths[num_runs] = length;
    ++num_runs, num_tokens += length;
  }

  // The same tokens, `elements` further along each row (another head).
  Tile shifted(int64_t elements) const {
    Tile tile = *this;
    for (int run = 0; run < num_runs; ++run) tile.keys[run] += elements, tile.values[run] += elements;
    return tile;
  }
};

// Brings the line at `address` into the L2 cache. Inline assembly on x86: GCC's vectorizer drops
// __builtin_prefetch from the loops it vectorizes.
inline void prefetch_l2(const void* address) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__ volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(address)));
#else
  __builtin_prefetch(address, 0, 2);
#endif
}

// The K and V rows of the next tile, prefetched a few at a time while this tile is scored and its
// values weighted, so that memory and arithmetic overlap (a burst of prefetches would stall the
// loads that follow it, and prefetching only while scoring left the memory idle while weighting: on
// AMD Zen 4 spreading them over both raised the share of read bandwidth by about 10 points, README).
// The rows are `row_bytes` long (the heads an item attends); the kernels pass over a tile's keys
// `passes` times (prefetch_passes), each pass a step per key, so a step prefetches 1/passes of a
// row per key. The K rows are listed as spans of bytes: a run's rows when they lie end to end (the
// item attends all of its unit's heads), else one span a row.
template <typename T>
struct Prefetch {
  // Where the prefetches stand. A loop that steps it works on a copy (`auto cursor = prefetch.at;`,
  // saved back after the loop), which the compiler keeps in registers: stepping the struct's own
  // fields reloaded and stored them at every step, since any vector store may alias them (on AMD
  // Zen 4 the copy raised the in-cache rate of units of one head by 2-9%, alternated A/Bs).
  struct Cursor {
    const char* line = nullptr;  // next K line to prefetch; null once the tile is done
    const char* end = nullptr;   // end of its span
    int next = 0;                // the span after it
    int64_t elements = 0;        // steps_of_part: the parts of a key's step taken so far, in row elements
    const Prefetch* spans = nullptr;

    __attribute__((always_inline)) void step(int count) {
      const int64_t values = spans->values;
      visit(count * spans->lines_per_key, [&](const char* k_line) {
        prefetch_l2(k_line), prefetch_l2(k_line + values);
      });
    }

    // `part` more of a pass that runs over the keys' rows in chunks, `whole` elements to a row: a
    // step per row that the parts add up to.
    __attribute__((always_inline)) void step_part(int64_t part, int64_t whole) {
      step(int(steps_of_part(part, whole)));
    }

    // Takes the K lines of the next `keys` steps without prefetching them: at most `capacity` of
    // them, to `out`; returns how many.
    int take(int64_t keys, const char** out, int capacity) {
      int count = 0;
      visit(std::min<int64_t>(keys * spans->lines_per_key, capacity),
            [&](const char* k_line) { out[count++] = k_line; });
      return count;
    }

    // The steps that `part` more elements of a chunked pass complete, `whole` elements to a row.
    int64_t steps_of_part(int64_t part, int64_t whole) {
      elements += part;
      const int64_t steps = elements / whole;
      elements -= steps * whole;
      return steps;
    }

    // fn(line) for the next `lines` K lines, a span's at a time. It and step, step_part are forced
    // inline: GCC otherwise called them from the kernels' loops, whose vector registers a call
    // clobbers (the avx512 path measured 5-10% slower in cache).
    template <typename Fn>
    __attribute__((always_inline)) void visit(int64_t lines, Fn&& fn) {
      while (lines > 0 && line != nullptr) {
        const int64_t n = std::min<int64_t>(lines, (end - line + 63) / 64);
        for (int64_t i = 0; i < n; ++i) fn(line + 64 * i);
        lines -= n, line += 64 * n;
        if (line >= end) {
          if (next < spans->num_spans) {
            line = spans->begins[next], end = spans->ends[next], ++next;
          } else {
            line = nullptr;
          }
        }
      }
    }
  };

  const char* begins[kTile];  // the K rows' spans; each V row follows its K row `values` bytes on
  const char* ends[kTile];
  int num_spans = 0;
  int64_t values = 0, row_bytes = 0, stride = 0, lines_per_key = 1;
  Cursor at;

  Prefetch(int64_t block_size, int64_t row_stride, int64_t row_elements, int64_t passes)
      : values(block_size * row_stride * int64_t(sizeof(T))),
        row_bytes(row_elements * int64_t(sizeof(T))),
        stride(row_stride * int64_t(sizeof(T))),
        lines_per_key(std::max<int64_t>(1, ((row_bytes + 63) / 64 + passes - 1) / passes)) {
    at.spans = this;  // nothing to prefetch until reset
  }

  void reset(const Tile<T>& tile) {
    num_spans = 0;
    for (int run = 0; run < tile.num_runs; ++run) {
      const char* first = reinterpret_cast<const char*>(tile.keys[run]);
      if (row_bytes == stride) {
        begins[num_spans] = first, ends[num_spans++] = first + tile.lengths[run] * stride;
        continue;
      }
      for (int t = 0; t < tile.lengths[run]; ++t)
        begins[num_spans] = first + t * stride, ends[num_spans++] = first + t * stride + row_bytes;
    }
    at = num_spans > 0 ? Cursor{begins[0], ends[0], 1, 0, this} : Cursor{nullptr, nullptr, 0, 0, this};
  }

  void step(int count) { at.step(count); }
};

// A pass's share of the prefetches, taken from the cursor before the pass's loop, so that the loop
// carries no prefetch state but its own index: iteration i prefetches its share with at(i), the same
// lines in the same order as stepping the cursor would. On AMD Zen 4 the cursor stepped once per
// pair of keys in accumulate_dot_chunks' loop took registers (its pointers spilled to vector
// registers) and branches there: this form raised the in-cache rate 5-8%, to within 1-4% of not
// prefetching at all, with the rate from DRAM unchanged. Lines past kMaxLines stay with the cursor
// for later passes and the tile's last step. (score_tile_wide keeps the cursor: a pass there, a
// step per 4 keys, measured slower.)
template <typename T>
struct PrefetchPass {
  static constexpr int kMaxLines = 128;
  const char* lines[kMaxLines];
  int count = 0, per_iteration = 0;
  int64_t values;

  // The next `keys` steps' lines, over `iterations` iterations.
  PrefetchPass(Prefetch<T>& prefetch, int iterations, int64_t keys) : values(prefetch.values) {
    count = prefetch.at.take(keys, lines, kMaxLines);
    per_iteration = iterations > 0 ? (count + iterations - 1) / iterations : 0;
  }

  void at(int iteration) const {
    for (int j = 0; j < per_iteration; ++j) {
      const char* k_line = lines[std::min(iteration * per_iteration + j, count - 1)];
      prefetch_l2(k_line), prefetch_l2(k_line + values);
    }
  }
};

// The sums of 8 vectors, as one vector.
inline f32x8 horizontal_sums(f32x8 a, f32x8 b, f32x8 c, f32x8 d, f32x8 e, f32x8 f, f32x8 g, f32x8 h) {
#if defined(__AVX__)
  const __m256 ab = _mm256_hadd_ps((__m256)a, (__m256)b), cd = _mm256_hadd_ps((__m256)c, (__m256)d);
  const __m256 ef = _mm256_hadd_ps((__m256)e, (__m256)f), gh = _mm256_hadd_ps((__m256)g, (__m256)h);
  const __m256 abcd = _mm256_hadd_ps(ab, cd), efgh = _mm256_hadd_ps(ef, gh);
  return (f32x8)_mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20), _mm256_permute2f128_ps(abcd, efgh, 0x31));
#else
  return f32x8{horizontal_sum(a), horizontal_sum(b), horizontal_sum(c), horizontal_sum(d),
               horizontal_sum(e), horizontal_sum(f), horizontal_sum(g), horizontal_sum(h)};
#endif
}

// scores[q * kTile + t] = q_rows[q] . k_rows[t] for QB query rows and TB key rows.
template <int DT, int QB, int TB>
inline void dot_rows(const float* q_rows, int64_t D, const typename Element<DT>::T* k_rows, int64_t stride,
                     float* scores) {
  using E = Element<DT>;
  f32x8 acc[QB * TB];  // acc[q * TB + t]
  for (int i = 0; i < QB * TB; ++i) acc[i] = broadcast(0.0f);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    f32x8 first[TB], second[TB];
    for (int t = 0; t < TB; ++t) E::load16(k_rows + t * stride + d, first[t], second[t]);
    for (int q = 0; q < QB; ++q) {
      const f32x8 q_first = load_floats(q_rows + q * D + d), q_second = load_floats(q_rows + q * D + d + 8);
      for (int t = 0; t < TB; ++t) acc[q * TB + t] = multiply_add(q_second, second[t], multiply_add(q_first, first[t], acc[q * TB + t]));
    }
  }
  if constexpr (QB * TB == 8) {
    if (d == D) {
      const f32x8 sums = horizontal_sums(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
      for (int i = 0; i < 8; ++i) scores[(i / TB) * kTile + i % TB] = sums[i];
      return;
    }
  }
  for (int q = 0; q < QB; ++q) {
    for (int t = 0; t < TB; ++t) {
      float sum = horizontal_sum(acc[q * TB + t]);
      for (int64_t tail = d; tail < D; ++tail) sum += q_rows[q * D + tail] * E::to_float(k_rows[t * stride + tail]);
      scores[q * kTile + t] = sum;
    }
  }
}

template <int DT, int QB>
inline void score_tile(const float* q_rows, int64_t D, const Tile<typename Element<DT>::T>& tile, int64_t stride,
                       float* scores, Prefetch<typename Element<DT>::T>& prefetch) {
  constexpr int TB = QB >= 8 ? 1 : 8 / QB > 4 ? 4 : 8 / QB;  // QB * TB <= 8 accumulators
  auto cursor = prefetch.at;
  for (int run = 0; run < tile.num_runs; ++run) {
    const auto* k_rows = tile.keys[run];
    const int n = tile.lengths[run];
    int t = 0;
    for (; t + TB <= n; t += TB) {
      cursor.step(TB);
      dot_rows<DT, QB, TB>(q_rows, D, k_rows + t * stride, stride, scores + t);
    }
    for (; t < n; ++t) {
      cursor.step(1);
      dot_rows<DT, QB, 1>(q_rows, D, k_rows + t * stride, stride, scores + t);
    }
    scores += n;
  }
  prefetch.at = cursor;
}

// acc[q][d .. d + 16 * NC) += sum_t probs[q * kTile + t] * v[t][d ..] over the tile, sums in registers.
template <int DT, int QB, int NC>
inline void accumulate_chunks(const float* probs, const Tile<typename Element<DT>::T>& tile, int64_t d,
                              int64_t stride, float* acc, int64_t D, Prefetch<typename Element<DT>::T>& prefetch) {
  using E = Element<DT>;
  // Once a chunk: a step per key would slow these short loops.
  prefetch.at.step_part(tile.num_tokens * 16 * NC, D);
  f32x8 sums[QB][2 * NC];
  for (int q = 0; q < QB; ++q)
    for (int j = 0; j < 2 * NC; ++j) sums[q][j] = load_floats(acc + q * D + d + 8 * j);
  for (int run = 0; run < tile.num_runs; ++run) {
    const auto* v_rows = tile.values[run] + d;
    for (int t = 0; t < tile.lengths[run]; ++t) {
      f32x8 values[2 * NC];
      for (int c = 0; c < NC; ++c) E::load16(v_rows + t * stride + 16 * c, values[2 * c], values[2 * c + 1]);
      for (int q = 0; q < QB; ++q) {
        const f32x8 p = broadcast(probs[q * kTile + t]);
        for (int j = 0; j < 2 * NC; ++j) sums[q][j] = multiply_add(p, values[j], sums[q][j]);
      }
    }
    probs += tile.lengths[run];
  }
  for (int q = 0; q < QB; ++q)
    for (int j = 0; j < 2 * NC; ++j) store_floats(acc + q * D + d + 8 * j, sums[q][j]);
}

template <int DT, int QB>
inline void accumulate_tile(const float* probs, const Tile<typename Element<DT>::T>& tile, int64_t stride,
                            float* acc, int64_t D, Prefetch<typename Element<DT>::T>& prefetch) {
  if constexpr (QB > 4) {  // two blocks of 4: 16 accumulators would not fit in registers
    accumulate_tile<DT, 4>(probs, tile, stride, acc, D, prefetch);
    accumulate_tile<DT, QB - 4>(probs + 4 * kTile, tile, stride, acc + 4 * D, D, prefetch);
  } else {
    using E = Element<DT>;
    constexpr int NC = 4 / QB;  // 8 accumulator registers
    int64_t d = 0;
    for (; d + 16 * NC <= D; d += 16 * NC) accumulate_chunks<DT, QB, NC>(probs, tile, d, stride, acc, D, prefetch);
    for (; d + 16 <= D; d += 16) accumulate_chunks<DT, QB, 1>(probs, tile, d, stride, acc, D, prefetch);
    for (; d < D; ++d) {
      const float* p = probs;
      for (int run = 0; run < tile.num_runs; ++run) {
        for (int t = 0; t < tile.lengths[run]; ++t) {
          const float value = E::to_float(tile.values[run][t * stride + d]);
          for (int q = 0; q < QB; ++q) acc[q * D + d] += p[q * kTile + t] * value;
        }
        p += tile.lengths[run];
      }
    }
  }
}

// Query heads in blocks of 8, 4, 2, 1 (register tiles); `fn` gets (first row, block size).
template <typename Fn>
inline void for_query_blocks(int num_queries, Fn&& fn) {
  int q = 0;
  for (; q + 8 <= num_queries; q += 8) fn(q, std::integral_constant<int, 8>());
  if (q + 4 <= num_queries) fn(q, std::integral_constant<int, 4>()), q += 4;
  if (q + 2 <= num_queries) fn(q, std::integral_constant<int, 2>()), q += 2;
  if (q < num_queries) fn(q, std::integral_constant<int, 1>());
}

// The passes over a tile's keys for one head of `num_queries` query rows, each a Prefetch step per
// key: the scores once per block of rows (once for all of them with AMX tiles, `scores_at_once`),
// the values once per block of at most 4 rows (a block of 8 runs as two).
inline int64_t prefetch_passes(int num_queries, bool scores_at_once) {
  int64_t passes = scores_at_once ? 1 : 0;
  for_query_blocks(num_queries, [&](int, auto block) {
    passes += (scores_at_once ? 0 : 1) + (decltype(block)::value + 3) / 4;
  });
  return passes;
}

// Index in slot order of element d of a row of D elements (see Element); `wide`: the AVX-512
// kernels' order (D a multiple of 32, chunks of 32 elements, see Wide).
template <int DT>
inline int64_t to_slots(int64_t d, int64_t D, bool wide) {
  if (wide) return (d & ~int64_t(31)) + Element<DT>::wide_slot(int(d & 31));
  const int64_t chunk = d & ~int64_t(15);
  return chunk + 16 > D ? d : chunk + Element<DT>::slot(int(d & 15));
}

#if defined(HEADINFER_AVX512)
// AVX-512 kernels over one tile ---------------------------------------------------------------
//
// For head dims that are a multiple of 32. The tile's rows are listed one pointer a token
// (`Rows`), padded to a multiple of 16 with copies of the first, so that every block of keys is
// full; the scores of the padding are computed and dropped.

constexpr bool kAvx512 = true;

// Wide<DT>::load32 widens 32 consecutive elements to two registers of 16 floats, element i in
// wide_slot(i) of (first, second); queries and accumulators are kept in that order.
template <int DT>
struct Wide;

template <>
struct Wide<kFloat32> {
  static void load32(const float* p, __m512& first, __m512& second) {
    first = _mm512_loadu_ps(p);
    second = _mm512_loadu_ps(p + 16);
  }
};

template <>
struct Wide<kBFloat16> {  // even elements, then odd ones: one load, a shift and a mask
  static void load32(const uint16_t* p, __m512& first, __m512& second) {
    const __m512i pairs = _mm512_loadu_si512(p);
    first = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    second = _mm512_castsi512_ps(_mm512_and_si512(pairs, _mm512_set1_epi32(int(0xffff0000u))));
  }
};

template <>
struct Wide<kFloat16> {
  static void load32(const uint16_t* p, __m512& first, __m512& second) {
    first = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    second = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
  }
};

template <typename T>
struct Rows {
  int count = 0;  // tokens; the list is padded to a multiple of 16
  const T* rows[kTile + 16];

  Rows(const T* const* runs, const int* lengths, int num_runs, int64_t stride) {
    for (int run = 0; run < num_runs; ++run)
      for (int t = 0; t < lengths[run]; ++t) rows[count++] = runs[run] + t * stride;
    for (int t = count; t % 16 != 0; ++t) rows[t] = rows[0];
  }
};

// Lane i of the result: the sum of the 16 lanes of v[i].
__attribute__((always_inline)) inline __m512 transpose_sums(const __m512* v) {
  __m512 pairs[8], quads[4], halves[2];
  for (int i = 0; i < 8; ++i)  // 128-bit lane j: partial sums of v[2i], v[2i+1], v[2i], v[2i+1]
    pairs[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // 128-bit lane j: partial sums of v[4i] .. v[4i + 3]
    const __m512d a = _mm512_castps_pd(pairs[2 * i]), b = _mm512_castps_pd(pairs[2 * i + 1]);
    quads[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // lanes (0 + 1), (2 + 3) of quads[2i], then of quads[2i + 1]
    halves[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0x88),
                              _mm512_shuffle_f32x4(quads[2 * i], quads[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(halves[0], halves[1], 0x88),
                       _mm512_shuffle_f32x4(halves[0], halves[1], 0xdd));
}

// Lanes q * TB .. q * TB + TB - 1 of `v` to row q (at q * kTile) of `rows`, QB * TB = 16: all TB
// lanes, each row's in one store of its size. (One masked 512-bit store a row took twice as long on
// AMD Zen 4, where a 512-bit store takes two cycles, masked or not, and a 128-bit one about one;
// scalar reloads of a vector just stored would wait for the store to retire.) In score_tile_wide
// the lanes past the tile's keys (the padding rows of Rows) land inside row q, since
// first + TB <= kTile, and nothing reads them.
template <int QB, int TB>
__attribute__((always_inline)) inline void store_rows(__m512 v, float* rows) {
  static_assert(QB * TB == 16 && TB >= 2, "one register: 8, 4, 2 or 1 rows");
  if constexpr (TB == 16) {
    _mm512_storeu_ps(rows, v);
  } else if constexpr (TB == 8) {
    _mm256_storeu_ps(rows, _mm512_castps512_ps256(v));
    _mm256_storeu_ps(rows + kTile, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));  // AVX-512F
  } else if constexpr (TB == 4) {
    _mm_storeu_ps(rows, _mm512_extractf32x4_ps(v, 0));
    _mm_storeu_ps(rows + kTile, _mm512_extractf32x4_ps(v, 1));
    _mm_storeu_ps(rows + 2 * kTile, _mm512_extractf32x4_ps(v, 2));
    _mm_storeu_ps(rows + 3 * kTile, _mm512_extractf32x4_ps(v, 3));
  } else {
    const __m128 lanes[4] = {_mm512_extractf32x4_ps(v, 0), _mm512_extractf32x4_ps(v, 1),
                             _mm512_extractf32x4_ps(v, 2), _mm512_extractf32x4_ps(v, 3)};
    for (int i = 0; i < 4; ++i) {  // 128-bit lane i: rows 2i and 2i + 1
      _mm_storel_pi(reinterpret_cast<__m64*>(rows + 2 * i * kTile), lanes[i]);
      _mm_storeh_pi(reinterpret_cast<__m64*>(rows + (2 * i + 1) * kTile), lanes[i]);
    }
  }
}

// scores[q * kTile + t] = query q . key t over the tile, for QB query rows, 16 / QB keys at a time.
// kDot: bf16 keys against the bf16 query rows `q_bits` (natural order) with VDPBF16PS, sums times
// `scale`; else the fp32 query rows `q_rows` (wide slot order, scaled) with widened keys.
template <int DT, int QB, bool kDot>
inline void score_tile_wide(const float* q_rows, const uint16_t* q_bits, int64_t D, const Rows<typename Element<DT>::T>& keys,
                            int64_t shift, float scale, float* scores, Prefetch<typename Element<DT>::T>& prefetch) {
  constexpr int TB = 16 / QB;
  auto cursor = prefetch.at;
  for (int first = 0; first < keys.count; first += TB) {
    cursor.step(std::min(TB, keys.count - first));
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      for (int t = 0; t < TB; ++t) {
        const auto* k = keys.rows[first + t] + shift + d;
        if constexpr (kDot) {
#if defined(HEADINFER_AVX512_BF16)
          const __m512bh k_pairs = (__m512bh)_mm512_loadu_si512(k);
          for (int q = 0; q < QB; ++q)
            acc[q * TB + t] = _mm512_dpbf16_ps(acc[q * TB + t], (__m512bh)_mm512_loadu_si512(q_bits + q * D + d), k_pairs);
#endif
        } else {
          __m512 k_first, k_second;
          Wide<DT>::load32(k, k_first, k_second);
          for (int q = 0; q < QB; ++q)
            acc[q * TB + t] = _mm512_fmadd_ps(_mm512_loadu_ps(q_rows + q * D + d + 16), k_second,
                                              _mm512_fmadd_ps(_mm512_loadu_ps(q_rows + q * D + d), k_first, acc[q * TB + t]));
        }
      }
    }
    __m512 total = transpose_sums(acc);
    if constexpr (kDot) total = _mm512_mul_ps(total, _mm512_set1_ps(scale));
    store_rows<QB, TB>(total, scores + first);
  }
  prefetch.at = cursor;
}

#if defined(HEADINFER_AMX_TILES)
// Linux lends AMX's tile data to a process that asks for it; false when refused.
bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
}

// Loads this thread's tile configuration (other code may have changed it): tile i of 16 rows of
// bytes_per_row[i] bytes, as many tiles as given.
inline void configure_tiles(std::initializer_list<uint16_t> bytes_per_row) {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
  } config{};
  config.palette = 1;
  int tile = 0;
  for (const uint16_t bytes : bytes_per_row) config.rows[tile] = 16, config.bytes_per_row[tile++] = bytes;
  _tile_loadconfig(&config);
}
#endif

#if defined(HEADINFER_AMX)
// AMX: the scores of 16 keys at a time, S^T [16 keys, Q] += K [16 keys, 32 elements] x Q^T, bf16
// products summed in fp32, for bf16 pages of blocks of at least 16 tokens and Q <= 16. Tiles: 0 and
// 3 the scores, 1 and 4 the keys (16 rows `stride` apart, straight from the page), 2 the queries,
// packed once per item in pairs (VNNI): pair i of chunk c of query q at [(c * 16 + i) * Q + q].

// scores[q * kTile + t] = scale * (query q . key t) over the tile, two groups of 16 keys at a time
// (tiles 0 and 3 the scores, 1 and 4 the keys: two chains of tile products in flight). A run shorter
// than 16 keys is still read 16 rows long: past its end, rows of the same page (a block holds >= 16
// keys, then as many values), whose scores are dropped.
template <typename T>
inline void score_tile_amx(const uint32_t* query_pairs, int Q, int64_t D, const Tile<T>& tile, int64_t shift,
                           int64_t stride, float scale, float* scores, Prefetch<T>& prefetch) {
  struct Group {
    const T* keys;
    int first, valid;  // first key's place in the tile, keys that count
  };
  Group groups[kTile];
  int num_groups = 0, place = 0;
  for (int run = 0; run < tile.num_runs; ++run) {
    for (int first = 0; first < tile.lengths[run]; first += 16)
      groups[num_groups++] = {tile.keys[run] + shift + first * stride, place + first,
                              std::min(16, tile.lengths[run] - first)};
    place += tile.lengths[run];
  }
  const int64_t row_bytes = stride * int64_t(sizeof(T)), pair_bytes = 4 * Q;
  alignas(64) float sums[2][16 * 16];
  auto cursor = prefetch.at;
  for (int g = 0; g < num_groups; g += 2) {
    const bool two = g + 1 < num_groups;
    cursor.step(groups[g].valid + (two ? groups[g + 1].valid : 0));
    _tile_zero(0);
    _tile_zero(3);
    for (int64_t d = 0; d < D; d += 32) {
      _tile_loadd(2, query_pairs + (d / 32) * 16 * Q, pair_bytes);
      _tile_loadd(1, groups[g].keys + d, row_bytes);
      _tile_loadd(4, groups[two ? g + 1 : g].keys + d, row_bytes);
      _tile_dpbf16ps(0, 1, 2);
      _tile_dpbf16ps(3, 4, 2);
    }
    _tile_stored(0, sums[0], pair_bytes);
    _tile_stored(3, sums[1], pair_bytes);
    for (int i = 0; i < (two ? 2 : 1); ++i)
      for (int q = 0; q < Q; ++q)
        for (int t = 0; t < groups[g + i].valid; ++t)
          scores[q * kTile + groups[g + i].first + t] = sums[i][t * Q + q] * scale;
  }
  prefetch.at = cursor;
}
#endif

// acc[q][d .. d + 32 * NC) += sum_t probs[q * kTile + t] * value t [d ..], sums in registers.
// Forced inline: in a build with both weighted sums (avx512bf16), GCC called this from the tile's loop
// and kept `sums` in memory, a store of every accumulator per key (3x slower, AMD Zen 5).
template <int DT, int QB, int NC>
__attribute__((always_inline)) inline void accumulate_wide_chunks(const float* probs,
                                                                  const Rows<typename Element<DT>::T>& values,
                                                                  int64_t shift, int64_t d, float* acc, int64_t D,
                                                                  Prefetch<typename Element<DT>::T>& prefetch) {
  __m512 sums[QB][2 * NC];
  for (int q = 0; q < QB; ++q)
    for (int j = 0; j < 2 * NC; ++j) sums[q][j] = _mm512_loadu_ps(acc + q * D + d + 16 * j);
  const PrefetchPass<typename Element<DT>::T> pass(prefetch, values.count,
                                                   prefetch.at.steps_of_part(values.count * 32 * NC, D));
  for (int t = 0; t < values.count; ++t) {
    pass.at(t);
    __m512 v[2 * NC];
    for (int c = 0; c < NC; ++c) Wide<DT>::load32(values.rows[t] + shift + d + 32 * c, v[2 * c], v[2 * c + 1]);
    for (int q = 0; q < QB; ++q) {
      const __m512 p = _mm512_set1_ps(probs[q * kTile + t]);
      for (int j = 0; j < 2 * NC; ++j) sums[q][j] = _mm512_fmadd_ps(p, v[j], sums[q][j]);
    }
  }
  for (int q = 0; q < QB; ++q)
    for (int j = 0; j < 2 * NC; ++j) _mm512_storeu_ps(acc + q * D + d + 16 * j, sums[q][j]);
}

template <int DT, int QB>
inline void accumulate_tile_wide(const float* probs, const Rows<typename Element<DT>::T>& values, int64_t shift, float* acc,
                                 int64_t D, Prefetch<typename Element<DT>::T>& prefetch) {
  if constexpr (QB > 4) {  // two blocks of 4: 16 accumulators each
    accumulate_tile_wide<DT, 4>(probs, values, shift, acc, D, prefetch);
    accumulate_tile_wide<DT, QB - 4>(probs + 4 * kTile, values, shift, acc + 4 * D, D, prefetch);
  } else {
    constexpr int NC = QB == 4 ? 2 : 4;  // at most 16 accumulators, 8 values
    int64_t d = 0;
    for (; d + 32 * NC <= D; d += 32 * NC)
      accumulate_wide_chunks<DT, QB, NC>(probs, values, shift, d, acc, D, prefetch);
    if constexpr (NC >= 4) {
      if (d + 64 <= D) accumulate_wide_chunks<DT, QB, 2>(probs, values, shift, d, acc, D, prefetch), d += 64;
    }
    if constexpr (NC >= 2) {
      if (d + 32 <= D) accumulate_wide_chunks<DT, QB, 1>(probs, values, shift, d, acc, D, prefetch), d += 32;
    }
  }
}
#if defined(HEADINFER_BF16_DOT_PREFILL)
// The elements of two rows x and y (32 bf16 each) in pairs for VDPBF16PS, in the wide slot order of
// Wide<kBFloat16>: word j of `even` = (x[2j], y[2j]), of `odd` = (x[2j + 1], y[2j + 1]).
inline void pair_rows(__m512i x, __m512i y, __m512i& even, __m512i& odd) {
  const __mmask32 high_halves = 0xAAAAAAAAu;
  even = _mm512_mask_blend_epi16(high_halves, x, _mm512_slli_epi32(y, 16));
  odd = _mm512_mask_blend_epi16(high_halves, _mm512_srli_epi32(x, 16), y);
}
#endif

#if defined(HEADINFER_AVX512_BF16)
// acc[q][d .. d + 32 * NC) += sum over the tile's key pairs u of (p[q][2u], p[q][2u + 1]) . (v_2u[d'], v_2u+1[d'])
// by VDPBF16PS: `prob_pairs` [QB][kTile / 2] the probabilities rounded to bf16 in pairs of keys (0 past the
// tile); the values packed in pairs per load (pair_rows). A tile of an odd
// number of keys pairs its last with the padding row (Rows), whose probability is 0.
template <int QB, int NC>
inline void accumulate_dot_chunks(const uint32_t* prob_pairs, const Rows<uint16_t>& values, int64_t shift, int64_t d,
                                  float* acc, int64_t D, Prefetch<uint16_t>& prefetch) {
  __m512 sums[QB][2 * NC];
  for (int q = 0; q < QB; ++q)
    for (int j = 0; j < 2 * NC; ++j) sums[q][j] = _mm512_loadu_ps(acc + q * D + d + 16 * j);
  const int pairs = (values.count + 1) / 2;
  const PrefetchPass<uint16_t> pass(prefetch, pairs, prefetch.at.steps_of_part(pairs * 2 * 32 * NC, D));
  for (int t = 0; t < values.count; t += 2) {
    pass.at(t / 2);
    __m512i v[2 * NC];
    for (int c = 0; c < NC; ++c)
      pair_rows(_mm512_loadu_si512(values.rows[t] + shift + d + 32 * c),
                _mm512_loadu_si512(values.rows[t + 1] + shift + d + 32 * c), v[2 * c], v[2 * c + 1]);
    for (int q = 0; q < QB; ++q) {
      const __m512bh p = (__m512bh)_mm512_set1_epi32(int(prob_pairs[q * (kTile / 2) + t / 2]));
      for (int j = 0; j < 2 * NC; ++j) sums[q][j] = _mm512_dpbf16_ps(sums[q][j], p, (__m512bh)v[j]);
    }
  }
  for (int q = 0; q < QB; ++q)
    for (int j = 0; j < 2 * NC; ++j) _mm512_storeu_ps(acc + q * D + d + 16 * j, sums[q][j]);
}

// accumulate_tile_wide by VDPBF16PS, the probabilities rounded to bf16 (as the prefill paths round them).
template <int QB>
inline void accumulate_tile_dot(const float* probs, const Rows<uint16_t>& values, int64_t shift, float* acc,
                                int64_t D, Prefetch<uint16_t>& prefetch) {
  if constexpr (QB > 4) {
    accumulate_tile_dot<4>(probs, values, shift, acc, D, prefetch);
    accumulate_tile_dot<QB - 4>(probs + 4 * kTile, values, shift, acc + 4 * D, D, prefetch);
  } else {
    static_assert(kTile == 32, "a row of probabilities is two registers");
    const __mmask16 low = __mmask16(values.count >= 16 ? 0xffffu : (1u << values.count) - 1);
    const __mmask16 high = __mmask16(values.count > 16 ? (1u << (values.count - 16)) - 1 : 0u);
    alignas(64) uint32_t prob_pairs[QB][kTile / 2];
    for (int q = 0; q < QB; ++q) {
      const __m512 first = _mm512_maskz_loadu_ps(low, probs + q * kTile);
      const __m512 second = _mm512_maskz_loadu_ps(high, probs + q * kTile + 16);
      _mm512_store_si512(prob_pairs[q], (__m512i)_mm512_cvtne2ps_pbh(second, first));
    }
    constexpr int NC = QB == 4 ? 2 : 4;
    int64_t d = 0;
    for (; d + 32 * NC <= D; d += 32 * NC) accumulate_dot_chunks<QB, NC>(prob_pairs[0], values, shift, d, acc, D, prefetch);
    if constexpr (NC >= 4) {
      if (d + 64 <= D) accumulate_dot_chunks<QB, 2>(prob_pairs[0], values, shift, d, acc, D, prefetch), d += 64;
    }
    if constexpr (NC >= 2) {
      if (d + 32 <= D) accumulate_dot_chunks<QB, 1>(prob_pairs[0], values, shift, d, acc, D, prefetch), d += 32;
    }
  }
}
#endif
#else
constexpr bool kAvx512 = false;
#endif

// Online softmax over one tile of scores (one row per query head): updates the running max and
// sum, rescales the accumulators where the max grew, and leaves exp(score - max) in `scores`.
// Masked scores are -inf (prefill); a row masked in every tile so far gets zeros.
inline void softmax_tile(float* scores, int num_tokens, int num_queries, int64_t d_total, float* running_max,
                         float* running_sum, float* acc) {
  for (int q = 0; q < num_queries; ++q) {
    float* row = scores + q * kTile;
    f32x8 maxima = broadcast(row[0]);
    int t = 0;
    for (; t + 8 <= num_tokens; t += 8) {
      const f32x8 v = load_floats(row + t);
      maxima = maxima > v ? maxima : v;
    }
    float tile_max = maxima[0];
    for (int i = 1; i < 8; ++i) tile_max = std::max(tile_max, maxima[i]);
    for (; t < num_tokens; ++t) tile_max = std::max(tile_max, row[t]);
    const float old_max = running_max[q];
    if (tile_max == -std::numeric_limits<float>::infinity() && old_max == tile_max) {
      std::fill(row, row + num_tokens, 0.0f);  // every key so far masked (prefill): nothing to add
      continue;
    }
    if (tile_max > old_max) {
      if (old_max != -std::numeric_limits<float>::infinity()) {
        const float correction = std::exp(old_max - tile_max);
        running_sum[q] *= correction;
        float* out = acc + q * d_total;
        for (int64_t d = 0; d < d_total; ++d) out[d] *= correction;
      }
      running_max[q] = tile_max;
    }
    const f32x8 shift = broadcast(running_max[q]);
    f32x8 sum = broadcast(0.0f);
    t = 0;
    for (; t + 8 <= num_tokens; t += 8) {
      const f32x8 p = exp_nonpositive(load_floats(row + t) - shift);
      store_floats(row + t, p);
      sum += p;
    }
    float total = horizontal_sum(sum);
    if (t < num_tokens) {
      f32x8 rest = shift;
      for (int i = 0; t + i < num_tokens; ++i) rest[i] = row[t + i];
      const f32x8 p = exp_nonpositive(rest - shift);
      for (int i = 0; t + i < num_tokens; ++i) row[t + i] = p[i], total += p[i];
    }
    running_sum[q] += total;
  }
}

#if defined(HEADINFER_AVX512)
// softmax_tile in registers of 16 floats (a tile's row is two of them): the same results but for
// the order of the sums' additions. The running sums stay in 16 lanes a row (`sum_lanes`
// [num_queries][16]) until the caller adds them up at the end: a horizontal sum per row and tile
// cost 3-5% of the in-cache rate on AMD Zen 4.
inline void softmax_tile_wide(float* scores, int num_tokens, int num_queries, int64_t d_total, float* running_max,
                              float* sum_lanes, float* acc) {
  static_assert(kTile == 32, "a row of scores is two registers");
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const __mmask16 low = __mmask16(num_tokens >= 16 ? 0xffffu : (1u << num_tokens) - 1);
  const __mmask16 high = __mmask16(num_tokens > 16 ? (1u << (num_tokens - 16)) - 1 : 0u);
  for (int q = 0; q < num_queries; ++q) {
    float* row = scores + q * kTile;
    const __m512 first = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), low, row);
    const __m512 second = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), high, row + 16);
    const float old_max = running_max[q];
    // Whether the max grows, by two compares: most tiles' scores stay under it, and then neither a
    // horizontal max nor a branch on its result sits between the scores and their exps.
    const __m512 old = _mm512_set1_ps(old_max);
    if (!(_mm512_cmp_ps_mask(first, old, _CMP_GT_OQ) | _mm512_cmp_ps_mask(second, old, _CMP_GT_OQ))) {
      if (old_max == kNegInf) {  // every key so far masked (prefill)
        _mm512_mask_storeu_ps(row, low, _mm512_setzero_ps());
        _mm512_mask_storeu_ps(row + 16, high, _mm512_setzero_ps());
        continue;
      }
    } else {
      const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(first, second));
      if (old_max != kNegInf) {
        const float correction = std::exp(old_max - tile_max);
        float* sum = sum_lanes + 16 * q;
        _mm512_storeu_ps(sum, _mm512_mul_ps(_mm512_loadu_ps(sum), _mm512_set1_ps(correction)));
        float* out = acc + q * d_total;
        for (int64_t d = 0; d < d_total; d += 16)  // d_total: a multiple of 32 on this path
          _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(out + d), _mm512_set1_ps(correction)));
      }
      running_max[q] = tile_max;
    }
    const f32x16 shift = f32x16{} + running_max[q];  // masked lanes: exp(-inf) = 0
    const __m512 p_first = (__m512)exp_nonpositive((f32x16)first - shift);
    const __m512 p_second = (__m512)exp_nonpositive((f32x16)second - shift);
    _mm512_mask_storeu_ps(row, low, p_first);
    _mm512_mask_storeu_ps(row + 16, high, p_second);
    float* sum = sum_lanes + 16 * q;
    _mm512_storeu_ps(sum, _mm512_add_ps(_mm512_loadu_ps(sum), _mm512_add_ps(p_first, p_second)));
  }
}
#endif

// The call ----------------------------------------------------------------------------------

struct Call {
  int dtype;
  int num_units;
  const void* const* unit_pages;
  const int64_t* unit_heads;
  const int64_t* unit_first_head;
  int64_t num_blocks, block_size, head_dim, query_per_kv, num_requests;
  const void* query;
  int64_t query_row_stride, query_head_stride;
  void* out;
  int64_t out_row_stride, out_head_stride;
  const int32_t* block_table;
  int64_t block_table_stride, max_blocks;
  const int32_t* seq_lens;
  float scale;
  int64_t sliding_window;
  float logits_soft_cap;
  const float* sinks;
};

// The keys of KV heads [first_head, first_head + num_heads) of a unit, for one request, in pages
// [first_page, end_page).
struct Item {
  int32_t unit, request, first_head, num_heads;
  int64_t first_page, end_page;
  int64_t partial;  // offset of this item's partials (one per head, in turn) in the partials buffer; -1: none
};

// A (unit, request, head) whose keys were split: its items' partials, to merge.
struct Merge {
  int32_t unit, request, head, num_splits;
  int64_t first_partial, split_stride;  // split i's partial of this head: first_partial + i * split_stride
};

struct Keys {
  int64_t begin, end;  // key positions attended: [begin, end)
};

inline Keys keys_of(const Call& c, int64_t request) {
  const int64_t length = c.seq_lens[request];
  if (length <= 0) return {0, 0};
  const int64_t begin = c.sliding_window > 0 ? std::max<int64_t>(0, length - c.sliding_window) : 0;
  return {begin, length};
}

// Whether the call takes the AVX-512 kernels (else the portable ones).
bool is_wide(const Call& c) { return kAvx512 && c.head_dim % 32 == 0; }

// Whether its keys are scored with AMX tiles (an item of Q <= 16 query heads per KV head).
template <int DT>
bool is_amx(const Call& c) {
#if defined(HEADINFER_AMX)
  return DT == kBFloat16 && is_wide(c) && c.query_per_kv <= 16 && c.block_size >= 16 && amx_permitted();
#else
  return false;
#endif
}

// Whether its keys are scored with VDPBF16PS.
template <int DT>
bool is_bf16_dot(const Call& c) {
#if defined(HEADINFER_AVX512_BF16)
  return DT == kBFloat16 && is_wide(c);
#else
  return false;
#endif
}

// Whether calls whose keys are scored with VDPBF16PS weight the values with it too (avx512bf16pv), else
// with fp32 FMAs (avx512bf16). By default, on AMD family 0x19 (Zen 4, the only one of that family with
// AVX-512 BF16): its 512-bit FMAs run as two 256-bit halves, so VDPBF16PS's two products a lane doubled
// the weighted sum's rate there (the in-cache rate rose 1.10-1.23x, README). On Zen 5 (family 0x1a),
// whose FMAs are 512 bits wide, the FMAs took 0-7% longer in cache (C++ A/Bs and bench_cpu_attention) and
// read 5-17% faster from DRAM (two C++ A/Bs, 2 threads, 16-24 alternated calls a shape, both unit
// layouts); they also keep the probabilities in fp32.
bool bf16_values() {
#if defined(HEADINFER_CPU_ATTENTION_BF16_PV)
  return true;
#elif defined(HEADINFER_CPU_ATTENTION_BF16_DOT) || !defined(HEADINFER_AVX512_BF16)
  return false;
#else
  static const bool zen4 = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
    const bool amd = ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
    const unsigned family = (eax >> 8) & 0xf;
    return (family == 0xf ? family + ((eax >> 20) & 0xff) : family) == 0x19;
  }();
  return zen4;
#endif
}

int64_t query_head(const Call& c, int unit, int head, int q) {
  return (c.unit_first_head[unit] + head) * c.query_per_kv + q;
}

// Partials hold, per query head: max, sum, then head_dim accumulator values.
int64_t partial_floats(const Call& c) { return c.query_per_kv * (c.head_dim + 2); }

// What query head `global`'s accumulator is multiplied by: 1 / (its softmax sum, the sink's term
// added where the layer has sinks); 0 for a row that saw no key.
inline float output_weight(const Call& c, int64_t global, float max, float sum) {
  float factor = 1.0f;
  if (c.sinks != nullptr) {
    const float top = std::max(max, c.sinks[global]);
    factor = max == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(max - top);
    sum = sum * factor + std::exp(c.sinks[global] - top);
  }
  return sum > 0.0f ? factor / sum : 0.0f;
}

#if defined(HEADINFER_AVX512)
// 16 floats as Element<kBFloat16>::from_float rounds them (float_to_bf16, NaN kept quiet).
inline __m256i floats_to_bf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x), high = _mm512_srli_epi32(bits, 16);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)))), 16);
  const __m512i quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), quiet));
}

// 16 floats as Element<kFloat16>::from_float rounds them (float_to_half): F16C's rounding, which
// matches it on every input but NaNs, whose payload F16C keeps; float_to_half gives 0x7e00 and the sign.
inline __m256i floats_to_half(__m512 x) {
  const __m512i half = _mm512_cvtepu16_epi32(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i sign = _mm512_srli_epi32(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(int(0x80000000u))), 16);
  const __m512i nan = _mm512_or_si512(sign, _mm512_set1_epi32(0x7e00));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(half, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), nan));
}

// out[0 .. 32) = `weight` times the 32 accumulators of one chunk (`acc`, wide slot order: Wide), in the
// output dtype, element for element as write_output's scalar loop would write them.
template <int DT>
inline void write_chunk_wide(typename Element<DT>::T* out, const float* acc, __m512 weight) {
  const __m512 first = _mm512_mul_ps(_mm512_loadu_ps(acc), weight);
  const __m512 second = _mm512_mul_ps(_mm512_loadu_ps(acc + 16), weight);
  if constexpr (DT == kFloat32) {
    _mm512_storeu_ps(out, first);
    _mm512_storeu_ps(out + 16, second);
  } else if constexpr (DT == kFloat16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), floats_to_half(first));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16), floats_to_half(second));
  } else {  // even elements in `first`, odd ones in `second`: interleave them back
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), floats_to_bf16(_mm512_permutex2var_ps(first, low, second)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                        floats_to_bf16(_mm512_permutex2var_ps(first, high, second)));
  }
}
#endif

// Normalizes one head's accumulators (with the sinks) and writes them to the output.
template <int DT>
void write_output(const Call& c, int unit, int request, int head, const float* running_max,
                  const float* running_sum, const float* acc) {
  using T = typename Element<DT>::T;
  const bool wide = is_wide(c);
  for (int q = 0; q < c.query_per_kv; ++q) {
    const int64_t global = query_head(c, unit, head, q);
    const float weight = output_weight(c, global, running_max[q], running_sum[q]);
    T* out = static_cast<T*>(c.out) + request * c.out_row_stride + global * c.out_head_stride;
#if defined(HEADINFER_AVX512)
    if (wide) {  // a vector a chunk: the scalar loop took 14% of a call over one page of 8 heads (perf on AMD
                 // Zen 4); this saves 2-3 us a call
      for (int64_t d = 0; d < c.head_dim; d += 32)
        write_chunk_wide<DT>(out + d, acc + q * c.head_dim + d, _mm512_set1_ps(weight));
      continue;
    }
#endif
    for (int64_t d = 0; d < c.head_dim; ++d)
      out[d] = Element<DT>::from_float(acc[q * c.head_dim + to_slots<DT>(d, c.head_dim, wide)] *
                                       weight);
  }
}

struct Scratch {
  std::vector<float> queries, acc, scores, max, sum;
  std::vector<uint16_t> query_bits;  // bf16 queries as they are, for VDPBF16PS
  std::vector<float> sum_lanes;       // decode, AVX-512: running sums in 16 lanes a row (softmax_tile_wide)
  std::vector<uint32_t> query_pairs;  // bf16 queries in pairs: score_tile_amx, run_prefill_item_amx, DotProducts
  std::vector<float> tile_rows;       // prefill: a tile's keys and values widened to fp32 (FmaProducts)
  std::vector<uint32_t> value_pairs, prob_pairs;  // bf16 prefill by VDPBF16PS: a tile's V and P in pairs of keys
  std::vector<uint16_t> key_rows;       // AMX prefill: packed blocks' keys, [block][32 keys][D] (run_prefill_item_amx)
  std::vector<uint16_t> value_columns;  // AMX prefill: packed blocks' values transposed, [block][D][32 keys]
  std::vector<float> acc_columns;       // AMX prefill: each group's O^T, [group][D][32 rows]
  std::vector<int32_t> positions;       // AMX prefill: each row's token position
};

template <int DT>
void run_item(const Call& c, const Item& item, Scratch& s, float* partials) {
  using E = Element<DT>;
  using T = typename E::T;
  const int64_t D = c.head_dim, B = c.block_size, Q = c.query_per_kv, H = item.num_heads;
  const int64_t heads = c.unit_heads[item.unit];
  // Per head h of the item: queries, accumulators [h * Q * D ..], running max and sum [h * Q ..].
  s.queries.resize(H * Q * D);
  s.acc.assign(H * Q * D, 0.0f);
  s.scores.resize(Q * kTile);
  s.max.assign(H * Q, -std::numeric_limits<float>::infinity());
  s.sum.assign(H * Q, 0.0f);
  const bool wide = is_wide(c), bf16_dot = is_bf16_dot<DT>(c), amx = is_amx<DT>(c);
  const bool bf16_pv = bf16_dot && bf16_values();
  if (wide) s.sum_lanes.assign(H * Q * 16, 0.0f);
  if (bf16_dot) s.query_bits.resize(H * Q * D);
  if (amx) s.query_pairs.resize(H * Q * D / 2);
  const T* query = static_cast<const T*>(c.query) + item.request * c.query_row_stride;
  for (int64_t h = 0; h < H; ++h) {
    for (int q = 0; q < Q; ++q) {
      const T* row = query + query_head(c, item.unit, int(item.first_head + h), q) * c.query_head_stride;
      if (bf16_dot) {
        std::memcpy(s.query_bits.data() + (h * Q + q) * D, row, D * sizeof(T));
        continue;
      }
      if (amx) {
        uint32_t* pairs = s.query_pairs.data() + h * Q * D / 2;
        for (int64_t i = 0; i < D / 2; ++i) std::memcpy(pairs + i * Q + q, row + 2 * i, sizeof(uint32_t));
        continue;
      }
      float* slots = s.queries.data() + (h * Q + q) * D;
      if (wide) {
#if defined(HEADINFER_AVX512)
        const __m512 scale = _mm512_set1_ps(c.scale);
        for (int64_t d = 0; d < D; d += 32) {  // widened straight into slot order
          __m512 first, second;
          Wide<DT>::load32(row + d, first, second);
          _mm512_storeu_ps(slots + d, _mm512_mul_ps(first, scale));
          _mm512_storeu_ps(slots + d + 16, _mm512_mul_ps(second, scale));
        }
#endif
        continue;
      }
      for (int64_t d = 0; d < D; ++d) slots[to_slots<DT>(d, D, false)] = E::to_float(row[d]) * c.scale;
    }
  }
  const Keys keys = keys_of(c, item.request);
  const T* pages = static_cast<const T*>(c.unit_pages[item.unit]);
  const int32_t* table = c.block_table + item.request * c.block_table_stride;
  const int64_t row_stride = heads * D, page_elements = 2 * B * row_stride;
  const int64_t values = B * row_stride;  // a V row lies this many elements past its K row (the page's V block)
  Prefetch<T> prefetch(B, row_stride, H * D, H * prefetch_passes(int(Q), amx));
  auto attend = [&](const Tile<T>& first_head_tile) {
    float* scores = s.scores.data();
    const int num_tokens = first_head_tile.num_tokens;
#if defined(HEADINFER_AVX512)
    // The AVX-512 kernels: the K rows of the first head, listed once per tile; head h is h * D further,
    // and its V rows `values` further still.
    std::optional<Rows<T>> keys;
    if (wide) keys.emplace(first_head_tile.keys, first_head_tile.lengths, first_head_tile.num_runs, row_stride);
#endif
    for (int64_t h = 0; h < H; ++h) {
      const float* queries = s.queries.data() + h * Q * D;
      float* acc = s.acc.data() + h * Q * D;
      const int64_t shift = h * D;
      if (wide) {
#if defined(HEADINFER_AVX512)
        const uint16_t* bits = s.query_bits.data() + h * Q * D;
#if defined(HEADINFER_AMX)
        if (amx) {
          score_tile_amx(s.query_pairs.data() + h * Q * D / 2, int(Q), D, first_head_tile, shift, row_stride, c.scale,
                         scores, prefetch);
        }
#endif
        if (!amx) for_query_blocks(int(Q), [&](int q, auto block) {
          constexpr int QB = decltype(block)::value;
          if (bf16_dot) {
            score_tile_wide<DT, QB, true>(nullptr, bits + q * D, D, *keys, shift, c.scale, scores + q * kTile, prefetch);
          } else {
            score_tile_wide<DT, QB, false>(queries + q * D, nullptr, D, *keys, shift, c.scale, scores + q * kTile,
                                           prefetch);
          }
        });
#endif
      } else {
        const Tile<T> tile = first_head_tile.shifted(shift);
        for_query_blocks(int(Q), [&](int q, auto block) {
          score_tile<DT, decltype(block)::value>(queries + q * D, D, tile, row_stride, scores + q * kTile, prefetch);
        });
      }
      if (c.logits_soft_cap > 0.0f) {
        const float cap = c.logits_soft_cap;
        for (int q = 0; q < Q; ++q)
          for (int t = 0; t < num_tokens; ++t) scores[q * kTile + t] = cap * std::tanh(scores[q * kTile + t] / cap);
      }
#if defined(HEADINFER_AVX512)
      if (wide)
        softmax_tile_wide(scores, num_tokens, int(Q), D, s.max.data() + h * Q, s.sum_lanes.data() + h * Q * 16, acc);
#endif
      if (!wide) softmax_tile(scores, num_tokens, int(Q), D, s.max.data() + h * Q, s.sum.data() + h * Q, acc);
      if (wide) {
#if defined(HEADINFER_AVX512)
        for_query_blocks(int(Q), [&](int q, auto block) {
#if defined(HEADINFER_AVX512_BF16)
          if constexpr (DT == kBFloat16)
            if (bf16_pv)
              return accumulate_tile_dot<decltype(block)::value>(scores + q * kTile, *keys, values + shift,
                                                                 acc + q * D, D, prefetch);
#endif
          accumulate_tile_wide<DT, decltype(block)::value>(scores + q * kTile, *keys, values + shift, acc + q * D, D,
                                                           prefetch);
        });
#endif
      } else {
        const Tile<T> tile = first_head_tile.shifted(shift);
        for_query_blocks(int(Q), [&](int q, auto block) {
          accumulate_tile<DT, decltype(block)::value>(scores + q * kTile, tile, row_stride, acc + q * D, D, prefetch);
        });
      }
    }
    prefetch.step(kTile);  // whatever the passes left of the next tile
  };
#if defined(HEADINFER_AMX)
  if (amx) configure_tiles({uint16_t(4 * Q), 64, uint16_t(4 * Q), uint16_t(4 * Q), 64});
#endif
  // Keys [key, end_key) of this item, kTile at a time, in runs that each lie in one page.
  int64_t key = std::max(keys.begin, item.first_page * B);
  const int64_t end_key = std::min(keys.end, item.end_page * B);
  auto next_tile = [&](Tile<T>& tile) {
    tile.num_runs = tile.num_tokens = 0;
    while (key < end_key && tile.num_tokens < kTile) {
      const int n = int(std::min({kTile - int64_t(tile.num_tokens), end_key - key, B - key % B}));
      const T* k_rows = pages + table[key / B] * page_elements + (key % B) * row_stride + item.first_head * D;
      tile.add(k_rows, k_rows + B * row_stride, n);
      key += n;
    }
  };
  // A ring of tiles: tile i is attended while tile i + kPrefetchTiles is prefetched.
  Tile<T> tiles[kPrefetchTiles + 1];
  for (int i = 0; i < kPrefetchTiles; ++i) next_tile(tiles[i]);
  for (int i = 0; tiles[i % (kPrefetchTiles + 1)].num_tokens > 0; ++i) {
    Tile<T>& ahead = tiles[(i + kPrefetchTiles) % (kPrefetchTiles + 1)];
    next_tile(ahead);
    prefetch.reset(ahead);
    attend(tiles[i % (kPrefetchTiles + 1)]);
  }
#if defined(HEADINFER_AMX)
  if (amx) _tile_release();
#endif
#if defined(HEADINFER_AVX512)
  if (wide)  // the running sums, kept in lanes by softmax_tile_wide
    for (int64_t i = 0; i < H * Q; ++i) s.sum[i] = _mm512_reduce_add_ps(_mm512_loadu_ps(s.sum_lanes.data() + 16 * i));
#endif
  for (int64_t h = 0; h < H; ++h) {
    const float *max = s.max.data() + h * Q, *sum = s.sum.data() + h * Q, *acc = s.acc.data() + h * Q * D;
    if (item.partial < 0) {
      write_output<DT>(c, item.unit, item.request, int(item.first_head + h), max, sum, acc);
      continue;
    }
    float* partial = partials + item.partial + h * partial_floats(c);
    for (int q = 0; q < Q; ++q) {
      partial[q * (D + 2)] = max[q];
      partial[q * (D + 2) + 1] = sum[q];
      std::memcpy(partial + q * (D + 2) + 2, acc + q * D, D * sizeof(float));
    }
  }
}

// Log-sum-exp merge of one head's split partials into the output.
template <int DT>
void run_merge(const Call& c, const Merge& merge, Scratch& s, const float* partials) {
  const int64_t D = c.head_dim, Q = c.query_per_kv, stride = merge.split_stride;
  s.acc.assign(Q * D, 0.0f);
  s.max.assign(Q, -std::numeric_limits<float>::infinity());
  s.sum.assign(Q, 0.0f);
  for (int q = 0; q < Q; ++q) {
    for (int i = 0; i < merge.num_splits; ++i)
      s.max[q] = std::max(s.max[q], partials[merge.first_partial + i * stride + q * (D + 2)]);
    for (int i = 0; i < merge.num_splits; ++i) {
      const float* partial = partials + merge.first_partial + i * stride + q * (D + 2);
      if (partial[1] == 0.0f) continue;  // no keys in this split
      const float factor = std::exp(partial[0] - s.max[q]);
      s.sum[q] += partial[1] * factor;
      for (int64_t d = 0; d < D; ++d) s.acc[q * D + d] += partial[2 + d] * factor;
    }
  }
  write_output<DT>(c, merge.unit, merge.request, merge.head, s.max.data(), s.sum.data(), s.acc.data());
}

// Checks the block table entries that will be read; cuts every (unit, request, head) into items.
int plan(const Call& c, int& num_threads, std::vector<Item>& items, std::vector<Merge>& merges,
         int64_t* bad_index) {
  const int64_t B = c.block_size;
  int64_t total_pages = 0, total_heads = 0;
  for (int u = 0; u < c.num_units; ++u) total_heads += c.unit_heads[u];
  for (int64_t r = 0; r < c.num_requests; ++r) {
    const Keys keys = keys_of(c, r);
    if (keys.end > c.max_blocks * B) return *bad_index = r, kSequenceTooLong;
    if (keys.end == 0) continue;
    const int32_t* table = c.block_table + r * c.block_table_stride;
    for (int64_t page = keys.begin / B; page < (keys.end + B - 1) / B; ++page) {
      if (table[page] < 0 || table[page] >= c.num_blocks) return *bad_index = r, kBlockOutOfRange;
    }
    total_pages += total_heads * ((keys.end + B - 1) / B - keys.begin / B);
  }
  const int64_t element = c.dtype == kFloat32 ? 4 : 2;
  const int64_t bytes = total_pages * 2 * B * c.head_dim * element;
  num_threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, bytes / kMinBytesPerThread)));
  // Split so that there are about kItemsPerThread items per thread, none under kMinSplitTokens keys:
  // by pages first, whole units at a time; then, where that leaves threads idle, by heads too.
  const int64_t wanted = int64_t(num_threads) * kItemsPerThread;
  const int64_t min_pages = std::max<int64_t>(1, (kMinSplitTokens + B - 1) / B);
  const int64_t target = std::max<int64_t>(1, total_pages / wanted);  // pages times heads per item
  auto pages_of = [&](int64_t r) {
    const Keys keys = keys_of(c, r);
    return std::pair<int64_t, int64_t>(keys.begin / B, (keys.end + B - 1) / B);
  };
  auto page_splits = [&](int64_t pages, int64_t range_heads) -> int64_t {
    if (num_threads <= 1) return 1;
    const int64_t per_item = std::max(min_pages, (target + range_heads - 1) / range_heads);
    return std::max<int64_t>(1, (pages + per_item - 1) / per_item);
  };
  int64_t whole_units = 0;
  for (int u = 0; u < c.num_units; ++u)
    for (int64_t r = 0; r < c.num_requests; ++r) {
      const auto [first, end] = pages_of(r);
      whole_units += page_splits(end - first, c.unit_heads[u]);
    }
  const int64_t head_cuts = num_threads > 1 && whole_units < wanted ? (wanted + whole_units - 1) / whole_units : 1;
  const int64_t floats = partial_floats(c);
  int64_t partial = 0;
  for (int u = 0; u < c.num_units; ++u) {
    const int64_t heads = c.unit_heads[u], range = std::max<int64_t>(1, (heads + head_cuts - 1) / head_cuts);
    for (int64_t r = 0; r < c.num_requests; ++r) {
      const auto [first, end] = pages_of(r);
      const int64_t pages = end - first;
      for (int64_t first_head = 0; first_head < heads; first_head += range) {
        const int64_t range_heads = std::min(range, heads - first_head), splits = page_splits(pages, range_heads);
        for (int64_t h = 0; splits > 1 && h < range_heads; ++h)
          merges.push_back({u, int32_t(r), int32_t(first_head + h), int32_t(splits), partial + h * floats,
                            range_heads * floats});
        for (int64_t i = 0; i < splits; ++i) {
          const int64_t begin = first + pages * i / splits, stop = first + pages * (i + 1) / splits;
          items.push_back({u, int32_t(r), int32_t(first_head), int32_t(range_heads), begin, stop,
                           splits > 1 ? partial : -1});
          if (splits > 1) partial += range_heads * floats;
        }
      }
    }
  }
  return kOk;
}

template <int DT>
int run(const Call& c, int num_threads, int64_t* bad_index) {
  thread_local std::vector<Item> items;
  thread_local std::vector<Merge> merges;
  thread_local std::vector<float> partials;
  items.clear();
  merges.clear();
  const int status = plan(c, num_threads, items, merges, bad_index);
  if (status != kOk) return status;
  int64_t partial_size = 0;
  for (const Merge& m : merges)
    partial_size = std::max(partial_size, m.first_partial + (m.num_splits - 1) * m.split_stride + partial_floats(c));
  partials.resize(partial_size);
  const int64_t num_items = int64_t(items.size()), num_merges = int64_t(merges.size());
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_items)));
  const Item* item_data = items.data();
  const Merge* merge_data = merges.data();
  float* partial_data = partials.data();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    thread_local Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) run_item<DT>(c, item_data[i], scratch, partial_data);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_merges; ++i) run_merge<DT>(c, merge_data[i], scratch, partial_data);
  }
  return kOk;
}

// Prefill -----------------------------------------------------------------------------------
//
// Several query tokens per request: the chunk of request r is the last query_lens[r] positions of
// its seq_lens[r] keys (rows query_starts[r] .. of query and out), causal, windows included. Items
// are (unit, request, KV head, query tile): a tile's rows are its tokens' query heads of that KV
// head (row t * Q + q, at most kQueryRows of them), so each tile of keys read serves every row;
// the tiles of a (request, head) run in turn (its pages stay in the caches), largest first. Pages
// outside the keys a tile can see are never read.

constexpr int kQueryRows = 64;  // query rows (tokens times query heads of a KV head) per item

struct PrefillItem {
  int32_t unit, request, head, first_token, num_tokens;  // tokens first_token .. of the request's chunk
  int64_t work;                                          // keys times rows: the order items run in
};

// The keys [begin, end) that the chunk's tokens first .. first + count - 1 see.
inline Keys prefill_keys(const Call& c, int64_t seq_len, int64_t query_len, int64_t first, int64_t count) {
  const int64_t first_position = seq_len - query_len + first;
  const int64_t begin = c.sliding_window > 0 ? std::max<int64_t>(0, first_position - c.sliding_window + 1) : 0;
  return {begin, first_position + count};
}

#if defined(HEADINFER_AVX512)
// The AVX-512 prefill item (head dims that are a multiple of 32), query rows in the lanes: the item's
// queries are transposed once, Qt [D][R] (R rows padded to a multiple of 16, zeros), and each tile's
// keys and values widened once to fp32 rows [kTile][D] (wide slot order, as the queries). Scores
// S^T [t][R] += broadcast(k_t[d]) * Qt[d][...]: 4 keys by R / 16 row vectors of FMAs per element, no
// horizontal sums; the online softmax runs on 16 rows at a time; acc [R][D] += broadcast(p[t][r]) * v_t.
// DotProducts (bf16) keeps everything in bf16 pairs and multiplies by VDPBF16PS (two bf16
// products summed in fp32 per lane, twice an FMA's work): Q^T in pairs, word [i][r] = elements 2i, 2i + 1
// of row r, unscaled (the scale multiplies the sums); keys read in place, a 32-bit word (a pair of
// elements) broadcast at a time; values and probabilities in pairs of keys, V [t / 2][D] word d =
// (v_t[d], v_t+1[d]) in wide slot order and P^T [t / 2][R] word r = (p[t][r], p[t + 1][r]) rounded to
// bf16 (as the AMX path, torch's SDPA and vLLM's CPU kernel round P); the softmax sums P before rounding.

inline void exp_nonpositive16(float* x) {  // in place, 16 floats
  f32x16 v;
  std::memcpy(&v, x, sizeof v);
  v = exp_nonpositive(v);
  std::memcpy(x, &v, sizeof v);
}

// S^T[t][...] for 4 keys of the tile and NV vectors of 16 rows.
template <int NV>
inline void score_keys_t(const float* qt, int64_t R, const float* keys, int64_t D, float* scores) {
  __m512 acc[4][NV];
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < NV; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m512 q[NV];
    for (int j = 0; j < NV; ++j) q[j] = _mm512_loadu_ps(qt + d * R + 16 * j);
    for (int t = 0; t < 4; ++t) {
      const __m512 k = _mm512_set1_ps(keys[t * D + d]);
      for (int j = 0; j < NV; ++j) acc[t][j] = _mm512_fmadd_ps(k, q[j], acc[t][j]);
    }
  }
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(scores + t * R + 16 * j, acc[t][j]);
}

// acc[r0 + i][d0 .. d0 + 16 * NC) += sum_t p[t][r0 + i] * v_t[d0 ..] for 4 rows.
template <int NC>
inline void accumulate_rows_t(const float* probs, int64_t R, int num_keys, const float* values, int64_t D,
                              int64_t r0, int64_t d0, float* acc) {
  __m512 sums[4][NC];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < NC; ++j) sums[i][j] = _mm512_loadu_ps(acc + (r0 + i) * D + d0 + 16 * j);
  for (int t = 0; t < num_keys; ++t) {
    __m512 v[NC];
    for (int j = 0; j < NC; ++j) v[j] = _mm512_loadu_ps(values + t * D + d0 + 16 * j);
    for (int i = 0; i < 4; ++i) {
      const __m512 p = _mm512_set1_ps(probs[t * R + r0 + i]);
      for (int j = 0; j < NC; ++j) sums[i][j] = _mm512_fmadd_ps(p, v[j], sums[i][j]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < NC; ++j) _mm512_storeu_ps(acc + (r0 + i) * D + d0 + 16 * j, sums[i][j]);
}

#if defined(HEADINFER_BF16_DOT_PREFILL)
// Whether a prefill item takes the bf16 dot variant.
bool is_dot_prefill(const Call& c) { return c.dtype == kBFloat16 && is_wide(c); }

inline uint32_t load_word(const uint16_t* pair) {  // two bf16 elements as one 32-bit word
  uint32_t word;
  std::memcpy(&word, pair, sizeof word);
  return word;
}

// S^T[t][...] = scale * sum_i (pair i of key t) . Qp[i][...] for 4 keys (rows in place) and NV vectors of 16 rows.
template <int NV>
inline void score_keys_dot(const uint32_t* query_pairs, int64_t R, const uint16_t* const* keys, int64_t D,
                           __m512 scale, float* scores) {
  __m512 acc[4][NV];
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < NV; ++j) acc[t][j] = _mm512_setzero_ps();
  for (int64_t i = 0; i < D / 2; ++i) {
    __m512bh q[NV];
    for (int j = 0; j < NV; ++j) q[j] = (__m512bh)_mm512_loadu_si512(query_pairs + i * R + 16 * j);
    for (int t = 0; t < 4; ++t) {
      const __m512bh k = (__m512bh)_mm512_set1_epi32(int(load_word(keys[t] + 2 * i)));
      for (int j = 0; j < NV; ++j) acc[t][j] = _mm512_dpbf16_ps(acc[t][j], k, q[j]);
    }
  }
  for (int t = 0; t < 4; ++t)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(scores + t * R + 16 * j, _mm512_mul_ps(acc[t][j], scale));
}

// acc[r0 + i][d0 .. d0 + 16 * NC) += sum_u Pp[u][r0 + i] . Vp[u][d0 ..] over the key pairs, for 4 rows.
template <int NC>
inline void accumulate_pairs_t(const uint32_t* prob_pairs, int64_t R, int num_pairs, const uint32_t* value_pairs,
                               int64_t D, int64_t r0, int64_t d0, float* acc) {
  __m512 sums[4][NC];
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < NC; ++j) sums[i][j] = _mm512_loadu_ps(acc + (r0 + i) * D + d0 + 16 * j);
  for (int u = 0; u < num_pairs; ++u) {
    __m512bh v[NC];
    for (int j = 0; j < NC; ++j) v[j] = (__m512bh)_mm512_loadu_si512(value_pairs + u * D + d0 + 16 * j);
    for (int i = 0; i < 4; ++i) {
      const __m512bh p = (__m512bh)_mm512_set1_epi32(int(prob_pairs[u * R + r0 + i]));
      for (int j = 0; j < NC; ++j) sums[i][j] = _mm512_dpbf16_ps(sums[i][j], p, v[j]);
    }
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < NC; ++j) _mm512_storeu_ps(acc + (r0 + i) * D + d0 + 16 * j, sums[i][j]);
}

// Vp[u][...] of values a and b (D bf16 elements each; b null: zeros), per 32 elements as pair_rows gives them.
inline void pack_value_pair(const uint16_t* a, const uint16_t* b, int64_t D, uint32_t* out) {
  for (int64_t d = 0; d < D; d += 32) {
    __m512i even, odd;
    pair_rows(_mm512_loadu_si512(a + d), b ? _mm512_loadu_si512(b + d) : _mm512_setzero_si512(), even, odd);
    _mm512_storeu_si512(out + d, even);
    _mm512_storeu_si512(out + d + 16, odd);
  }
}

// Pp[u][16 rows] from p[2u] and p[2u + 1] (16 floats each): words (bf16(first[r]), bf16(second[r])).
inline __m512i probability_pairs(__m512 first, __m512 second) {
  const __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(first));
  const __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(second));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}
#endif

// The wide prefill item's products with fp32 FMAs: queries (scaled) and each tile's keys and values
// widened once to fp32, Qt [D][R] and rows [kTile][D] (wide slot order).
template <int DT>
struct FmaProducts {
  using T = typename Element<DT>::T;
  Scratch& s;
  const int64_t D, R;

  // Qt of the rows (row r < rows at row(r); zeros past them), times the scale.
  template <typename RowOf>
  void set_queries(int64_t rows, float scale, RowOf row_of) {
    s.queries.assign(D * R, 0.0f);
    s.tile_rows.assign(2 * kTile * D, 0.0f);  // keys [kTile][D], then values [kTile][D]
    alignas(64) float widened[32];
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = static_cast<const T*>(row_of(r));
      for (int64_t d = 0; d < D; d += 32) {
        __m512 first, second;
        Wide<DT>::load32(row + d, first, second);
        _mm512_store_ps(widened, _mm512_mul_ps(first, _mm512_set1_ps(scale)));
        _mm512_store_ps(widened + 16, _mm512_mul_ps(second, _mm512_set1_ps(scale)));
        for (int i = 0; i < 32; ++i) s.queries[(d + i) * R + r] = widened[i];
      }
    }
  }

  // Key t of the tile (k, v: its rows of D elements in the pages).
  void set_key(int t, const T* k, const T* v) {
    for (int64_t d = 0; d < D; d += 32) {
      __m512 first, second;
      Wide<DT>::load32(k + d, first, second);
      _mm512_storeu_ps(key_rows() + t * D + d, first);
      _mm512_storeu_ps(key_rows() + t * D + d + 16, second);
      Wide<DT>::load32(v + d, first, second);
      _mm512_storeu_ps(value_rows() + t * D + d, first);
      _mm512_storeu_ps(value_rows() + t * D + d + 16, second);
    }
  }

  void end_tile(int) {}

  // S^T [t .. t + 3] of row vectors j .. j + NV - 1 (16 rows each) at `out`, rows R apart (keys past the
  // tile's: scores of stale rows, dropped).
  template <int NV>
  void score(int t, int j, float* out) {
    score_keys_t<NV>(s.queries.data() + 16 * j, R, key_rows() + t * D, D, out);
  }

  // acc [R][D] += P V over the tile's n keys (probs: P^T [kTile][R]).
  void accumulate(const float* probs, int n, float* acc) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      int64_t d = 0;
      for (; d + 64 <= D; d += 64) accumulate_rows_t<4>(probs, R, n, value_rows(), D, r0, d, acc);
      if (d < D) accumulate_rows_t<2>(probs, R, n, value_rows(), D, r0, d, acc);
    }
  }

  float* key_rows() { return s.tile_rows.data(); }
  float* value_rows() { return s.tile_rows.data() + kTile * D; }
};

#if defined(HEADINFER_BF16_DOT_PREFILL)
// The wide prefill item's products with VDPBF16PS (bf16 only): see score_keys_dot and accumulate_pairs_t.
struct DotProducts {
  using T = uint16_t;
  Scratch& s;
  const int64_t D, R;
  const T* keys[kTile + 3] = {};  // the tile's key rows in the pages, padded to a multiple of 4 with the first
  const T* values[kTile] = {};
  __m512 scale = _mm512_setzero_ps();  // of the scores (set_queries)

  template <typename RowOf>
  void set_queries(int64_t rows, float query_scale, RowOf row_of) {
    scale = _mm512_set1_ps(query_scale);
    s.query_pairs.assign(D / 2 * R, 0);  // Qp [D / 2][R]
    s.value_pairs.resize(kTile / 2 * D);  // Vp [kTile / 2][D]
    s.prob_pairs.resize(kTile / 2 * R);   // Pp [kTile / 2][R]
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = static_cast<const T*>(row_of(r));
      for (int64_t i = 0; i < D / 2; ++i) s.query_pairs[i * R + r] = load_word(row + 2 * i);
    }
  }

  void set_key(int t, const T* k, const T* v) {
    keys[t] = k;
    values[t] = v;
    if (t % 2 == 1) pack_value_pair(values[t - 1], v, D, s.value_pairs.data() + t / 2 * D);
  }

  void end_tile(int n) {
    if (n % 2 == 1) pack_value_pair(values[n - 1], nullptr, D, s.value_pairs.data() + n / 2 * D);
    for (int t = n; t < (n + 3) / 4 * 4; ++t) keys[t] = keys[0];
  }

  template <int NV>
  void score(int t, int j, float* out) {
    score_keys_dot<NV>(s.query_pairs.data() + 16 * j, R, keys + t, D, scale, out);
  }

  void accumulate(const float* probs, int n, float* acc) {
    uint32_t* prob_pairs = s.prob_pairs.data();
    const int pairs = (n + 1) / 2;
    for (int u = 0; u < pairs; ++u)
      for (int64_t r = 0; r < R; r += 16) {
        const __m512 second = 2 * u + 1 < n ? _mm512_loadu_ps(probs + (2 * u + 1) * R + r) : _mm512_setzero_ps();
        _mm512_storeu_si512(prob_pairs + u * R + r, probability_pairs(_mm512_loadu_ps(probs + 2 * u * R + r), second));
      }
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      int64_t d = 0;
      for (; d + 64 <= D; d += 64) accumulate_pairs_t<4>(prob_pairs, R, pairs, s.value_pairs.data(), D, r0, d, acc);
      if (d < D) accumulate_pairs_t<2>(prob_pairs, R, pairs, s.value_pairs.data(), D, r0, d, acc);
    }
  }
};
#endif

// Products: FmaProducts<DT> or DotProducts (see each).
template <int DT, typename Products>
void run_prefill_item_wide(const Call& c, int64_t first_row, int64_t first_position, const Keys& keys,
                           const PrefillItem& item, Scratch& s) {
  using T = typename Element<DT>::T;
  const int64_t D = c.head_dim, B = c.block_size, Q = c.query_per_kv, heads = c.unit_heads[item.unit];
  const int64_t rows = item.num_tokens * Q, R = (rows + 15) / 16 * 16;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  s.acc.assign(R * D, 0.0f);
  s.max.assign(R, kNegInf);
  s.sum.assign(R, 0.0f);
  s.scores.assign(kTile * R, 0.0f);  // S^T, then P^T: [kTile][R]
  Products products{s, D, R};
  products.set_queries(rows, c.scale, [&](int64_t r) {
    return static_cast<const T*>(c.query) + (first_row + r / Q) * c.query_row_stride +
           query_head(c, item.unit, item.head, int(r % Q)) * c.query_head_stride;
  });
  const T* pages = static_cast<const T*>(c.unit_pages[item.unit]);
  const int32_t* table = c.block_table + item.request * c.block_table_stride;
  const int64_t row_stride = heads * D, page_elements = 2 * B * row_stride;
  float *acc = s.acc.data(), *scores = s.scores.data();
  const int nv = int(R / 16);
  for (int64_t first_key = keys.begin; first_key < keys.end;) {
    int n = 0;
    while (first_key + n < keys.end && n < kTile) {
      const int64_t key = first_key + n;
      const T* k = pages + table[key / B] * page_elements + (key % B) * row_stride + item.head * D;
      products.set_key(n++, k, k + B * row_stride);
    }
    products.end_tile(n);
    for (int t = 0; t < n; t += 4) {
      // The same 4 keys of the next tile, into L2 while this one is scored.
      for (int64_t key = first_key + n + t; key < std::min(first_key + n + t + 4, keys.end); ++key) {
        const char* k = reinterpret_cast<const char*>(pages + table[key / B] * page_elements + (key % B) * row_stride +
                                                      item.head * D);
        for (int64_t line = 0; line < D * int64_t(sizeof(T)); line += 64)
          prefetch_l2(k + line), prefetch_l2(k + B * row_stride * int64_t(sizeof(T)) + line);
      }
      for (int j = 0; j < nv; j += 4) {  // at most 4 row vectors (64 rows) at a time: 16 accumulators
        float* out = scores + t * R + 16 * j;
        switch (std::min(4, nv - j)) {
          case 4: products.template score<4>(t, j, out); break;
          case 3: products.template score<3>(t, j, out); break;
          case 2: products.template score<2>(t, j, out); break;
          default: products.template score<1>(t, j, out);
        }
      }
    }
    if (c.logits_soft_cap > 0.0f) {
      const float cap = c.logits_soft_cap;
      for (int t = 0; t < n; ++t)
        for (int64_t r = 0; r < rows; ++r) scores[t * R + r] = cap * std::tanh(scores[t * R + r] / cap);
    }
    for (int64_t token = 0; token < item.num_tokens; ++token) {  // token sees keys [lowest, position]
      const int64_t position = first_position + token;
      const int64_t lowest = c.sliding_window > 0 ? position - c.sliding_window + 1 : 0;
      if (first_key >= lowest && first_key + n - 1 <= position) continue;
      for (int t = 0; t < n; ++t)
        if (first_key + t > position || first_key + t < lowest)
          for (int64_t q = 0; q < Q; ++q) scores[t * R + token * Q + q] = kNegInf;
    }
    // Online softmax, 16 rows at a time.
    for (int j = 0; j < nv; ++j) {
      __m512 tile_max = _mm512_set1_ps(kNegInf);
      for (int t = 0; t < n; ++t) tile_max = _mm512_max_ps(tile_max, _mm512_loadu_ps(scores + t * R + 16 * j));
      const __m512 old_max = _mm512_loadu_ps(s.max.data() + 16 * j);
      const __m512 new_max = _mm512_max_ps(old_max, tile_max);
      const __mmask16 seen = _mm512_cmp_ps_mask(new_max, _mm512_set1_ps(kNegInf), _CMP_NEQ_OQ);
      const __m512 shift = _mm512_maskz_mov_ps(seen, new_max);  // 0 where every key so far is masked
      alignas(64) float correction[16];
      _mm512_store_ps(correction, _mm512_sub_ps(old_max, shift));
      exp_nonpositive16(correction);  // -inf - x: 0; rows with no keys yet: exp(-inf) = 0 as well
      __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(s.sum.data() + 16 * j), _mm512_load_ps(correction));
      for (int t = 0; t < n; ++t) {
        float* p = scores + t * R + 16 * j;
        _mm512_storeu_ps(p, _mm512_sub_ps(_mm512_loadu_ps(p), shift));
        exp_nonpositive16(p);
        sum = _mm512_add_ps(sum, _mm512_loadu_ps(p));
      }
      _mm512_storeu_ps(s.sum.data() + 16 * j, sum);
      _mm512_storeu_ps(s.max.data() + 16 * j, new_max);
      for (int i = 0; i < 16; ++i) {
        if (correction[i] == 1.0f) continue;
        float* row = acc + (16 * j + i) * D;
        const __m512 factor = _mm512_set1_ps(correction[i]);
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(row + d, _mm512_mul_ps(_mm512_loadu_ps(row + d), factor));
      }
    }
    products.accumulate(scores, n, acc);
    first_key += n;
  }
  for (int64_t token = 0; token < item.num_tokens; ++token)
    write_output<DT>(c, item.unit, int(first_row + token), item.head, s.max.data() + token * Q,
                     s.sum.data() + token * Q, acc + token * Q * D);
}
#endif

#if defined(HEADINFER_AMX_PREFILL)
// The AMX prefill item (bf16, head dims that are a multiple of 32, Linux's permission), everything
// transposed so that the item's rows (token t, query head q at row t * Q + q; R of them, padded to a
// multiple of 32) lie in the lanes. Rows go 32 at a time (a group: two row tiles), against tiles of
// up to kAmxKeyTile keys (blocks of kAmxKeys), as FlashAttention does:
//
//   S^T [32 keys, 32 rows] = K [32, D] x Q^T         bf16 products summed in fp32 (TDPBF16PS), D / 32 steps
//   online softmax on S^T's lanes in fp32 (AVX-512) over the tile, P = exp(S - max) rounded to bf16
//   (as torch's SDPA and vLLM's CPU kernel round it), in key pairs
//   O^T [D, 32 rows] += V^T [D, 32 keys] x P^T       fp32, 2 x 2 tiles of O^T loaded once per key tile
//
// Every product is a 2 x 2 of tiles: two A tiles, two B tiles, four accumulators, each load serving
// two products. Operands, in the layout TDPBF16PS wants, are built once per item: Q^T (tile (row
// tile, c) row i column j = elements 32c + 2i, 32c + 2i + 1 of row j, a 16 x 16 transpose of 32-bit
// words); the keys the item sees copied to contiguous rows (A tiles as they are); their values
// transposed, V^T [D][32 keys] per block (word i of row d = values d of keys 2i, 2i + 1: the pairs
// interleaved, then the same word transpose). P^T's pairs come out of the softmax as B wants them
// (word r of row i: P[r][2i], P[r][2i + 1]), so nothing is transposed per key tile. Keys past the
// end are zeros, never read from the pages, and masked. The keys are packed kAmxPackedBlocks blocks
// at a time (they stay in the L2 cache while every group of the item attends them); a group's O^T
// (D x 32 floats) is zeroed by its first key tile, rescaled in place when a row's max grows, and
// transposed once at the end. Tiles: 0 and 1 the A operands (keys, values), 2 and 3 the B operands
// (queries, probabilities), 4 to 7 the accumulators; each 16 rows of 64 bytes. Measured against the
// FMA item and vLLM's own AMX kernel: benchmarks/bench_cpu_prefill.py.

constexpr int kAmxKeys = 32;          // keys per block: two A tiles of 16 keys, or two B tiles of 16 key pairs
constexpr int kAmxKeyTile = 128;      // keys per softmax step: the group's O^T tiles are loaded and stored once a step
constexpr int kAmxPackedBlocks = 16;  // blocks packed at a time, for every group of the item (2 x 128 KiB, D = 128)
constexpr int kAmxQueryRows = 1024;   // rows per item: each key it sees is packed once for 32 groups

// Row i of the result: word i of each of the 16 rows (a 16 x 16 transpose of 32-bit words).
inline void transpose_words(__m512i* rows) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {  // lane L: words 4L, 4L + 1 (then 4L + 2, 4L + 3) of rows 2i, 2i + 1
    t[2 * i] = _mm512_unpacklo_epi32(rows[2 * i], rows[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(rows[2 * i], rows[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // rows[4i + j], lane L: word 4L + j of rows 4i .. 4i + 3
    rows[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    rows[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    rows[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    rows[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  __m512i out[16];
  for (int j = 0; j < 4; ++j) {  // word 4L + j of rows 4g .. 4g + 3 is lane L of rows[4g + j]: gather the lanes
    const __m512i ab_low = _mm512_shuffle_i32x4(rows[j], rows[4 + j], 0x44);
    const __m512i ab_high = _mm512_shuffle_i32x4(rows[j], rows[4 + j], 0xee);
    const __m512i cd_low = _mm512_shuffle_i32x4(rows[8 + j], rows[12 + j], 0x44);
    const __m512i cd_high = _mm512_shuffle_i32x4(rows[8 + j], rows[12 + j], 0xee);
    out[j] = _mm512_shuffle_i32x4(ab_low, cd_low, 0x88);
    out[4 + j] = _mm512_shuffle_i32x4(ab_low, cd_low, 0xdd);
    out[8 + j] = _mm512_shuffle_i32x4(ab_high, cd_high, 0x88);
    out[12 + j] = _mm512_shuffle_i32x4(ab_high, cd_high, 0xdd);
  }
  for (int i = 0; i < 16; ++i) rows[i] = out[i];
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^x on 16 lanes for x <= 0 (a little above 0 is fine): x = n + f, |f| <= 1/2, 2^f by its Taylor
// polynomial of degree 7 (relative error below 1e-8 before rounding), times 2^n by VSCALEFPS. 0 below
// 2^-126 (and for -inf); NaN stays NaN.
inline __m512 exp2_ps(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5252733804059841e-5f);                  // ln(2)^7 / 7!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381610e-4f));  // ln(2)^6 / 6!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));  // ln(2)^5 / 5!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));  // ln(2)^4 / 4!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));  // ln(2)^3 / 3!
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));  // ln(2)^2 / 2
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));  // ln(2)
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(live, p, n);
}

// Whether prefill items take the AMX tiles.
bool is_amx_prefill(const Call& c) { return c.dtype == kBFloat16 && is_wide(c) && amx_permitted(); }

// Word j of the result: (halves[j], halves[16 + j]), 16-bit elements in pairs.
inline __m512i interleave_halves(__m512i halves) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, halves);
}

// The 2 x 2 tile product: tiles 4, 5, 6, 7 += (0 x 2, 0 x 3, 1 x 2, 1 x 3), the operands loaded first.
inline void multiply_2x2(const void* a0, const void* a1, int a_stride, const void* b0, const void* b1) {
  _tile_loadd(0, a0, a_stride);
  _tile_loadd(2, b0, 64);
  _tile_dpbf16ps(4, 0, 2);
  _tile_loadd(3, b1, 64);
  _tile_dpbf16ps(5, 0, 3);
  _tile_loadd(1, a1, a_stride);
  _tile_dpbf16ps(6, 1, 2);
  _tile_dpbf16ps(7, 1, 3);
}

// The accumulator tiles 4, 5, 6, 7 as a 2 x 2 of 16 x 16 floats at `at`, rows `row_floats` apart:
// (rows 0-15, columns 0-15), (0-15, 16-31), (16-31, 0-15), (16-31, 16-31).
inline void load_accumulators(const float* at, int row_floats) {
  _tile_loadd(4, at, row_floats * 4);
  _tile_loadd(5, at + 16, row_floats * 4);
  _tile_loadd(6, at + 16 * row_floats, row_floats * 4);
  _tile_loadd(7, at + 16 * row_floats + 16, row_floats * 4);
}

inline void store_accumulators(float* at, int row_floats) {
  _tile_stored(4, at, row_floats * 4);
  _tile_stored(5, at + 16, row_floats * 4);
  _tile_stored(6, at + 16 * row_floats, row_floats * 4);
  _tile_stored(7, at + 16 * row_floats + 16, row_floats * 4);
}

inline void zero_accumulators() {
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
}

// Q^T of the item's rows in pairs: tile (row tile, chunk c) at query_pairs[(row tile * chunks + c) * 256],
// row i word j = elements 32c + 2i, 32c + 2i + 1 of row j (zeros past the rows).
void pack_queries_amx(const Call& c, const PrefillItem& item, int64_t first_row, int64_t rows, int64_t R,
                      uint32_t* query_pairs) {
  const int64_t chunks = c.head_dim / 32, Q = c.query_per_kv;
  for (int64_t tile_row = 0; tile_row < R; tile_row += 16)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      __m512i words[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t r = tile_row + j;
        const uint16_t* row = static_cast<const uint16_t*>(c.query) + (first_row + r / Q) * c.query_row_stride +
                              query_head(c, item.unit, item.head, int(r % Q)) * c.query_head_stride;
        words[j] = r < rows ? _mm512_loadu_si512(row + 32 * chunk) : _mm512_setzero_si512();
      }
      transpose_words(words);
      for (int i = 0; i < 16; ++i)
        _mm512_storeu_si512(query_pairs + ((tile_row / 16) * chunks + chunk) * 256 + i * 16, words[i]);
    }
}

// Blocks [first, end) of the keys from keys.begin, packed: block b's keys [32][D] at key_rows + (b - first) * 32 * D,
// its V^T [D][32 keys] at value_columns + (b - first) * D * 32; zeros past keys.end.
void pack_key_blocks_amx(const Call& c, const PrefillItem& item, const Keys& keys, int64_t first, int64_t end,
                         uint16_t* key_rows, uint16_t* value_columns) {
  const int64_t D = c.head_dim, B = c.block_size, row_stride = c.unit_heads[item.unit] * D;
  const uint16_t* pages = static_cast<const uint16_t*>(c.unit_pages[item.unit]);
  const int32_t* table = c.block_table + item.request * c.block_table_stride;
  for (int64_t block = first; block < end; ++block) {
    const int64_t first_key = keys.begin + block * kAmxKeys;
    const int n = int(std::min<int64_t>(kAmxKeys, keys.end - first_key));
    uint16_t* block_keys = key_rows + (block - first) * kAmxKeys * D;
    const uint16_t* values[kAmxKeys];
    for (int t = 0; t < n; ++t) {
      const int64_t key = first_key + t;
      const uint16_t* k = pages + table[key / B] * 2 * B * row_stride + (key % B) * row_stride + item.head * D;
      std::memcpy(block_keys + t * D, k, D * sizeof(uint16_t));
      values[t] = k + B * row_stride;
    }
    if (n < kAmxKeys) std::memset(block_keys + n * D, 0, (kAmxKeys - n) * D * sizeof(uint16_t));
    const auto value_elements = [&](int t, int64_t d) {  // 16 of them
      return t < n ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values[t] + d)) : _mm256_setzero_si256();
    };
    for (int64_t d = 0; d < D; d += 16) {  // V^T rows d .. d + 15: word i of row d + j = (V[2i][d + j], V[2i + 1][d + j])
      __m512i words[16];
      for (int i = 0; i < 16; ++i)
        words[i] = interleave_halves(
            _mm512_inserti64x4(_mm512_castsi256_si512(value_elements(2 * i, d)), value_elements(2 * i + 1, d), 1));
      transpose_words(words);
      for (int j = 0; j < 16; ++j)
        _mm512_storeu_si512(value_columns + ((block - first) * D + d + j) * kAmxKeys, words[j]);
    }
  }
}

// A group's rows out: O^T [D][32] transposed in 16 x 16 blocks, times each row's weight, rounded to bf16.
void write_group_amx(const Call& c, const PrefillItem& item, int64_t first_row, int64_t group, int64_t group_rows,
                     const float* acc_columns, const float* running_max, const float* running_sum) {
  const int64_t D = c.head_dim, Q = c.query_per_kv;
  uint16_t* out_rows[32];
  float weights[32];
  for (int64_t r = 0; r < group_rows; ++r) {
    const int64_t global = query_head(c, item.unit, item.head, int((group + r) % Q));
    out_rows[r] = static_cast<uint16_t*>(c.out) + (first_row + (group + r) / Q) * c.out_row_stride +
                  global * c.out_head_stride;
    weights[r] = output_weight(c, global, running_max[r], running_sum[r]);
  }
  for (int h = 0; h < 2 && 16 * h < group_rows; ++h)
    for (int64_t d = 0; d < D; d += 16) {
      __m512i block[16];  // row j: O^T row d + j, the row tile's 16 rows
      for (int j = 0; j < 16; ++j) block[j] = _mm512_castps_si512(_mm512_loadu_ps(acc_columns + (d + j) * 32 + 16 * h));
      transpose_words(block);  // row i: elements d .. d + 15 of row 16h + i
      for (int i = 0; i < 16 && 16 * h + i < group_rows; ++i) {
        const __m512 row = _mm512_mul_ps(_mm512_castsi512_ps(block[i]), _mm512_set1_ps(weights[16 * h + i]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_rows[16 * h + i] + d), (__m256i)_mm512_cvtneps_pbh(row));
      }
    }
}

void run_prefill_item_amx(const Call& c, int64_t first_row, int64_t first_position, const Keys& keys,
                          const PrefillItem& item, Scratch& s) {
  const int64_t D = c.head_dim, Q = c.query_per_kv;
  const int64_t rows = item.num_tokens * Q, R = (rows + 31) / 32 * 32, chunks = D / 32;
  const int64_t num_blocks = (keys.end - keys.begin + kAmxKeys - 1) / kAmxKeys;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  s.query_pairs.resize(R / 16 * chunks * 256);
  s.max.assign(R, kNegInf);  // scaled scores' running max
  s.sum.assign(R, 0.0f);
  s.key_rows.resize(kAmxPackedBlocks * kAmxKeys * D);
  s.value_columns.resize(kAmxPackedBlocks * kAmxKeys * D);
  s.acc_columns.resize(R * D);  // group g's O^T at g * D: written first by its first key tile
  s.positions.assign(R, -1);  // of each row's token; -1 for padding (sees no key)
  for (int64_t r = 0; r < rows; ++r) s.positions[r] = int32_t(first_position + r / Q);
  pack_queries_amx(c, item, first_row, rows, R, s.query_pairs.data());
  // The scores are scaled inside the exponent, max(s) * scale being max(s * scale) for scale > 0;
  // soft-capped scores (and a scale <= 0) are scaled first.
  const bool prescaled = c.logits_soft_cap > 0.0f || !(c.scale > 0.0f);
  const float factor = prescaled ? 1.0f : c.scale;
  const __m512 scale = _mm512_set1_ps(factor), scale_log2e = _mm512_set1_ps(factor * kLog2e);
  const __m512 negative_infinity = _mm512_set1_ps(kNegInf);
  alignas(64) float scores[kAmxKeyTile * 32];                     // S^T of a key tile: [key][row of the group]
  alignas(64) uint32_t probs[kAmxKeyTile / kAmxKeys][2][16 * 16];  // P^T in pairs: [block][row tile][pair][row]
  uint16_t *key_rows = s.key_rows.data(), *value_columns = s.value_columns.data();
  configure_tiles({64, 64, 64, 64, 64, 64, 64, 64});
  for (int64_t first_packed = 0; first_packed < num_blocks; first_packed += kAmxPackedBlocks) {
    const int64_t end_packed = std::min(num_blocks, first_packed + kAmxPackedBlocks);
    pack_key_blocks_amx(c, item, keys, first_packed, end_packed, key_rows, value_columns);
    for (int64_t group = 0; group < R; group += 32) {
      // The group's tokens sit at positions [first_position + first_token, first_position + last_token].
      const int64_t first_token = group / Q, last_token = std::min(rows - 1, group + 31) / Q;
      const int64_t lowest_key = c.sliding_window > 0
                                     ? std::max(keys.begin, first_position + first_token - c.sliding_window + 1)
                                     : keys.begin;
      const int64_t group_first_block = (lowest_key - keys.begin) / kAmxKeys;
      const int64_t first_block = std::max(first_packed, group_first_block);
      const int64_t end_block = std::min(end_packed, (first_position + last_token - keys.begin) / kAmxKeys + 1);
      const uint32_t* query_tiles = s.query_pairs.data() + (group / 16) * chunks * 256;
      float* acc_columns = s.acc_columns.data() + group * D;  // O^T: [d][row of the group]
      for (int64_t tile_block = first_block; tile_block < end_block; tile_block += kAmxKeyTile / kAmxKeys) {
        const int nb = int(std::min<int64_t>(kAmxKeyTile / kAmxKeys, end_block - tile_block));
        const int64_t tile_key = keys.begin + tile_block * kAmxKeys;  // position of the tile's first key
        const bool first_tile = tile_block == group_first_block;
        for (int b = 0; b < nb; ++b) {  // S^T
          const uint16_t* block_keys = key_rows + (tile_block + b - first_packed) * kAmxKeys * D;
          zero_accumulators();
          for (int64_t chunk = 0; chunk < chunks; ++chunk)
            multiply_2x2(block_keys + 32 * chunk, block_keys + 16 * D + 32 * chunk, int(D * 2),
                         query_tiles + chunk * 256, query_tiles + (chunks + chunk) * 256);
          store_accumulators(scores + b * kAmxKeys * 32, 32);
        }
        if (prescaled)
          for (int i = 0; i < nb * kAmxKeys * 32; ++i)
            scores[i] = c.logits_soft_cap > 0.0f ? c.logits_soft_cap * std::tanh(scores[i] * c.scale / c.logits_soft_cap)
                                                 : scores[i] * c.scale;
        for (int h = 0; h < 2; ++h) {  // the online softmax of row tile h: rows group + 16h .. + 15
          const int64_t tile_row = group + 16 * h;
          const int64_t tile_first = std::min(rows - 1, tile_row) / Q, tile_last = std::min(rows - 1, tile_row + 15) / Q;
          const int64_t lowest_seen =
              c.sliding_window > 0 ? first_position + tile_last - c.sliding_window + 1 : 0;  // by every row
          const __m512i position = _mm512_loadu_si512(s.positions.data() + tile_row);
          const __m512i lowest = c.sliding_window > 0
                                     ? _mm512_sub_epi32(position, _mm512_set1_epi32(int32_t(c.sliding_window - 1)))
                                     : _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
          __m512 tile_max = negative_infinity;  // of the scores before the scale
          for (int b = 0; b < nb; ++b) {
            const int64_t block_key = tile_key + b * kAmxKeys;
            float* block_scores = scores + b * kAmxKeys * 32 + 16 * h;
            if (block_key + kAmxKeys - 1 <= first_position + tile_first && block_key >= lowest_seen) {
              for (int t = 0; t < kAmxKeys; ++t)  // every row sees every key of the block
                tile_max = _mm512_max_ps(tile_max, _mm512_load_ps(block_scores + 32 * t));
            } else {  // row r sees key j if lowest[r] <= j <= position[r]; keys past the end: past every position
              for (int t = 0; t < kAmxKeys; ++t) {
                const __m512i key = _mm512_set1_epi32(int32_t(block_key + t));
                const __mmask16 seen = _mm512_cmp_epi32_mask(key, position, _MM_CMPINT_LE) &
                                       _mm512_cmp_epi32_mask(key, lowest, _MM_CMPINT_NLT);
                const __m512 score =
                    _mm512_mask_mov_ps(negative_infinity, seen, _mm512_load_ps(block_scores + 32 * t));
                _mm512_store_ps(block_scores + 32 * t, score);
                tile_max = _mm512_max_ps(tile_max, score);
              }
            }
          }
          const __m512 old_max = _mm512_loadu_ps(s.max.data() + tile_row);
          const __m512 new_max = _mm512_max_ps(old_max, _mm512_mul_ps(tile_max, scale));
          const __m512 shift =
              _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(new_max, negative_infinity, _CMP_NEQ_OQ), new_max);
          const __m512 log2_shift = _mm512_mul_ps(shift, _mm512_set1_ps(kLog2e));
          // exp(old - shift): 0 for rows with no keys yet
          const __m512 correction = exp2_ps(_mm512_fmsub_ps(old_max, _mm512_set1_ps(kLog2e), log2_shift));
          __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(s.sum.data() + tile_row), correction);
          for (int b = 0; b < nb; ++b) {
            const float* block_scores = scores + b * kAmxKeys * 32 + 16 * h;
            for (int i = 0; i < 16; ++i) {  // exp(s * scale - shift) = 2^(s * scale * log2(e) - shift * log2(e))
              const __m512 even = _mm512_load_ps(block_scores + 64 * i), odd = _mm512_load_ps(block_scores + 64 * i + 32);
              const __m512 p_even = exp2_ps(_mm512_fmsub_ps(even, scale_log2e, log2_shift));
              const __m512 p_odd = exp2_ps(_mm512_fmsub_ps(odd, scale_log2e, log2_shift));
              sum = _mm512_add_ps(sum, _mm512_add_ps(p_even, p_odd));
              // Word r: (P[r][2i], P[r][2i + 1]) in bf16.
              _mm512_store_si512(probs[b][h] + 16 * i,
                                 interleave_halves((__m512i)_mm512_cvtne2ps_pbh(p_odd, p_even)));
            }
          }
          _mm512_storeu_ps(s.sum.data() + tile_row, sum);
          _mm512_storeu_ps(s.max.data() + tile_row, new_max);
          if (!first_tile && _mm512_cmp_ps_mask(correction, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ) != 0)
            for (int64_t d = 0; d < D; ++d) {
              float* column = acc_columns + d * 32 + 16 * h;
              _mm512_storeu_ps(column, _mm512_mul_ps(_mm512_loadu_ps(column), correction));
            }
        }
        for (int64_t d = 0; d < D; d += 32) {  // O^T rows d .. d + 31
          float* out = acc_columns + d * 32;
          if (first_tile)
            zero_accumulators();
          else
            load_accumulators(out, 32);
          for (int b = 0; b < nb; ++b) {
            const uint16_t* block_values = value_columns + ((tile_block + b - first_packed) * D + d) * kAmxKeys;
            multiply_2x2(block_values, block_values + 16 * kAmxKeys, 64, probs[b][0], probs[b][1]);
          }
          store_accumulators(out, 32);
        }
      }
    }
  }
  _tile_release();  // back unconfigured, as oneDNN's kernels and torch's SDPA leave them: the next user configures
  for (int64_t group = 0; group < R; group += 32)
    write_group_amx(c, item, first_row, group, std::min<int64_t>(32, rows - group), s.acc_columns.data() + group * D,
                    s.max.data() + group, s.sum.data() + group);
}
#endif

template <int DT>
void run_prefill_item(const Call& c, const int32_t* query_starts, const int32_t* query_lens, const PrefillItem& item,
                      Scratch& s) {
  using E = Element<DT>;
  using T = typename E::T;
  const int64_t D = c.head_dim, B = c.block_size, Q = c.query_per_kv, heads = c.unit_heads[item.unit];
  const int64_t seq_len = c.seq_lens[item.request], query_len = query_lens[item.request];
  const int64_t first_position = seq_len - query_len + item.first_token;
  const int64_t first_row = query_starts[item.request] + item.first_token;
  const Keys keys = prefill_keys(c, seq_len, query_len, item.first_token, item.num_tokens);
#if defined(HEADINFER_AMX_PREFILL)
  if (DT == kBFloat16 && is_amx_prefill(c)) return run_prefill_item_amx(c, first_row, first_position, keys, item, s);
#endif
#if defined(HEADINFER_AVX512)
#if defined(HEADINFER_BF16_DOT_PREFILL)
  if constexpr (DT == kBFloat16)
    if (is_dot_prefill(c)) return run_prefill_item_wide<DT, DotProducts>(c, first_row, first_position, keys, item, s);
#endif
  if (is_wide(c)) return run_prefill_item_wide<DT, FmaProducts<DT>>(c, first_row, first_position, keys, item, s);
#endif
  // The portable code: rows t * Q + q of queries and accumulators in slot order, scores [row][kTile].
  const int rows = int(item.num_tokens * Q);
  s.queries.resize(rows * D);
  s.acc.assign(rows * D, 0.0f);
  s.scores.resize(rows * kTile);
  s.max.assign(rows, -std::numeric_limits<float>::infinity());
  s.sum.assign(rows, 0.0f);
  for (int t = 0; t < item.num_tokens; ++t) {
    const T* query = static_cast<const T*>(c.query) + (first_row + t) * c.query_row_stride;
    for (int q = 0; q < Q; ++q) {
      const T* row = query + query_head(c, item.unit, item.head, q) * c.query_head_stride;
      float* slots = s.queries.data() + (t * Q + q) * D;
      for (int64_t d = 0; d < D; ++d) slots[to_slots<DT>(d, D, false)] = E::to_float(row[d]) * c.scale;
    }
  }
  const T* pages = static_cast<const T*>(c.unit_pages[item.unit]);
  const int32_t* table = c.block_table + item.request * c.block_table_stride;
  const int64_t row_stride = heads * D, page_elements = 2 * B * row_stride;
  Prefetch<T> prefetch(B, row_stride, D, prefetch_passes(rows, false));
  // Scores of keys [first_key, first_key + tile.num_tokens): masked, then the online softmax.
  auto attend = [&](const Tile<T>& tile, int64_t first_key) {
    float* scores = s.scores.data();
    const int num_tokens = tile.num_tokens;
    for_query_blocks(rows, [&](int q, auto block) {
      score_tile<DT, decltype(block)::value>(s.queries.data() + q * D, D, tile, row_stride, scores + q * kTile,
                                             prefetch);
    });
    if (c.logits_soft_cap > 0.0f) {
      const float cap = c.logits_soft_cap;
      for (int r = 0; r < rows; ++r)
        for (int t = 0; t < num_tokens; ++t) scores[r * kTile + t] = cap * std::tanh(scores[r * kTile + t] / cap);
    }
    for (int t = 0; t < item.num_tokens; ++t) {  // token t sees keys [lowest, position]
      const int64_t position = first_position + t;
      const int64_t lowest = c.sliding_window > 0 ? position - c.sliding_window + 1 : 0;
      if (first_key >= lowest && first_key + num_tokens - 1 <= position) continue;
      for (int q = 0; q < Q; ++q) {
        float* row = scores + (t * Q + q) * kTile;
        for (int j = 0; j < num_tokens; ++j)
          if (first_key + j > position || first_key + j < lowest) row[j] = -std::numeric_limits<float>::infinity();
      }
    }
    softmax_tile(scores, num_tokens, rows, D, s.max.data(), s.sum.data(), s.acc.data());
    for_query_blocks(rows, [&](int q, auto block) {
      accumulate_tile<DT, decltype(block)::value>(scores + q * kTile, tile, row_stride, s.acc.data() + q * D, D,
                                                  prefetch);
    });
    prefetch.step(kTile);
  };
  int64_t key = keys.begin;
  auto next_tile = [&](Tile<T>& tile) {
    tile.num_runs = tile.num_tokens = 0;
    while (key < keys.end && tile.num_tokens < kTile) {
      const int n = int(std::min({kTile - int64_t(tile.num_tokens), keys.end - key, B - key % B}));
      const T* k_rows = pages + table[key / B] * page_elements + (key % B) * row_stride + item.head * D;
      tile.add(k_rows, k_rows + B * row_stride, n);
      key += n;
    }
  };
  // Tile i is attended while tile i + 1 is prefetched.
  Tile<T> tiles[2];
  int64_t starts[2] = {key, 0};
  next_tile(tiles[0]);
  for (int i = 0; tiles[i % 2].num_tokens > 0; ++i) {
    starts[(i + 1) % 2] = key;
    next_tile(tiles[(i + 1) % 2]);
    prefetch.reset(tiles[(i + 1) % 2]);
    attend(tiles[i % 2], starts[i % 2]);
  }
  for (int t = 0; t < item.num_tokens; ++t)
    write_output<DT>(c, item.unit, int(first_row + t), item.head, s.max.data() + t * Q, s.sum.data() + t * Q,
                     s.acc.data() + t * Q * D);
}

// Checks the chunks and the block table entries that will be read; cuts the call into items.
int plan_prefill(const Call& c, const int32_t* query_lens, std::vector<PrefillItem>& items, int64_t* bad_index) {
  const int64_t B = c.block_size, Q = c.query_per_kv;
#if defined(HEADINFER_AMX_PREFILL)
  const int64_t rows_per_item = is_amx_prefill(c) ? kAmxQueryRows : kQueryRows;
#else
  const int64_t rows_per_item = kQueryRows;
#endif
  const int64_t tokens_per_item = std::max<int64_t>(1, rows_per_item / Q);
  for (int64_t r = 0; r < c.num_requests; ++r) {
    const int64_t seq_len = c.seq_lens[r], query_len = query_lens[r];
    if (query_len < 0 || query_len > seq_len) return *bad_index = r, kBadShape;
    if (query_len == 0) continue;
    if (seq_len > c.max_blocks * B) return *bad_index = r, kSequenceTooLong;
    const int32_t* table = c.block_table + r * c.block_table_stride;
    const Keys keys = prefill_keys(c, seq_len, query_len, 0, query_len);
    for (int64_t page = keys.begin / B; page < (keys.end + B - 1) / B; ++page)
      if (table[page] < 0 || table[page] >= c.num_blocks) return *bad_index = r, kBlockOutOfRange;
    for (int u = 0; u < c.num_units; ++u)
      for (int64_t first = 0; first < query_len; first += tokens_per_item) {
        const int64_t count = std::min(tokens_per_item, query_len - first);
        const Keys seen = prefill_keys(c, seq_len, query_len, first, count);
        for (int64_t h = 0; h < c.unit_heads[u]; ++h)
          items.push_back({u, int32_t(r), int32_t(h), int32_t(first), int32_t(count), (seen.end - seen.begin) * count});
      }
  }
  // The tiles of one (unit, request, head) run one after the other, largest first, so that the pages they share
  // are still in the caches; the requests' groups by decreasing work (the smallest items end the call).
  std::vector<int64_t> group_work(c.num_requests, 0);
  for (const PrefillItem& item : items) group_work[item.request] += item.work;
  std::stable_sort(items.begin(), items.end(), [&](const PrefillItem& a, const PrefillItem& b) {
    if (a.request != b.request) {
      if (group_work[a.request] != group_work[b.request]) return group_work[a.request] > group_work[b.request];
      return a.request < b.request;
    }
    if (a.unit != b.unit) return a.unit < b.unit;
    if (a.head != b.head) return a.head < b.head;
    return a.work > b.work;
  });
  return kOk;
}

template <int DT>
int run_prefill(const Call& c, const int32_t* query_starts, const int32_t* query_lens, int num_threads,
                int64_t* bad_index) {
  thread_local std::vector<PrefillItem> items;
  items.clear();
  const int status = plan_prefill(c, query_lens, items, bad_index);
  if (status != kOk) return status;
  const int64_t num_items = int64_t(items.size());
  const int threads = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_items)));
  const PrefillItem* item_data = items.data();
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    thread_local Scratch scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < num_items; ++i) run_prefill_item<DT>(c, query_starts, query_lens, item_data[i], scratch);
  }
  return kOk;
}

}  // namespace

extern "C" {

// Bumped when a signature below changes; the Python side checks it.
int headinfer_cpu_attention_abi_version() { return 4; }

// The instruction path this build takes for head dims that are a multiple of 32 (see the top).
const char* headinfer_cpu_attention_isa() {
#if defined(HEADINFER_AMX)
  if (amx_permitted()) return "amx";
  return "avx512";
#elif defined(HEADINFER_AVX512_BF16)
  return bf16_values() ? "avx512bf16pv" : "avx512bf16";
#elif defined(HEADINFER_AVX512)
  return "avx512";
#else
  return "portable";
#endif
}

// Decode attention of `num_units` units of one layer (see the top of this file).
//
// dtype: 0 float32, 1 float16, 2 bfloat16 (pages, query and out alike).
// unit_pages[u]: pages [num_blocks, 2, block_size, unit_heads[u], head_dim], contiguous.
// unit_first_head[u]: the layer's KV head index of the unit's head 0.
// query, out: element (r, query head g, d) at r * row_stride + g * head_stride + d.
// block_table: [num_requests, >= max_blocks] int32 with row stride block_table_stride.
// seq_lens: [num_requests] int32, keys 0 .. seq_len - 1 (0: the output is zeros).
// sliding_window: 0 none, else keys j >= seq_len - sliding_window only.
// logits_soft_cap: 0 none, else s = cap * tanh(s / cap) after scaling.
// sinks: null or float32 [number of query heads of the layer]: a logit in the denominator only.
// Returns 0, or a Status; bad_index gets the offending request.
int headinfer_decode_attention(int dtype, int num_units, const void* const* unit_pages, const int64_t* unit_heads,
                               const int64_t* unit_first_head, int64_t num_blocks, int64_t block_size,
                               int64_t head_dim, int64_t query_per_kv, int64_t num_requests, const void* query,
                               int64_t query_row_stride, int64_t query_head_stride, void* out,
                               int64_t out_row_stride, int64_t out_head_stride, const int32_t* block_table,
                               int64_t block_table_stride, int64_t max_blocks, const int32_t* seq_lens,
                               float scale, int64_t sliding_window, float logits_soft_cap, const float* sinks,
                               int num_threads, int64_t* bad_index) {
  if (num_units < 0 || block_size <= 0 || head_dim <= 0 || query_per_kv <= 0 || num_requests < 0) return kBadShape;
  const Call call{dtype, num_units, unit_pages, unit_heads, unit_first_head, num_blocks, block_size, head_dim,
                  query_per_kv, num_requests, query, query_row_stride, query_head_stride, out, out_row_stride,
                  out_head_stride, block_table, block_table_stride, max_blocks, seq_lens, scale, sliding_window,
                  logits_soft_cap, sinks};
  num_threads = std::max(1, num_threads);
  switch (dtype) {
    case kFloat32:
      return run<kFloat32>(call, num_threads, bad_index);
    case kFloat16:
      return run<kFloat16>(call, num_threads, bad_index);
    case kBFloat16:
      return run<kBFloat16>(call, num_threads, bad_index);
    default:
      return kBadDType;
  }
}

// The instruction path of the prefill kernel for bf16 head dims that are a multiple of 32: "amx" where
// this build and Linux allow AMX tiles, else "avx512bf16" where it multiplies by VDPBF16PS, else the
// decode path's.
const char* headinfer_cpu_prefill_isa() {
#if defined(HEADINFER_AMX_PREFILL)
  if (amx_permitted()) return "amx";
#endif
#if defined(HEADINFER_BF16_DOT_PREFILL)
  return "avx512bf16";
#else
  return headinfer_cpu_attention_isa();
#endif
}

// Causal prefill attention of `num_units` units of one layer (see "Prefill" above): arguments as
// headinfer_decode_attention's, and
// query_starts, query_lens: [num_requests] int32: request r's chunk is rows query_starts[r] ..
//   query_starts[r] + query_lens[r] - 1 of query and out, its tokens at positions
//   seq_lens[r] - query_lens[r] .. seq_lens[r] - 1 (0 <= query_lens[r] <= seq_lens[r]).
// sliding_window: 0 none, else the token at position p sees keys j > p - sliding_window only.
int headinfer_prefill_attention(int dtype, int num_units, const void* const* unit_pages, const int64_t* unit_heads,
                                const int64_t* unit_first_head, int64_t num_blocks, int64_t block_size,
                                int64_t head_dim, int64_t query_per_kv, int64_t num_requests, const void* query,
                                int64_t query_row_stride, int64_t query_head_stride, void* out,
                                int64_t out_row_stride, int64_t out_head_stride, const int32_t* query_starts,
                                const int32_t* query_lens, const int32_t* block_table, int64_t block_table_stride,
                                int64_t max_blocks, const int32_t* seq_lens, float scale, int64_t sliding_window,
                                float logits_soft_cap, const float* sinks, int num_threads, int64_t* bad_index) {
  if (num_units < 0 || block_size <= 0 || head_dim <= 0 || query_per_kv <= 0 || num_requests < 0) return kBadShape;
  const Call call{dtype, num_units, unit_pages, unit_heads, unit_first_head, num_blocks, block_size, head_dim,
                  query_per_kv, num_requests, query, query_row_stride, query_head_stride, out, out_row_stride,
                  out_head_stride, block_table, block_table_stride, max_blocks, seq_lens, scale, sliding_window,
                  logits_soft_cap, sinks};
  num_threads = std::max(1, num_threads);
  switch (dtype) {
    case kFloat32:
      return run_prefill<kFloat32>(call, query_starts, query_lens, num_threads, bad_index);
    case kFloat16:
      return run_prefill<kFloat16>(call, query_starts, query_lens, num_threads, bad_index);
    case kBFloat16:
      return run_prefill<kBFloat16>(call, query_starts, query_lens, num_threads, bad_index);
    default:
      return kBadDType;
  }
}

}  // extern "C"
