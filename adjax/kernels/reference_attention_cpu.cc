// softmax(q k^T) v per head on x86 CPUs with AVX-512: the projector's reference attention as
// one fused pass per block of queries, forward and backward, called from JAX through XLA's FFI.
//
// Why a kernel: XLA:CPU runs this attention (16 heads of d = 48 over 2,048 reference tokens)
// at about half the rate of its large matmuls. Its products have a 48-wide inner or outer
// dimension, each goes through a general GEMM that packs its operands and writes its whole
// (block, R) result before the softmax reads it again, and the key panels of a row-major
// (d, R) operand sit 8 KB apart, so they fall into one L1 set. Here the keys and values of a
// head are packed once into contiguous (d, 32) panels; output tiles (4 x 64 in the forward
// logits, 8 x 32 or 8 x d elsewhere) stay in registers over the whole 48-long contraction; a
// block's (64, R) logits are kept panel-major in L2, each row's maximum taken as its tiles are
// made; and the backward pass forms the weights and their gradients tile by tile in registers.
//
// Math (per head; q is already scaled by the caller):
//   forward:  s = q k^T, lse = logsumexp_r s, out = exp(s - lse) v
//   backward: p = exp(q k^T - lse), dp = d_out v^T, ds = p (dp - <d_out, out>),
//             dq = ds k, dk = ds^T q, dv = p^T d_out
// the same as adjax/models/reference_attention.py's "blocked" implementation.
//
// Shapes: q, out, d_out (H, T, D); k, v (H, R, D); lse (H, T); float32, row-major.
// D is 16, 32, 48 or 64 and T a multiple of 8 (the Python side pads queries); any R >= 1.
// The *Amx handlers at the end take bfloat16 q, k, v, out, d_out (lse float32) and T a
// multiple of 32, and run every product on the AMX tile unit.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kPanel = 32;        // key columns per panel: two 16-float vectors
constexpr int kBlock = 64;        // queries per block: the block's (64, R) rows stay in L2

inline int NumPanels(int r) { return (r + kPanel - 1) / kPanel; }

// exp(x) for float32 lanes: Cody-Waite reduction to [-ln2/2, ln2/2], a degree-7 polynomial,
// and scalef for the power of two (no integer bit tricks). Lanes below -87 give exactly 0,
// so masked (-inf) logits contribute nothing; NaN stays NaN (so a diverged step is still seen
// as non-finite downstream, as with XLA's exp).
inline __m512 Exp(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);   // maxps returns its second operand for NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(f, f), _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(p, n));
}

// (R, D) rows -> panels [ceil(R / 32)][D][32], zero beyond R.
template <int D>
void PackPanels(const float* rows, int r, float* panels) {
  const int num_panels = NumPanels(r);
  std::memset(panels, 0, sizeof(float) * num_panels * D * kPanel);
  for (int j = 0; j < r; ++j) {
    float* column = panels + (j / kPanel) * D * kPanel + j % kPanel;
    for (int k = 0; k < D; ++k) column[k * kPanel] = rows[j * D + k];
  }
}

// The inverse of PackPanels for the first r columns.
template <int D>
void UnpackPanels(const float* panels, int r, float* rows) {
  for (int j = 0; j < r; ++j) {
    const float* column = panels + (j / kPanel) * D * kPanel + j % kPanel;
    for (int k = 0; k < D; ++k) rows[j * D + k] = column[k * kPanel];
  }
}

// The (rows, R) logits, weights and their gradients of a block of queries are kept panel-major:
// element (i, j) at [j / 32][i][j % 32], so that each 32-column panel of the block is one
// contiguous 8 KB run. Row-major (64, 2048) rows would be 8 KB apart, each in its own page,
// where neither the L1 sets, the TLB nor the hardware prefetcher serve a column sweep well.
inline float* Tile(float* block, int panel, int row) {
  return block + (size_t(panel) * kBlock + row) * kPanel;
}
inline const float* Tile(const float* block, int panel, int row) {
  return block + (size_t(panel) * kBlock + row) * kPanel;
}
// Floats in one such block (all of R, padded to whole panels).
inline size_t BlockFloats(int num_panels) { return size_t(num_panels) * kBlock * kPanel; }

// Lane masks of the columns below r in panel p (both all-ones but in the last panel).
inline void ValidColumns(int p, int r, __mmask16* mask0, __mmask16* mask1) {
  const int valid = std::min(kPanel, r - p * kPanel);
  *mask0 = valid >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
  *mask1 = valid >= 32 ? 0xFFFF
                       : valid <= 16 ? 0 : static_cast<__mmask16>((1u << (valid - 16)) - 1);
}

