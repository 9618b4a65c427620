// How the AMX kernels of amx_gemm.h work. For each chunk of 32 reduction rows, the weight becomes bfloat16 in
// AMX's pair layout (a tile row holds 16 columns, each with two consecutive reduction rows): 4-bit codes by a
// byte-select and a table lookup, 8-bit codes by widening and conversion (both exact: the codes are small
// integers), bfloat16 weights by interleaving two rows. One tile product per 16 columns adds x[:, chunk] @
// w[chunk, cols] to a float32 tile; up to 8 chunks at a time, strip after strip of 64 columns (four C tiles per 16
// rows of x, kept in memory between passes), so the reads run along the weight's rows. At a scale group's end the
// tiles are scaled into the totals.
//
// 4 bits: one byte-select (vpmultishiftqb) per 16 columns takes its bytes from a qword of a broadcast 32-byte load,
// so the columns come out of order: within each unit of 32 columns, lane l of tile h (0 or 1) holds column
// unit_column(h, l). Scales and zero points are permuted the same way, the totals back at the end.
#include "ops/cpu/amx_gemm.h"

#include "ops/cpu/lane_mask.h"
#include "ops/cpu/skinny_gemm.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TORCHMOE_HAVE_AMX 1
#define TORCHMOE_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,fma,amx-tile,amx-bf16")))
#else
#define TORCHMOE_HAVE_AMX 0
#endif

