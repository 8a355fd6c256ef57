// Small-batch f32 matmul for CPU decoding: out[M, N] = x[M, K] . W[K, N], M <= 8, with W pre-packed
// as column tiles [ceil(N / 32), K, 32] (zero-padded) so every tile streams contiguously.
//
// Why: XLA:CPU runs an M=8 f32 matmul at 7-15 GB/s of weights (its GEMM kernels pack W on every
// call and are tuned for large M), while a batch-8 decode step is ~85% such matmuls. Here each tile
// keeps up to 8 rows x 32 columns of accumulators in registers (AVX-512; 4 rows x 16 columns with
// AVX2's 16 registers) and reads W once from memory while the next tile is prefetched into L2 (one
// batch-8 step's matmuls of the small preset, distinct weights, quiet 2-core Xeon: 6.8-7.5 ms with
// the prefetch vs 10.2-10.7 without, 22-25 GB/s of weights). Built and loaded by
// small_batch_matmul.py (through native.py); an XLA FFI handler with the tiles shared among XLA's
// intra-op threads.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "shared_work.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;                 // columns per tile
typedef float Vec16 __attribute__((vector_size(64)));   // 16 floats: one AVX-512 register
typedef float Vec8 __attribute__((vector_size(32)));    // 8 floats: one AVX2 register

template <typename V>
inline V Load(const float* p) { V v; std::memcpy(&v, p, sizeof(v)); return v; }

// Rows [0, R) of x times NV vectors of columns of a packed tile (row stride kTile, starting at `w`)
// -> out columns [col, col + width). Every output is the same sum over k in the same order
// whichever block shape computes it, so all builds give identical results.
template <typename V, int R, int NV>
void Block(const float* x, const float* w, const float* ahead, float* out, int64_t k_dim,
           int64_t n_dim, int64_t col, int64_t width) {
  constexpr int kLanes = sizeof(V) / sizeof(float);
  V acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = V{};
  for (int64_t k = 0; k < k_dim; ++k, w += kTile, ahead += kTile) {
    // The next tile's row k into L2 while this one streams: a second stream from memory per core
    // (one sequential stream leaves the core's bandwidth idle; see SmallBatchMatmul).
    __builtin_prefetch(ahead, 0, 2);
    __builtin_prefetch(ahead + 16, 0, 2);
    V wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = Load<V>(w + j * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * k_dim + k];
      for (int j = 0; j < NV; ++j) acc[r][j] += xr * wv[j];   // FMA (-ffp-contract=fast default)
    }
  }
  for (int r = 0; r < R; ++r) {
    float row[NV * kLanes];
    std::memcpy(row, &acc[r][0], sizeof(row));
    std::memcpy(out + r * n_dim + col, row, width * sizeof(float));
  }
}

// Rows [0, R) of x times tile `t` of the packed weights -> out columns [t*32, min(t*32+32, N)).
template <int R>
void Tile(const float* x, const float* tile, const float* ahead, float* out, int64_t k_dim,
          int64_t n_dim, int64_t t) {
  const int64_t col = t * kTile;
#if defined(__AVX512F__)
  // 32 zmm registers: 8 rows x 32 columns of accumulators (16) + the two weight vectors fit.
  Block<Vec16, R, 2>(x, tile, ahead, out, k_dim, n_dim, col, std::min<int64_t>(kTile, n_dim - col));
#else
  // 16 ymm registers (AVX2): 8 x 32 accumulators would take 32 and spill on every k (issue 19:
  // 5x slower than XLA's dot). Each 16-column half of the tile is done for at most 4 rows at a time
  // (8 accumulators + 2 weight vectors); rows 4..7 re-read the half tile from cache, not memory.
  for (int64_t half = 0; half < 2 && col + 16 * half < n_dim; ++half) {
    const int64_t c = col + 16 * half, width = std::min<int64_t>(16, n_dim - c);
    Block<Vec8, (R < 4 ? R : 4), 2>(x, tile + 16 * half, ahead + 16 * half, out, k_dim, n_dim, c,
                                    width);
    if constexpr (R > 4) {
      Block<Vec8, R - 4, 2>(x + 4 * k_dim, tile + 16 * half, ahead + 16 * half, out + 4 * n_dim,
                            k_dim, n_dim, c,
                            width);
    }
  }
#endif
}

using TileFn = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t,
                        int64_t);
constexpr TileFn kTileFns[9] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>,
                                Tile<5>, Tile<6>, Tile<7>, Tile<8>};

// One call's operands, shared with the helper threads (shared_work.h).
struct Work {
  TileFn fn;
  const float* x;
  const float* w;
  float* out;
  int64_t k_dim, n_dim;
};

ffi::Error SmallBatchMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                            ffi::Buffer<ffi::F32> packed, ffi::ResultBuffer<ffi::F32> out) {
  const auto x_dims = x.dimensions(), w_dims = packed.dimensions(), out_dims = out->dimensions();
  if (x_dims.size() != 2 || w_dims.size() != 3 || out_dims.size() != 2 || w_dims[2] != kTile) {
    return ffi::Error::InvalidArgument("small_batch_matmul: expected x [M, K], packed [T, K, 32]");
  }
  const int64_t rows = x_dims[0], k_dim = x_dims[1], n_dim = out_dims[1], tiles = w_dims[0];
  if (rows < 1 || rows > 8 || w_dims[1] != k_dim || out_dims[0] != rows ||
      tiles != (n_dim + kTile - 1) / kTile) {
    return ffi::Error::InvalidArgument("small_batch_matmul: shapes disagree (M must be 1..8)");
  }
  auto work = std::make_shared<Work>();
  work->fn = kTileFns[rows];
  work->x = x.typed_data();
  work->w = packed.typed_data();
  work->out = out->typed_data();
  work->k_dim = k_dim;
  work->n_dim = n_dim;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~4 chunks per thread balances uneven progress. Matrices from 256 kB are shared: inside a decode
  // loop every layer's weights come from memory, which one core streams at about half the rate two
  // do (one batch-8 step's matmuls of the small preset, distinct weights, quiet 2-core Xeon:
  // 9.1-10.4 ms with helpers from 256 kB vs 11.8-12.4 ms from 2 MB); smaller ones stay on the
  // calling thread, where waking a helper costs more than it saves.
  const int64_t bytes = tiles * k_dim * kTile * 4;
  const int64_t helpers = bytes < (1 << 18) ? 0 : threads - 1;
  const int64_t chunk = std::max<int64_t>(1, tiles / (4 * (helpers + 1)));
  uniecg::RunShared(pool, helpers, tiles, chunk, [work] {
    return [work](int64_t begin, int64_t end) {
      const Work& wk = *work;
      for (int64_t t = begin; t < end; ++t) {   // the next tile of the chunk is prefetched
        const float* tile = wk.w + t * wk.k_dim * kTile;
        wk.fn(wk.x, tile, t + 1 < end ? tile + wk.k_dim * kTile : tile, wk.out, wk.k_dim, wk.n_dim,
              t);
      }
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UniecgSmallBatchMatmul, SmallBatchMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