// The forward pass's logits: s = a panels for rows i < rows (a multiple of 8), with -inf in
// the columns at or beyond r, and each row's maximum, kept as it is made.
template <int D>
void LogitsAndRowMax(const float* a, const float* panels, int num_panels, int r, float* s,
                     float* row_max, int rows) {
  __m512 running[kBlock];
  for (int i = 0; i < rows; ++i) running[i] = _mm512_set1_ps(-INFINITY);
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  // Two panels at a time (4 rows x 64 columns): 4 panel loads and 4 broadcasts feed 16 FMAs.
  for (int p = 0; p < num_panels; p += 2) {
    const bool pair = p + 1 < num_panels;
    const float* panel0 = panels + p * D * kPanel;
    const float* panel1 = pair ? panel0 + D * kPanel : panel0;
    __mmask16 mask[4];
    ValidColumns(p, r, &mask[0], &mask[1]);
    if (pair) ValidColumns(p + 1, r, &mask[2], &mask[3]); else mask[2] = mask[3] = 0;
    for (int i = 0; i < rows; i += 4) {
      __m512 c[4][4];
      for (int t = 0; t < 4; ++t)
        for (int u = 0; u < 4; ++u) c[t][u] = _mm512_setzero_ps();
      for (int k = 0; k < D; ++k) {
        const __m512 b0 = _mm512_loadu_ps(panel0 + k * kPanel);
        const __m512 b1 = _mm512_loadu_ps(panel0 + k * kPanel + 16);
        const __m512 b2 = _mm512_loadu_ps(panel1 + k * kPanel);
        const __m512 b3 = _mm512_loadu_ps(panel1 + k * kPanel + 16);
        for (int t = 0; t < 4; ++t) {
          const __m512 x = _mm512_set1_ps(a[(i + t) * D + k]);
          c[t][0] = _mm512_fmadd_ps(x, b0, c[t][0]);
          c[t][1] = _mm512_fmadd_ps(x, b1, c[t][1]);
          c[t][2] = _mm512_fmadd_ps(x, b2, c[t][2]);
          c[t][3] = _mm512_fmadd_ps(x, b3, c[t][3]);
        }
      }
      for (int t = 0; t < 4; ++t) {
        __m512 m = running[i + t];
        for (int u = 0; u < (pair ? 4 : 2); ++u) {
          const __m512 x = _mm512_mask_mov_ps(minus_inf, mask[u], c[t][u]);
          _mm512_storeu_ps(Tile(s, p + u / 2, i + t) + 16 * (u % 2), x);
          m = _mm512_max_ps(m, x);
        }
        running[i + t] = m;
      }
    }
  }
  for (int i = 0; i < rows; ++i) row_max[i] = _mm512_reduce_max_ps(running[i]);
}

// s <- exp(s - row_max) in place; returns each row's sum in total.
void ExponentialsAndRowSums(float* s, const float* row_max, int num_panels, float* total,
                            int rows) {
  __m512 sums[kBlock];
  for (int i = 0; i < rows; ++i) sums[i] = _mm512_setzero_ps();
  for (int p = 0; p < num_panels; ++p) {
    for (int i = 0; i < rows; ++i) {
      const __m512 shift = _mm512_set1_ps(row_max[i]);
      float* tile = Tile(s, p, i);
      const __m512 e0 = Exp(_mm512_sub_ps(_mm512_loadu_ps(tile), shift));
      const __m512 e1 = Exp(_mm512_sub_ps(_mm512_loadu_ps(tile + 16), shift));
      _mm512_storeu_ps(tile, e0);
      _mm512_storeu_ps(tile + 16, e1);
      sums[i] = _mm512_add_ps(sums[i], _mm512_add_ps(e0, e1));
    }
  }
  for (int i = 0; i < rows; ++i) total[i] = _mm512_reduce_add_ps(sums[i]);
}

// out[i, :] = sum_{j < r} w[i, j] x[j, :] for rows i < rows; w panel-major, x is (r, D).
template <int D>
void WeightsTimesRows(const float* w, const float* x, int r, float* out, int rows) {
  constexpr int kVectors = D / 16;
  constexpr int kTile = kVectors <= 3 ? 8 : 4;  // accumulators + operands fit 32 registers
  for (int i = 0; i < rows; i += kTile) {
    __m512 c[kTile][kVectors];
    for (int t = 0; t < kTile; ++t)
      for (int u = 0; u < kVectors; ++u) c[t][u] = _mm512_setzero_ps();
    for (int p = 0; p * kPanel < r; ++p) {
      const float* tile = Tile(w, p, i);
      const int columns = std::min(kPanel, r - p * kPanel);
      for (int jj = 0; jj < columns; ++jj) {
        const float* x_row = x + (p * kPanel + jj) * D;
        __m512 b[kVectors];
        for (int u = 0; u < kVectors; ++u) b[u] = _mm512_loadu_ps(x_row + 16 * u);
        for (int t = 0; t < kTile; ++t) {
          const __m512 y = _mm512_set1_ps(tile[t * kPanel + jj]);
          for (int u = 0; u < kVectors; ++u) c[t][u] = _mm512_fmadd_ps(y, b[u], c[t][u]);
        }
      }
    }
    for (int t = 0; t < kTile; ++t)
      for (int u = 0; u < kVectors; ++u) _mm512_storeu_ps(out + (i + t) * D + 16 * u, c[t][u]);
  }
}

// panels[j / 32][k][j % 32] += sum_i a[i, k] w[i, j] over rows i < rows: a^T w accumulated
// into the packed layout (a is (rows, D); w panel-major with num_panels panels).
template <int D>
void AccumulateTransposedProduct(const float* a, const float* w, int rows, int num_panels,
                                 float* panels) {
  for (int p = 0; p < num_panels; ++p) {
    float* panel = panels + p * D * kPanel;
    const float* w_panel = Tile(w, p, 0);
    for (int k0 = 0; k0 < D; k0 += 8) {
      __m512 c[8][2];
      for (int t = 0; t < 8; ++t) {
        c[t][0] = _mm512_loadu_ps(panel + (k0 + t) * kPanel);
        c[t][1] = _mm512_loadu_ps(panel + (k0 + t) * kPanel + 16);
      }
      for (int i = 0; i < rows; ++i) {
        const __m512 w0 = _mm512_loadu_ps(w_panel + i * kPanel);
        const __m512 w1 = _mm512_loadu_ps(w_panel + i * kPanel + 16);
        for (int t = 0; t < 8; ++t) {
          const __m512 x = _mm512_set1_ps(a[i * D + k0 + t]);
          c[t][0] = _mm512_fmadd_ps(x, w0, c[t][0]);
          c[t][1] = _mm512_fmadd_ps(x, w1, c[t][1]);
        }
      }
      for (int t = 0; t < 8; ++t) {
        _mm512_storeu_ps(panel + (k0 + t) * kPanel, c[t][0]);
        _mm512_storeu_ps(panel + (k0 + t) * kPanel + 16, c[t][1]);
      }
    }
  }
}