namespace torchmoe::cpu {
namespace {

#if TORCHMOE_HAVE_AMX

constexpr int kTileRows = 16;    // rows of x per pass (A and C tiles)
constexpr int kChunkRows = 32;   // reduction rows per tile product (16 bfloat16 pairs)
constexpr int kStripCols = 64;   // columns per pass: four C tiles
// Chunks a strip decodes at a time (32 KB of tiles, in L1) before its C tiles go back to memory: loading and
// storing C tiles every chunk cost a third of the time (measured: bfloat16, 16 rows, 431 against 280 us).
constexpr int kPassChunks = 8;

// Lane l of tile h in a 32-column unit (4 bits): output qword q = l / 2 of the byte-select reads qword q % 4 of the
// broadcast load (columns 8 (q % 4) .. + 7) and takes its columns 4h + 2 (q / 4) and + 1.
constexpr int unit_column(int h, int l) {
  const int q = l / 2;
  return 8 * (q % 4) + 4 * h + 2 * (q / 4) + l % 2;
}

// bfloat16 bits of a small integer (exact).
constexpr uint16_t bf16_of_int(int v) {
  if (v == 0) return 0;
  const uint16_t sign = v < 0 ? 0x8000 : 0;
  const int m = v < 0 ? -v : v;
  int e = 0;
  while ((m >> (e + 1)) != 0) ++e;
  return static_cast<uint16_t>(sign | ((127 + e) << 7) | ((m << (7 - e)) & 0x7F));
}
static_assert(bf16_of_int(-8) == 0xC100 && bf16_of_int(7) == 0x40E0 && bf16_of_int(1) == 0x3F80);

struct Int4Tables {
  // code -> bfloat16 (symmetric: code - 8); 16 entries, twice: the lookup reads the low 5 bits of a word
  alignas(64) uint16_t symmetric[32];
  alignas(64) uint16_t asymmetric[32];
  // byte-select controls of tiles 0 and 1: the low byte of each 16-bit word starts at a code's nibble
  alignas(64) uint8_t control[2][64];
  // tile h's lanes as indices into the unit's 32 values in column order
  alignas(64) int32_t unit_columns[2][16];
};

constexpr Int4Tables make_int4_tables() {
  Int4Tables t{};
  for (int c = 0; c < 32; ++c) {
    t.symmetric[c] = bf16_of_int(c % 16 - 8);
    t.asymmetric[c] = bf16_of_int(c % 16);
  }
  for (int h = 0; h < 2; ++h) {
    for (int q = 0; q < 8; ++q) {
      const int bit = 8 * (4 * h + 2 * (q / 4));
      const int starts[4] = {bit, bit + 4, bit + 8, bit + 12};  // low, high nibble of the pair's two columns
      for (int i = 0; i < 4; ++i) t.control[h][8 * q + 2 * i] = static_cast<uint8_t>(starts[i]);
    }
    for (int l = 0; l < 16; ++l) t.unit_columns[h][l] = unit_column(h, l);
  }
  return t;
}
constexpr Int4Tables kInt4Tables = make_int4_tables();

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-3: the C tiles of a strip's four 16-column blocks (rows x 16 float32); 4: x's rows x 32 reduction rows;
// 5-7: codes (16 pairs of reduction rows x 16 columns).
TORCHMOE_AMX void configure_tiles(int rows) {
  TileConfig config;
  for (int t = 0; t < 5; ++t) {
    config.rows[t] = static_cast<uint8_t>(rows);
    config.colsb[t] = 64;
  }
  for (int t = 5; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

// BITS: 4 or 8 (QuantizedMatrix codes), or 16 (a bfloat16 matrix: q points at its values, n is its row stride, a
// single group, no scales).

// The column (within the strip) of lane l of C tile t.
template <int BITS>
inline int strip_column(int t, int l) {
  return BITS == 4 ? 32 * (t / 2) + unit_column(t % 2, l) : 16 * t + l;
}

// w[p0 : p0 + 32, j : j + cols) in pair layout, tile t = 16 columns (4 bits: in unit order), 1 KB each.
template <int BITS, bool Asym>
TORCHMOE_AMX inline void decode_chunk(const QuantizedMatrix& w, int64_t p0, int64_t j, int64_t cols,
                                            uint32_t (*tiles)[16][16]) {
  if constexpr (BITS == 4) {
    const __m512i table = _mm512_load_si512(Asym ? kInt4Tables.asymmetric : kInt4Tables.symmetric);
    const __m512i control0 = _mm512_load_si512(kInt4Tables.control[0]);
    const __m512i control1 = _mm512_load_si512(kInt4Tables.control[1]);
    for (int u = 0; u < kStripCols / 32; ++u) {
      const int64_t left = cols - 32 * u;
      if (left <= 0) break;
      const __mmask32 mask = lane_mask32(left);
      const uint8_t* q = w.q + (p0 >> 1) * w.n + j + 32 * u;
#pragma GCC unroll 16
      for (int pair = 0; pair < 16; ++pair) {
        const __m512i bytes = _mm512_broadcast_i64x4(_mm256_maskz_loadu_epi8(mask, q + pair * w.n));
        _mm512_store_si512(tiles[2 * u][pair],
                           _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(control0, bytes), table));
        _mm512_store_si512(tiles[2 * u + 1][pair],
                           _mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(control1, bytes), table));
      }
    }
  } else if constexpr (BITS == 16) {
    // word 2i: column i of the even row, word 2i + 1: of the odd row
    alignas(64) static constexpr uint16_t kInterleave[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                             37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                             11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i interleave = _mm512_load_si512(kInterleave);
    for (int t = 0; t < kStripCols / 16; ++t) {
      const int64_t left = cols - 16 * t;
      if (left <= 0) break;
      const __mmask16 mask = lane_mask(left);
      const uint16_t* v = reinterpret_cast<const uint16_t*>(w.q) + p0 * w.n + j + 16 * t;
#pragma GCC unroll 16
      for (int pair = 0; pair < 16; ++pair) {
        const __m256i even = _mm256_maskz_loadu_epi16(mask, v + 2 * pair * w.n);
        const __m256i odd = _mm256_maskz_loadu_epi16(mask, v + (2 * pair + 1) * w.n);
        _mm512_store_si512(tiles[t][pair], _mm512_permutex2var_epi16(_mm512_castsi256_si512(even), interleave,
                                                                     _mm512_castsi256_si512(odd)));
      }
    }
  } else {
    const __m512i high_half = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
    for (int t = 0; t < kStripCols / 16; ++t) {
      const int64_t left = cols - 16 * t;
      if (left <= 0) break;
      const __mmask16 mask = lane_mask(left);
      const int8_t* q = reinterpret_cast<const int8_t*>(w.q) + p0 * w.n + j + 16 * t;
#pragma GCC unroll 16
      for (int pair = 0; pair < 16; ++pair) {
        // float32 codes are exact, so their bfloat16 is the high half of the bits
        const __m512i even = _mm512_castps_si512(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + 2 * pair * w.n))));
        const __m512i odd = _mm512_castps_si512(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, q + (2 * pair + 1) * w.n))));
        // (odd & 0xFFFF0000) | (even >> 16)
        _mm512_store_si512(tiles[t][pair],
                           _mm512_ternarylogic_epi32(_mm512_srli_epi32(even, 16), odd, high_half, 0xF8));
      }
    }
  }
}