// The backward pass's per-block core, in one sweep over the (rows, R) tiles: for each 4 x 32
// tile, s = q k^T and dp = d_out v^T stay in registers through the 48-long contraction, then
// p = exp(s - lse) and ds = p (dp - row_dot) are stored: the logits never reach memory.
// Columns at or beyond r get p = ds = 0.
template <int D>
void WeightsAndLogitGradients(const float* q, const float* d_out, const float* key_panels,
                              const float* value_panels, int num_panels, int r,
                              const float* lse, const float* row_dot, float* weights,
                              float* d_logits, int rows) {
  for (int p = 0; p < num_panels; ++p) {
    const float* keys = key_panels + p * D * kPanel;
    const float* values = value_panels + p * D * kPanel;
    __mmask16 mask0, mask1;
    ValidColumns(p, r, &mask0, &mask1);
    for (int i = 0; i < rows; i += 4) {
      __m512 s[4][2], dp[4][2];
      for (int t = 0; t < 4; ++t) s[t][0] = s[t][1] = dp[t][0] = dp[t][1] = _mm512_setzero_ps();
      for (int k = 0; k < D; ++k) {
        const __m512 k0 = _mm512_loadu_ps(keys + k * kPanel);
        const __m512 k1 = _mm512_loadu_ps(keys + k * kPanel + 16);
        const __m512 v0 = _mm512_loadu_ps(values + k * kPanel);
        const __m512 v1 = _mm512_loadu_ps(values + k * kPanel + 16);
        for (int t = 0; t < 4; ++t) {
          const __m512 x = _mm512_set1_ps(q[(i + t) * D + k]);
          const __m512 y = _mm512_set1_ps(d_out[(i + t) * D + k]);
          s[t][0] = _mm512_fmadd_ps(x, k0, s[t][0]);
          s[t][1] = _mm512_fmadd_ps(x, k1, s[t][1]);
          dp[t][0] = _mm512_fmadd_ps(y, v0, dp[t][0]);
          dp[t][1] = _mm512_fmadd_ps(y, v1, dp[t][1]);
        }
      }
      for (int t = 0; t < 4; ++t) {
        const __m512 shift = _mm512_set1_ps(lse[i + t]);
        const __m512 dot = _mm512_set1_ps(row_dot[i + t]);
        const __m512 p0 = _mm512_maskz_mov_ps(mask0, Exp(_mm512_sub_ps(s[t][0], shift)));
        const __m512 p1 = _mm512_maskz_mov_ps(mask1, Exp(_mm512_sub_ps(s[t][1], shift)));
        float* w_tile = Tile(weights, p, i + t);
        float* ds_tile = Tile(d_logits, p, i + t);
        _mm512_storeu_ps(w_tile, p0);
        _mm512_storeu_ps(w_tile + 16, p1);
        _mm512_storeu_ps(ds_tile, _mm512_mul_ps(p0, _mm512_sub_ps(dp[t][0], dot)));
        _mm512_storeu_ps(ds_tile + 16, _mm512_mul_ps(p1, _mm512_sub_ps(dp[t][1], dot)));
      }
    }
  }
}

// v's storage, grown to at least n elements: per-thread scratch is kept between calls so that
// its pages are touched once.
template <typename T>
T* Sized(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

struct Scratch {
  std::vector<float> key_panels, value_panels, d_key_panels, d_value_panels, logits, d_logits;
};

Scratch& ThreadScratch() {
  thread_local Scratch scratch;
  return scratch;
}

template <int D>
void ForwardHead(const float* q, const float* k, const float* v, int t, int r, float* out,
                 float* lse) {
  Scratch& scratch = ThreadScratch();
  const int num_panels = NumPanels(r);
  float* key_panels = Sized(scratch.key_panels, size_t(num_panels) * D * kPanel);
  float* s = Sized(scratch.logits, BlockFloats(num_panels));
  PackPanels<D>(k, r, key_panels);
  float row_max[kBlock], total[kBlock];
  for (int b = 0; b < t; b += kBlock) {
    const int rows = std::min(kBlock, t - b);
    LogitsAndRowMax<D>(q + b * D, key_panels, num_panels, r, s, row_max, rows);
    ExponentialsAndRowSums(s, row_max, num_panels, total, rows);
    float* out_block = out + b * D;
    WeightsTimesRows<D>(s, v, r, out_block, rows);
    // Normalising the (rows, D) output is cheaper than the (rows, R) weights.
    for (int i = 0; i < rows; ++i) {
      lse[b + i] = row_max[i] + std::log(total[i]);
      const float inverse = 1.0f / total[i];
      for (int c = 0; c < D; ++c) out_block[i * D + c] *= inverse;
    }
  }
}

template <int D>
void BackwardHead(const float* q, const float* k, const float* v, const float* out,
                  const float* lse, const float* d_out, int t, int r, float* d_q, float* d_k,
                  float* d_v) {
  Scratch& scratch = ThreadScratch();
  const int num_panels = NumPanels(r);
  const size_t panel_floats = size_t(num_panels) * D * kPanel;
  float* key_panels = Sized(scratch.key_panels, panel_floats);
  float* value_panels = Sized(scratch.value_panels, panel_floats);
  float* d_key_panels = Sized(scratch.d_key_panels, panel_floats);
  float* d_value_panels = Sized(scratch.d_value_panels, panel_floats);
  float* weights = Sized(scratch.logits, BlockFloats(num_panels));
  float* d_logits = Sized(scratch.d_logits, BlockFloats(num_panels));
  PackPanels<D>(k, r, key_panels);
  PackPanels<D>(v, r, value_panels);
  std::memset(d_key_panels, 0, sizeof(float) * panel_floats);
  std::memset(d_value_panels, 0, sizeof(float) * panel_floats);
  float row_dot[kBlock];   // sum_r p dp = <d_out, out> for each query
  for (int b = 0; b < t; b += kBlock) {
    const int rows = std::min(kBlock, t - b);
    const float* q_block = q + b * D;
    const float* d_out_block = d_out + b * D;
    for (int i = 0; i < rows; ++i) {
      float dot = 0.0f;
      for (int c = 0; c < D; ++c) dot += d_out_block[i * D + c] * out[(b + i) * D + c];
      row_dot[i] = dot;
    }
    WeightsAndLogitGradients<D>(q_block, d_out_block, key_panels, value_panels, num_panels, r,
                                lse + b, row_dot, weights, d_logits, rows);
    WeightsTimesRows<D>(d_logits, k, r, d_q + b * D, rows);
    AccumulateTransposedProduct<D>(q_block, d_logits, rows, num_panels, d_key_panels);
    AccumulateTransposedProduct<D>(d_out_block, weights, rows, num_panels, d_value_panels);
  }
  UnpackPanels<D>(d_key_panels, r, d_k);
  UnpackPanels<D>(d_value_panels, r, d_v);
}

// Runs work(h) for h < heads on the calling thread and on XLA's intra-op pool. The caller waits
// only for heads that another thread has started, never for a task still queued, so a busy
// pool cannot deadlock it.
template <typename Work>
void ForEachHead(ffi::ThreadPool& pool, int heads, Work work) {
  struct Shared {
    std::atomic<int> next{0};
    int done = 0;
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto shared = std::make_shared<Shared>();
  auto run = [shared, heads, work]() {
    int finished_here = 0;
    for (int h; (h = shared->next.fetch_add(1)) < heads; ++finished_here) work(h);
    if (finished_here > 0) {
      std::lock_guard<std::mutex> lock(shared->mutex);
      shared->done += finished_here;
      if (shared->done == heads) shared->finished.notify_all();
    }
  };
  const int helpers = static_cast<int>(std::min<int64_t>(pool.num_threads(), heads) - 1);
  for (int i = 0; i < helpers; ++i) pool.Schedule(decltype(run)(run));
  run();
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done == heads; });
}

struct Dims {
  int heads, t, r, d;
};

template <typename Buffer>
ffi::Error CheckedDims(Buffer& q, Buffer& k, Buffer& v, int query_multiple, Dims* dims) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3 || kd[0] != qd[0] || kd[2] != qd[2] ||
      vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2])
    return ffi::Error::InvalidArgument("expected q (H, T, D) and k, v (H, R, D)");
  *dims = {static_cast<int>(qd[0]), static_cast<int>(qd[1]), static_cast<int>(kd[1]),
           static_cast<int>(qd[2])};
  if (dims->t % query_multiple != 0)
    return ffi::Error::InvalidArgument("T must be a multiple of " + std::to_string(query_multiple));
  if (dims->r < 1) return ffi::Error::InvalidArgument("R must be at least 1");
  if (dims->d != 16 && dims->d != 32 && dims->d != 48 && dims->d != 64)
    return ffi::Error::InvalidArgument("D must be 16, 32, 48 or 64");
  return ffi::Error::Success();
}

template <template <int> class Op, typename... Args>
void Dispatch(int d, Args... args) {
  switch (d) {
    case 16: Op<16>::Run(args...); break;
    case 32: Op<32>::Run(args...); break;
    case 48: Op<48>::Run(args...); break;
    default: Op<64>::Run(args...); break;
  }
}

template <int D>
struct Forward {
  static void Run(ffi::ThreadPool* pool, Dims n, const float* q, const float* k, const float* v,
                  float* out, float* lse) {
    ForEachHead(*pool, n.heads, [=](int h) {
      ForwardHead<D>(q + size_t(h) * n.t * D, k + size_t(h) * n.r * D, v + size_t(h) * n.r * D,
                     n.t, n.r, out + size_t(h) * n.t * D, lse + size_t(h) * n.t);
    });
  }
};

template <int D>
struct Backward {
  static void Run(ffi::ThreadPool* pool, Dims n, const float* q, const float* k, const float* v,
                  const float* out, const float* lse, const float* d_out, float* d_q, float* d_k,
                  float* d_v) {
    ForEachHead(*pool, n.heads, [=](int h) {
      const size_t tq = size_t(h) * n.t * D, tk = size_t(h) * n.r * D;
      BackwardHead<D>(q + tq, k + tk, v + tk, out + tq, lse + size_t(h) * n.t, d_out + tq, n.t,
                      n.r, d_q + tq, d_k + tk, d_v + tk);
    });
  }
};

// ---------------------------------------------------------------------------------------------
// bfloat16 operands (the recipe's compute dtype) on CPUs with AMX: every product of the scheme
// on the tile matrix unit (TDPBF16PS: a 16 x 32 by 32 x 16 bfloat16 product into 16 x 16
// float32 per instruction), the softmax and its gradient in float32 on AVX-512 between them.
// Logits, exponentials, row sums, log-sum-exps and every accumulation are float32; the softmax
// weights and logit gradients are rounded to bfloat16 before their products (as PyTorch's
// bfloat16 autocast does). All tiles are configured 16 rows x 64 bytes. Compiled for these
// instructions function by function: the rest of the library still runs on AVX-512 CPUs
// without them, and Python uses these handlers only where the CPU has them and Linux has
// granted this process the tile state (AdjaxAmxReady).
//
// Layouts, per head (R32: keys rounded up to 32; Dp: features rounded up to 32; all zero-padded):
//   feature pairs (logits and dp, operand B): [R32 / 16][Dp / 2][16 keys][2 features]
//   key pairs (products with V or K, operand B): [R32 / 32][D / 16][16 key pairs][16 f][2 keys]
//   query pairs (dk, dv, operand B): [R32 / 16][16 query pairs][16 keys][2 queries]

#define ADJAX_AMX                                                                          \
  __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,fma,amx-tile,amx-bf16")))

using bf16 = uint16_t;

constexpr int kAmxQueries = 32;   // queries per backward block (the forward takes 16 at a time)

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Configures the tiles for this kernel (8 tiles of 16 rows x 64 bytes) on the calling thread
// for the lifetime of the object, then gives back the thread's previous configuration: the
// pool's threads also run XLA's own AMX products (YNNPACK), whose libraries may keep a tile
// configuration across calls on a thread.
class TileScope {
 public:
  ADJAX_AMX TileScope() {
    _tile_storeconfig(&saved_);
    TileConfig config;
    for (int i = 0; i < 8; ++i) {
      config.colsb[i] = 64;
      config.rows[i] = 16;
    }
    _tile_loadconfig(&config);
  }
  ADJAX_AMX ~TileScope() {
    if (saved_.palette != 0) {
      _tile_loadconfig(&saved_);
    } else {
      _tile_release();
    }
  }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;