// The strip's lines of reduction rows [p, p + 32) (one line per packed row), where they exist: the hardware
// prefetcher alone leaves a thread's short runs along many rows at about half the read bandwidth.
template <int BITS>
TORCHMOE_AMX inline void prefetch_chunk(const QuantizedMatrix& w, int64_t p, int64_t j) {
  if (p >= w.k) return;
  constexpr int kStoredRows = BITS == 4 ? kChunkRows / 2 : kChunkRows;
  constexpr int kBytes = BITS == 16 ? 2 : 1;  // per column of a stored row
  const char* q = reinterpret_cast<const char*>(w.q) + ((BITS == 4 ? p >> 1 : p) * w.n + j) * kBytes;
#pragma GCC unroll 32
  for (int i = 0; i < kStoredRows; ++i) {
    for (int line = 0; line < kBytes; ++line) _mm_prefetch(q + (i * w.n) * kBytes + 64 * line, _MM_HINT_T0);
  }
}

// 16 lanes of C tile t's scale row (or zero points) in lane order.
template <int BITS>
TORCHMOE_AMX inline __m512 lane_values(const float* column_ordered, int t) {
  // column_ordered: the strip's 64 values, column order, zero past the strip's columns
  if constexpr (BITS != 4) {
    return _mm512_load_ps(column_ordered + 16 * t);
  } else {
    return _mm512_permutex2var_ps(_mm512_load_ps(column_ordered + 32 * (t / 2)),
                                  _mm512_load_si512(kInt4Tables.unit_columns[t % 2]),
                                  _mm512_load_ps(column_ordered + 32 * (t / 2) + 16));
  }
}

// Scales (and zero points) of group g for strip columns [j, j + cols), in C tile t's lane order.
template <int BITS, bool Asym>
TORCHMOE_AMX inline void scale_tile_into(const QuantizedMatrix& w, int64_t g, int64_t j, int64_t cols,
                                               const float (*c_tiles)[kTileRows][16], int rows, int n_tiles,
                                               const float* xsum, int64_t groups, float* totals, int64_t ld_totals) {
  alignas(64) float column_scales[kStripCols], column_zeros[kStripCols];
  for (int c = 0; c < kStripCols; ++c) {
    column_scales[c] = BITS == 16 ? 1.0f : c < cols ? w.scales[g * w.n + j + c] : 0.0f;
    if (Asym) column_zeros[c] = c < cols ? static_cast<float>(w.zeros[g * w.n + j + c]) : 0.0f;
  }
  for (int t = 0; t < n_tiles; ++t) {
    const __m512 scale = lane_values<BITS>(column_scales, t);
    const __m512 zero = Asym ? lane_values<BITS>(column_zeros, t) : _mm512_setzero_ps();
    for (int r = 0; r < rows; ++r) {
      __m512 sum = _mm512_load_ps(c_tiles[t][r]);
      if (Asym) sum = _mm512_fnmadd_ps(zero, _mm512_set1_ps(xsum[r * groups + g]), sum);
      float* total = totals + r * ld_totals + 16 * t;
      _mm512_store_ps(total, _mm512_fmadd_ps(scale, sum, _mm512_load_ps(total)));
    }
  }
}