 private:
  TileConfig saved_;
};

ADJAX_AMX inline __m512 WidenBf16(const bf16* p) {   // 16 bfloat16 -> 16 float32
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

ADJAX_AMX inline __m256i Narrow(__m512 x) {   // 16 float32 -> 16 bfloat16, nearest even
  return (__m256i)_mm512_cvtneps_pbh(x);
}

ADJAX_AMX inline __m512i NarrowPair(__m512 low, __m512 high) {   // low's 16, then high's 16
  return (__m512i)_mm512_cvtne2ps_pbh(high, low);
}

ADJAX_AMX inline __m512i Interleave(__m512 a, __m512 b) {   // a0 b0 a1 b1 ... as bfloat16
  const __m512i index = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
  return _mm512_permutexvar_epi16(index, NarrowPair(a, b));
}

inline bf16 NarrowScalar(float x) {   // nearest even, as vcvtneps2bf16 (NaN kept a NaN)
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<bf16>((bits >> 16) | 0x40);
  return static_cast<bf16>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

constexpr int PaddedFeatures(int d) { return (d + 31) / 32 * 32; }
inline int Keys32(int r) { return (r + 31) / 32 * 32; }

template <int D>
void PackFeaturePairs(const bf16* rows, int r, bf16* out) {
  constexpr int kPairs = PaddedFeatures(D) / 2;
  const int r32 = Keys32(r);
  std::memset(out, 0, sizeof(bf16) * size_t(r32) * kPairs * 2);
  for (int j = 0; j < r; ++j) {
    bf16* base = out + (size_t(j / 16) * kPairs * 16 + j % 16) * 2;
    for (int m = 0; m < D / 2; ++m) {
      base[m * 32] = rows[j * D + 2 * m];
      base[m * 32 + 1] = rows[j * D + 2 * m + 1];
    }
  }
}

template <int D>
void PackKeyPairs(const bf16* rows, int r, bf16* out) {
  const int r32 = Keys32(r);
  std::memset(out, 0, sizeof(bf16) * size_t(r32) * D);
  for (int j = 0; j < r; ++j)
    for (int c = 0; c < D; ++c) {
      const size_t tile = size_t(j / 32) * (D / 16) + c / 16;
      out[(tile * 16 + (j % 32) / 2) * 32 + (c % 16) * 2 + j % 2] = rows[j * D + c];
    }
}

// rows (n, D) bfloat16 -> (n, Dp) with zero features beyond D.
template <int D>
void PadFeatures(const bf16* rows, int n, bf16* out) {
  constexpr int kDp = PaddedFeatures(D);
  for (int i = 0; i < n; ++i) {
    std::memcpy(out + i * kDp, rows + i * D, sizeof(bf16) * D);
    std::memset(out + i * kDp + D, 0, sizeof(bf16) * (kDp - D));
  }
}

// Lanes of key block kb (16 keys) below r.
inline __mmask16 ValidKeys(int kb, int r) {
  const int valid = r - kb * 16;
  return valid >= 16 ? 0xFFFF : valid <= 0 ? 0 : static_cast<__mmask16>((1u << valid) - 1);
}

// The logits of key block KB into tile C, then into s at [KB][16][16]; the queries' feature
// chunks are in tiles 4 and 5 (5 only for Dp = 64), the keys' pass through tiles 6 and 7.
#define ADJAX_LOGIT_TILE(C, KB)                                                          \
  do {                                                                                   \
    _tile_zero(C);                                                                       \
    _tile_loadd(6, keys + size_t(KB) * kDp * 16, 64);                                    \
    _tile_dpbf16ps(C, 4, 6);                                                             \
    if (kDp == 64) {                                                                     \
      _tile_loadd(7, keys + size_t(KB) * kDp * 16 + 16 * 32, 64);                       \
      _tile_dpbf16ps(C, 5, 7);                                                           \
    }                                                                                    \
    _tile_stored(C, s + size_t(KB) * 256, 64);                                           \
  } while (0)

// Folds the logit tiles of key blocks [kb, kb + count) into each row's running maximum; keys
// at or beyond r are set to -inf on the way (their weights are then exactly 0).
ADJAX_AMX inline void FoldRowMax(float* s, int kb, int count, int r, __m512* running) {
  for (int u = kb; u < kb + count; ++u) {
    float* tile = s + size_t(u) * 256;
    const __mmask16 valid = ValidKeys(u, r);
    for (int i = 0; i < 16; ++i) {
      __m512 x = _mm512_loadu_ps(tile + i * 16);
      if (valid != 0xFFFF) {
        x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, x);
        _mm512_storeu_ps(tile + i * 16, x);
      }
      running[i] = _mm512_max_ps(running[i], x);
    }
  }
}

// Logits of 16 queries (q_pad: 16 x Dp) against every key block, one 16 x 16 float32 tile per
// key block ([kb][16][16]) in s, and each row's maximum, taken while the tiles are in L1.
template <int D>
ADJAX_AMX void AmxLogits(const bf16* q_pad, const bf16* keys, int num_key_blocks, int r,
                         float* s, __m512* running) {
  constexpr int kDp = PaddedFeatures(D);
  _tile_loadd(4, q_pad, kDp * 2);
  if (kDp == 64) _tile_loadd(5, q_pad + 32, kDp * 2);
  int kb = 0;
  for (; kb + 4 <= num_key_blocks; kb += 4) {
    ADJAX_LOGIT_TILE(0, kb);
    ADJAX_LOGIT_TILE(1, kb + 1);
    ADJAX_LOGIT_TILE(2, kb + 2);
    ADJAX_LOGIT_TILE(3, kb + 3);
    FoldRowMax(s, kb, 4, r, running);
  }
  for (; kb < num_key_blocks; ++kb) {
    ADJAX_LOGIT_TILE(0, kb);
    FoldRowMax(s, kb, 1, r, running);
  }
}

// out (16 x D float32, row stride D) = a (16 x R32 bfloat16: 16 x 32 tiles with row stride 32,
// a_block_stride elements apart) times the key-pair layout b.
template <int D>
ADJAX_AMX void AmxRowsTimesKeyPairs(const bf16* a, size_t a_block_stride, const bf16* b,
                                    int num_key_pairs_blocks, float* out) {
  constexpr int kF = D / 16;
  _tile_zero(0);
  if (kF > 1) _tile_zero(1);
  if (kF > 2) _tile_zero(2);
  if (kF > 3) _tile_zero(3);
  for (int j = 0; j < num_key_pairs_blocks; ++j) {
    _tile_loadd(4, a + size_t(j) * a_block_stride, 64);
    const bf16* bj = b + size_t(j) * kF * 512;
    _tile_loadd(5, bj, 64);
    _tile_dpbf16ps(0, 4, 5);
    if (kF > 1) { _tile_loadd(6, bj + 512, 64); _tile_dpbf16ps(1, 4, 6); }
    if (kF > 2) { _tile_loadd(7, bj + 1024, 64); _tile_dpbf16ps(2, 4, 7); }
    if (kF > 3) { _tile_loadd(5, bj + 1536, 64); _tile_dpbf16ps(3, 4, 5); }
  }
  _tile_stored(0, out, D * 4);
  if (kF > 1) _tile_stored(1, out + 16, D * 4);
  if (kF > 2) _tile_stored(2, out + 32, D * 4);
  if (kF > 3) _tile_stored(3, out + 48, D * 4);
}

struct AmxScratch {
  std::vector<bf16> key_features, value_features, key_pairs, value_pairs, q_pad, d_out_pad,
      weights, d_logits_rows, d_logits_pairs, weight_pairs, q_t, d_out_t;
  std::vector<float> logits, d_weights, block_out, d_key_t, d_value_t;
};

AmxScratch& ThreadAmxScratch() {
  thread_local AmxScratch scratch;
  return scratch;
}

template <int D>
ADJAX_AMX void AmxForwardHead(const bf16* q, const bf16* k, const bf16* v, int t, int r,
                              bf16* out, float* lse) {
  constexpr int kDp = PaddedFeatures(D);
  AmxScratch& scratch = ThreadAmxScratch();
  const int r32 = Keys32(r), key_blocks = r32 / 16, pair_blocks = r32 / 32;
  bf16* keys = Sized(scratch.key_features, size_t(r32) * kDp);
  bf16* value_pairs = Sized(scratch.value_pairs, size_t(r32) * D);
  bf16* q_pad = Sized(scratch.q_pad, size_t(16) * kDp);
  float* s = Sized(scratch.logits, size_t(key_blocks) * 256);
  bf16* weights = Sized(scratch.weights, size_t(pair_blocks) * 512);
  float* block_out = Sized(scratch.block_out, size_t(16) * D);
  PackFeaturePairs<D>(k, r, keys);
  PackKeyPairs<D>(v, r, value_pairs);
  const TileScope tiles;
  for (int b = 0; b < t; b += 16) {
    PadFeatures<D>(q + size_t(b) * D, 16, q_pad);
    __m512 running[16];
    for (int i = 0; i < 16; ++i) running[i] = _mm512_set1_ps(-INFINITY);
    AmxLogits<D>(q_pad, keys, key_blocks, r, s, running);
    float row_max[16], total[16];
    __m512 sums[16];
    for (int i = 0; i < 16; ++i) {
      row_max[i] = _mm512_reduce_max_ps(running[i]);
      sums[i] = _mm512_setzero_ps();
    }
    for (int j = 0; j < pair_blocks; ++j)
      for (int i = 0; i < 16; ++i) {
        const __m512 shift = _mm512_set1_ps(row_max[i]);
        const float* pair = s + size_t(2 * j) * 256 + i * 16;   // row i of key blocks 2j, 2j + 1
        const __m512 e0 = Exp(_mm512_sub_ps(_mm512_loadu_ps(pair), shift));
        const __m512 e1 = Exp(_mm512_sub_ps(_mm512_loadu_ps(pair + 256), shift));
        sums[i] = _mm512_add_ps(sums[i], _mm512_add_ps(e0, e1));
        _mm512_storeu_si512(weights + size_t(j) * 512 + i * 32, NarrowPair(e0, e1));
      }
    AmxRowsTimesKeyPairs<D>(weights, 512, value_pairs, pair_blocks, block_out);
    for (int i = 0; i < 16; ++i) {
      total[i] = _mm512_reduce_add_ps(sums[i]);
      lse[b + i] = row_max[i] + std::log(total[i]);
      const __m512 inverse = _mm512_set1_ps(1.0f / total[i]);
      for (int c = 0; c < D; c += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + size_t(b + i) * D + c),
                            Narrow(_mm512_mul_ps(_mm512_loadu_ps(block_out + i * D + c), inverse)));
    }
  }
}

// (n x D) rows -> [D / 16][16 features][32 rows] (operand A of the key and value gradients).
template <int D>
void TransposeBlock(const bf16* rows, bf16* out) {
  for (int i = 0; i < kAmxQueries; ++i)
    for (int c = 0; c < D; ++c) out[(c / 16) * 512 + (c % 16) * 32 + i] = rows[i * D + c];
}

#define ADJAX_GRADIENT_TILES(KB)                                                         \
  do {                                                                                   \
    _tile_zero(0);                                                                       \
    _tile_zero(1);                                                                       \
    _tile_zero(2);                                                                       \
    _tile_zero(3);                                                                       \
    for (int c = 0; c < kDp / 32; ++c) {                                                 \
      _tile_loadd(5, keys + (size_t(KB) * kDp / 2 + 16 * c) * 32, 64);                   \
      _tile_loadd(4, q_pad + 32 * c, kDp * 2);                                           \
      _tile_dpbf16ps(0, 4, 5);                                                           \
      _tile_loadd(4, q_pad + 16 * kDp + 32 * c, kDp * 2);                                \
      _tile_dpbf16ps(1, 4, 5);                                                           \
      _tile_loadd(5, values + (size_t(KB) * kDp / 2 + 16 * c) * 32, 64);                 \
      _tile_loadd(4, d_out_pad + 32 * c, kDp * 2);                                       \
      _tile_dpbf16ps(2, 4, 5);                                                           \
      _tile_loadd(4, d_out_pad + 16 * kDp + 32 * c, kDp * 2);                            \
      _tile_dpbf16ps(3, 4, 5);                                                           \
    }                                                                                    \
    _tile_stored(0, s, 64);                                                              \
    _tile_stored(1, s + 256, 64);                                                        \
    _tile_stored(2, dp, 64);                                                             \
    _tile_stored(3, dp + 256, 64);                                                       \
  } while (0)