// Columns [j0, j1) for `rows` rows of x (row blocks of tile_rows). kPassChunks chunks of 32 reduction rows at a
// time, strip after strip of 64 columns, so that the reads run along the weight's rows as the hardware prefetcher
// likes; a strip's chunks are decoded once for all row blocks, whose C tiles wait in c_buffer between passes.
// x_blocks[b] points at row block b's first row (tile_rows rows readable from there).
template <int BITS, bool Asym>
TORCHMOE_AMX void amx_block(const QuantizedMatrix& w, int rows, int tile_rows, int64_t j0, int64_t j1,
                            const c10::BFloat16* const* x_blocks, int64_t ldx, const float* xsum,
                            c10::BFloat16* out, int64_t ldo) {
  alignas(64) uint32_t tiles[kPassChunks][4][16][16];
  const int blocks = (rows + tile_rows - 1) / tile_rows;
  const int64_t width = j1 - j0;
  const int64_t strips = (width + kStripCols - 1) / kStripCols;
  const int64_t ld_totals = strips * kStripCols;
  const int64_t x_stride = ldx * static_cast<int64_t>(sizeof(c10::BFloat16));
  thread_local std::vector<float> c_buffer, total_buffer;
  c_buffer.resize(static_cast<size_t>(strips * blocks * 4 * kTileRows * 16 + 16));
  total_buffer.assign(static_cast<size_t>(blocks * tile_rows * ld_totals + 16), 0.0f);
  // 64-byte aligned views (tile stores need no alignment, the vector loads of the scaling do)
  auto aligned = [](float* p) {
    return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
  };
  auto* c_tiles = reinterpret_cast<float (*)[4][kTileRows][16]>(aligned(c_buffer.data()));
  float* totals = aligned(total_buffer.data());
  const int64_t groups = w.k / w.group_size;
  constexpr int64_t kPassRows = kPassChunks * kChunkRows;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g_begin = g * w.group_size, g_end = g_begin + w.group_size;
    for (int64_t p0 = g_begin; p0 < g_end; p0 += kPassRows) {
      const int chunks = static_cast<int>(std::min<int64_t>(kPassRows, g_end - p0) / kChunkRows);
      const bool first = p0 == g_begin, last = p0 + chunks * kChunkRows == g_end;
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t j = j0 + s * kStripCols, cols = std::min<int64_t>(kStripCols, j1 - j);
        // 4 bits: a unit's two tiles share its 32 columns
        const int n_tiles = BITS == 4 ? 2 * static_cast<int>((cols + 31) / 32) : static_cast<int>((cols + 15) / 16);
        for (int c = 0; c < chunks; ++c) {
          prefetch_chunk<BITS>(w, p0 + kPassRows + c * kChunkRows, j);
          decode_chunk<BITS, Asym>(w, p0 + c * kChunkRows, j, cols, tiles[c]);
        }
        asm volatile("" ::: "memory");  // the tile loads read what the decode and earlier tile stores wrote
        for (int b = 0; b < blocks; ++b) {
          float (*ct)[kTileRows][16] = c_tiles[s * blocks + b];
          if (first) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, ct[0], 64);
            _tile_loadd(1, ct[1], 64);
            _tile_loadd(2, ct[2], 64);
            _tile_loadd(3, ct[3], 64);
          }
          for (int c = 0; c < chunks; ++c) {
            _tile_loadd(4, x_blocks[b] + p0 + c * kChunkRows, x_stride);
            _tile_loadd(5, tiles[c][0], 64);
            _tile_dpbf16ps(0, 4, 5);
            if (n_tiles > 1) {
              _tile_loadd(6, tiles[c][1], 64);
              _tile_dpbf16ps(1, 4, 6);
            }
            if (n_tiles > 2) {
              _tile_loadd(7, tiles[c][2], 64);
              _tile_dpbf16ps(2, 4, 7);
            }
            if (n_tiles > 3) {
              _tile_loadd(5, tiles[c][3], 64);
              _tile_dpbf16ps(3, 4, 5);
            }
          }
          _tile_stored(0, ct[0], 64);
          _tile_stored(1, ct[1], 64);
          _tile_stored(2, ct[2], 64);
          _tile_stored(3, ct[3], 64);
          asm volatile("" ::: "memory");  // the loads below read what the tile stores wrote
          if (last) {
            const int block_rows = std::min(tile_rows, rows - b * tile_rows);
            scale_tile_into<BITS, Asym>(w, g, j, cols, ct, block_rows, n_tiles, xsum + b * tile_rows * groups, groups,
                                        totals + b * tile_rows * ld_totals + s * kStripCols, ld_totals);
          }
        }
      }
    }
  }
  for (int r = 0; r < rows; ++r) {
    for (int64_t s = 0; s < strips; ++s) {
      const int64_t j = j0 + s * kStripCols, cols = std::min<int64_t>(kStripCols, j1 - j);
      for (int t = 0; t < 4; ++t) {
        for (int l = 0; l < 16; ++l) {
          const int c = strip_column<BITS>(t, l);
          const float total = totals[r * ld_totals + s * kStripCols + 16 * t + l];
          if (c < cols) out[r * ldo + j + c] = static_cast<c10::BFloat16>(total);
        }
      }
    }
  }
}

// Rows of x per call of amx_block, which decodes the weight once for all of them (its buffers grow with them).
constexpr int64_t kMaxBlockRows = 16 * kTileRows;

template <int BITS, bool Asym>
TORCHMOE_AMX void amx_mm_impl(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const c10::BFloat16* x,
                              int64_t ldx, int64_t x_rows, c10::BFloat16* out, int64_t ldo) {
  const int64_t groups = w.k / w.group_size;
  // up to 16 rows: tiles of exactly that many; more: 16-row tiles, the last one reading past the rows asked for
  // (rows of x that follow, or a zero-padded copy where x ends)
  const int tile_rows = static_cast<int>(std::min<int64_t>(kTileRows, rows));
  configure_tiles(tile_rows);
  std::vector<float> xsum;
  thread_local std::vector<c10::BFloat16> padded;
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxBlockRows) {
    const int block_rows = static_cast<int>(std::min<int64_t>(kMaxBlockRows, rows - r0));
    const c10::BFloat16* xr = x + r0 * ldx;
    const int blocks = (block_rows + tile_rows - 1) / tile_rows;
    const c10::BFloat16* x_blocks[kMaxBlockRows / kTileRows];
    for (int b = 0; b < blocks; ++b) x_blocks[b] = xr + b * tile_rows * ldx;
    const int64_t last_end = r0 + static_cast<int64_t>(blocks) * tile_rows;  // rows the last tile reads up to
    if (last_end > x_rows) {
      const int64_t first = r0 + (blocks - 1) * tile_rows, have = x_rows - first;
      padded.assign(static_cast<size_t>(tile_rows * ldx), c10::BFloat16(0.0f));
      std::copy(x + first * ldx, x + first * ldx + have * ldx, padded.begin());
      x_blocks[blocks - 1] = padded.data();
    }
    if (Asym) {
      xsum.assign(static_cast<size_t>(blocks * tile_rows * groups), 0.0f);
      for (int r = 0; r < block_rows; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
          float sum = 0.0f;
          for (int64_t p = g * w.group_size; p < (g + 1) * w.group_size; ++p) {
            sum += static_cast<float>(xr[r * ldx + p]);
          }
          xsum[r * groups + g] = sum;
        }
      }
    }
    amx_block<BITS, Asym>(w, block_rows, tile_rows, j0, j1, x_blocks, ldx, xsum.data(), out + r0 * ldo, ldo);
  }
  _tile_release();
}

bool cpu_has_amx_bf16() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) == 0) return false;
  const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
  return tile && bf16;
}

// Linux hands out AMX's tile state only to a process that asks for it (arch_prctl ARCH_REQ_XCOMP_PERM).
bool request_amx_permission() {
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

#endif  // TORCHMOE_HAVE_AMX

}  // namespace

bool amx_available() {
#if TORCHMOE_HAVE_AMX
  static const bool available = [] {
    const char* off = std::getenv("TORCHMOE_DISABLE_AMX");
    if (off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0) return false;
    return skinny_avx512_available() && __builtin_cpu_supports("avx512vbmi") && cpu_has_amx_bf16() &&
           request_amx_permission();
  }();
  return available;
#else
  return false;
#endif
}

bool quantized_amx_supports(const QuantizedMatrix& w) { return w.k > 0 && w.group_size % kAmxChunkRows == 0; }

void quantized_amx_mm(const QuantizedMatrix& w, int64_t rows, int64_t j0, int64_t j1, const c10::BFloat16* x,
                      int64_t ldx, int64_t x_rows, c10::BFloat16* out, int64_t ldo) {
  TORCH_INTERNAL_ASSERT(amx_available() && quantized_amx_supports(w));
  if (rows <= 0 || j1 <= j0) return;
#if TORCHMOE_HAVE_AMX
  if (w.bits == 8) return amx_mm_impl<8, false>(w, rows, j0, j1, x, ldx, x_rows, out, ldo);
  if (w.zeros != nullptr) return amx_mm_impl<4, true>(w, rows, j0, j1, x, ldx, x_rows, out, ldo);
  amx_mm_impl<4, false>(w, rows, j0, j1, x, ldx, x_rows, out, ldo);
#endif
}

void bf16_amx_mm(int64_t rows, int64_t k, int64_t j0, int64_t j1, const c10::BFloat16* x, int64_t ldx,
                 int64_t x_rows, const c10::BFloat16* w, int64_t ldw, c10::BFloat16* out, int64_t ldo) {
  TORCH_INTERNAL_ASSERT(amx_available() && k > 0 && k % kAmxChunkRows == 0);
  if (rows <= 0 || j1 <= j0) return;
#if TORCHMOE_HAVE_AMX
  const QuantizedMatrix matrix{16, k, ldw, k, reinterpret_cast<const uint8_t*>(w), nullptr, nullptr};
  amx_mm_impl<16, false>(matrix, rows, j0, j1, x, ldx, x_rows, out, ldo);
#endif
}

}  // namespace torchmoe::cpu