template <int D>
ADJAX_AMX void AmxBackwardHead(const bf16* q, const bf16* k, const bf16* v, const bf16* out,
                               const float* lse, const bf16* d_out, int t, int r, bf16* d_q,
                               bf16* d_k, bf16* d_v) {
  constexpr int kDp = PaddedFeatures(D);
  constexpr int kF = D / 16;
  AmxScratch& scratch = ThreadAmxScratch();
  const int r32 = Keys32(r), key_blocks = r32 / 16, pair_blocks = r32 / 32;
  bf16* keys = Sized(scratch.key_features, size_t(r32) * kDp);
  bf16* values = Sized(scratch.value_features, size_t(r32) * kDp);
  bf16* key_pairs = Sized(scratch.key_pairs, size_t(r32) * D);
  bf16* q_pad = Sized(scratch.q_pad, size_t(kAmxQueries) * kDp);
  bf16* d_out_pad = Sized(scratch.d_out_pad, size_t(kAmxQueries) * kDp);
  bf16* q_t = Sized(scratch.q_t, size_t(kF) * 512);
  bf16* d_out_t = Sized(scratch.d_out_t, size_t(kF) * 512);
  float* s = Sized(scratch.logits, 512);    // one key block's 32 x 16 tiles
  float* dp = Sized(scratch.d_weights, 512);
  bf16* ds_rows = Sized(scratch.d_logits_rows, size_t(pair_blocks) * 1024);
  bf16* ds_pairs = Sized(scratch.d_logits_pairs, size_t(key_blocks) * 512);
  bf16* p_pairs = Sized(scratch.weight_pairs, size_t(key_blocks) * 512);
  float* block_out = Sized(scratch.block_out, size_t(16) * D);
  float* d_key_t = Sized(scratch.d_key_t, size_t(kF) * key_blocks * 256);
  float* d_value_t = Sized(scratch.d_value_t, size_t(kF) * key_blocks * 256);
  PackFeaturePairs<D>(k, r, keys);
  PackFeaturePairs<D>(v, r, values);
  PackKeyPairs<D>(k, r, key_pairs);
  std::memset(d_key_t, 0, sizeof(float) * kF * key_blocks * 256);
  std::memset(d_value_t, 0, sizeof(float) * kF * key_blocks * 256);
  const TileScope tiles;
  for (int b = 0; b < t; b += kAmxQueries) {
    const bf16* q_block = q + size_t(b) * D;
    const bf16* d_out_block = d_out + size_t(b) * D;
    PadFeatures<D>(q_block, kAmxQueries, q_pad);
    PadFeatures<D>(d_out_block, kAmxQueries, d_out_pad);
    TransposeBlock<D>(q_block, q_t);
    TransposeBlock<D>(d_out_block, d_out_t);
    float row_dot[kAmxQueries];   // <d_out, out> per query
    for (int i = 0; i < kAmxQueries; ++i) {
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < D; c += 16)
        acc = _mm512_fmadd_ps(WidenBf16(d_out_block + i * D + c),
                              WidenBf16(out + size_t(b + i) * D + c), acc);
      row_dot[i] = _mm512_reduce_add_ps(acc);
    }
    // Per key block: s = q k^T and dp = d_out v^T on the tiles (rows 0-15 then 16-31, into
    // four 1 KB tiles that stay in L1), then p = exp(s - lse) and ds = p (dp - row_dot),
    // stored in the layouts of the three products below.
    for (int kb = 0; kb < key_blocks; ++kb) {
      ADJAX_GRADIENT_TILES(kb);
      const __mmask16 valid = ValidKeys(kb, r);
      for (int n = 0; n < kAmxQueries / 2; ++n) {
        __m512 p[2], ds[2];
        for (int e = 0; e < 2; ++e) {
          const int i = 2 * n + e;
          p[e] = _mm512_maskz_mov_ps(
              valid, Exp(_mm512_sub_ps(_mm512_loadu_ps(s + i * 16), _mm512_set1_ps(lse[b + i]))));
          ds[e] = _mm512_mul_ps(p[e], _mm512_sub_ps(_mm512_loadu_ps(dp + i * 16),
                                                    _mm512_set1_ps(row_dot[i])));
          _mm256_storeu_si256(
              reinterpret_cast<__m256i*>(ds_rows + size_t(kb / 2) * 1024 + i * 32 + (kb % 2) * 16),
              Narrow(ds[e]));
        }
        _mm512_storeu_si512(ds_pairs + size_t(kb) * 512 + n * 32, Interleave(ds[0], ds[1]));
        _mm512_storeu_si512(p_pairs + size_t(kb) * 512 + n * 32, Interleave(p[0], p[1]));
      }
    }
    // dq = ds k, 16 queries at a time.
    for (int h = 0; h < 2; ++h) {
      AmxRowsTimesKeyPairs<D>(ds_rows + h * 512, 1024, key_pairs, pair_blocks, block_out);
      for (int i = 0; i < 16; ++i)
        for (int c = 0; c < D; c += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(d_q + size_t(b + 16 * h + i) * D + c),
                              Narrow(_mm512_loadu_ps(block_out + i * D + c)));
    }
    // dk^T += q^T ds and dv^T += d_out^T p, one 16-feature block at a time.
    for (int f = 0; f < kF; ++f) {
      _tile_loadd(4, q_t + f * 512, 64);
      _tile_loadd(6, d_out_t + f * 512, 64);
      float* dk_tiles = d_key_t + size_t(f) * key_blocks * 256;
      float* dv_tiles = d_value_t + size_t(f) * key_blocks * 256;
      for (int kb = 0; kb < key_blocks; ++kb) {
        _tile_loadd(0, dk_tiles + size_t(kb) * 256, 64);
        _tile_loadd(1, dv_tiles + size_t(kb) * 256, 64);
        _tile_loadd(5, ds_pairs + size_t(kb) * 512, 64);
        _tile_loadd(7, p_pairs + size_t(kb) * 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_dpbf16ps(1, 6, 7);
        _tile_stored(0, dk_tiles + size_t(kb) * 256, 64);
        _tile_stored(1, dv_tiles + size_t(kb) * 256, 64);
      }
    }
  }
  for (int j = 0; j < r; ++j)
    for (int c = 0; c < D; ++c) {
      const size_t at = (size_t(c / 16) * key_blocks + j / 16) * 256 + (c % 16) * 16 + j % 16;
      d_k[size_t(j) * D + c] = NarrowScalar(d_key_t[at]);
      d_v[size_t(j) * D + c] = NarrowScalar(d_value_t[at]);
    }
}

template <int D>
struct AmxForward {
  static void Run(ffi::ThreadPool* pool, Dims n, const bf16* q, const bf16* k, const bf16* v,
                  bf16* out, float* lse) {
    ForEachHead(*pool, n.heads, [=](int h) {
      AmxForwardHead<D>(q + size_t(h) * n.t * D, k + size_t(h) * n.r * D,
                        v + size_t(h) * n.r * D, n.t, n.r, out + size_t(h) * n.t * D,
                        lse + size_t(h) * n.t);
    });
  }
};

template <int D>
struct AmxBackward {
  static void Run(ffi::ThreadPool* pool, Dims n, const bf16* q, const bf16* k, const bf16* v,
                  const bf16* out, const float* lse, const bf16* d_out, bf16* d_q, bf16* d_k,
                  bf16* d_v) {
    ForEachHead(*pool, n.heads, [=](int h) {
      const size_t tq = size_t(h) * n.t * D, tk = size_t(h) * n.r * D;
      AmxBackwardHead<D>(q + tq, k + tk, v + tk, out + tq, lse + size_t(h) * n.t, d_out + tq,
                         n.t, n.r, d_q + tq, d_k + tk, d_v + tk);
    });
  }
};

// The FFI entry points, one per pass for both handler families: Forward / Backward on float32
// operands (queries in multiples of 8) and AmxForward / AmxBackward on bfloat16 ones (multiples
// of kAmxQueries); the log-sum-exp is float32 in both.
template <ffi::DataType T, template <int> class Op, int kQueryMultiple>
ffi::Error ForwardEntry(ffi::ThreadPool pool, ffi::Buffer<T> q, ffi::Buffer<T> k,
                        ffi::Buffer<T> v, ffi::ResultBuffer<T> out,
                        ffi::ResultBuffer<ffi::F32> lse) {
  Dims n;
  if (ffi::Error error = CheckedDims(q, k, v, kQueryMultiple, &n); error.failure()) return error;
  Dispatch<Op>(n.d, &pool, n, q.typed_data(), k.typed_data(), v.typed_data(), out->typed_data(),
               lse->typed_data());
  return ffi::Error::Success();
}

template <ffi::DataType T, template <int> class Op, int kQueryMultiple>
ffi::Error BackwardEntry(ffi::ThreadPool pool, ffi::Buffer<T> q, ffi::Buffer<T> k,
                         ffi::Buffer<T> v, ffi::Buffer<T> out, ffi::Buffer<ffi::F32> lse,
                         ffi::Buffer<T> d_out, ffi::ResultBuffer<T> d_q, ffi::ResultBuffer<T> d_k,
                         ffi::ResultBuffer<T> d_v) {
  Dims n;
  if (ffi::Error error = CheckedDims(q, k, v, kQueryMultiple, &n); error.failure()) return error;
  Dispatch<Op>(n.d, &pool, n, q.typed_data(), k.typed_data(), v.typed_data(), out.typed_data(),
               lse.typed_data(), d_out.typed_data(), d_q->typed_data(), d_k->typed_data(),
               d_v->typed_data());
  return ffi::Error::Success();
}

// Their signatures for XLA: q, k, v (and out, lse, d_out backward) in, out and lse (d_q, d_k,
// d_v backward) out.
template <ffi::DataType T>
auto ForwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

template <ffi::DataType T>
auto BackwardBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<T>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AdjaxReferenceAttentionForward,
                              (ForwardEntry<ffi::F32, Forward, 8>), ForwardBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdjaxReferenceAttentionBackward,
                              (BackwardEntry<ffi::F32, Backward, 8>), BackwardBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdjaxReferenceAttentionForwardAmx,
                              (ForwardEntry<ffi::BF16, AmxForward, kAmxQueries>),
                              ForwardBinding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(AdjaxReferenceAttentionBackwardAmx,
                              (BackwardEntry<ffi::BF16, AmxBackward, kAmxQueries>),
                              BackwardBinding<ffi::BF16>());

// 1 where Linux lets this process use the AMX tile registers (asking for them once: the
// permission is the whole process's), else 0. Python calls it before choosing the AMX handlers.
extern "C" int AdjaxAmxReady() {
  constexpr long kRequestPermission = 0x1023;   // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;                // XFEATURE_XTILEDATA
  static const int ready = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0 ? 1 : 0;
  return ready;
}
