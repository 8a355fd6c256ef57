// Small-batch f32 matmul for CPU decoding: out[M, N] = x[M, K] . W[K, N], M <= 8, with W pre-packed
// as column tiles [ceil(N / 32), K, 32] (zero-padded) so every tile streams contiguously.
//
// Why: XLA:CPU runs an M=8 f32 matmul at 7-15 GB/s of weights (its GEMM kernels pack W on every
// call and are tuned for large M), while a batch-8 decode step is ~85% such matmuls. Here each tile
// keeps 8 rows x 32 columns of accumulators in registers and reads W exactly once, at ~20 GB/s per
// core. Built and loaded by small_batch_matmul.py; an XLA FFI handler with the tiles shared among
// XLA's intra-op threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 32;                 // columns per tile: 2 x 16-float vectors
typedef float Vec __attribute__((vector_size(64)));   // 16 floats (one AVX-512 or two AVX2 registers)

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(v)); return v; }

// Rows [0, R) of x times tile `t` of the packed weights -> out columns [t*32, min(t*32+32, N)).
template <int R>
void Tile(const float* x, const float* tile, float* out, int64_t k_dim, int64_t n_dim, int64_t t) {
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec{};
  const float* w = tile;
  for (int64_t k = 0; k < k_dim; ++k, w += kTile) {
    const Vec w0 = Load(w), w1 = Load(w + 16);
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * k_dim + k];
      acc[r][0] += xr * w0;   // contracted to FMA (-ffp-contract=fast, the GNU C++ default)
      acc[r][1] += xr * w1;
    }
  }
  const int64_t col = t * kTile, width = std::min<int64_t>(kTile, n_dim - col);
  for (int r = 0; r < R; ++r) {
    float row[kTile];
    std::memcpy(row, &acc[r][0], sizeof(Vec));
    std::memcpy(row + 16, &acc[r][1], sizeof(Vec));
    std::memcpy(out + r * n_dim + col, row, width * sizeof(float));
  }
}

using TileFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t);
constexpr TileFn kTileFns[9] = {nullptr, Tile<1>, Tile<2>, Tile<3>, Tile<4>,
                                Tile<5>, Tile<6>, Tile<7>, Tile<8>};

// Work shared by the calling thread and its helpers: tiles are claimed in chunks from a counter, so
// a helper that starts late (its thread busy elsewhere) finds nothing left and the caller never
// waits on a task that has not started.
struct Work {
  TileFn fn;
  const float* x;
  const float* w;
  float* out;
  int64_t k_dim, n_dim, tiles, chunk;
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    for (;;) {
      const int64_t begin = next.fetch_add(chunk);
      if (begin >= tiles) return;
      const int64_t end = std::min(begin + chunk, tiles);
      for (int64_t t = begin; t < end; ++t) fn(x, w + t * k_dim * kTile, out, k_dim, n_dim, t);
      done.fetch_add(end - begin, std::memory_order_release);
    }
  }
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
  work->tiles = tiles;
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  // ~4 chunks per thread balances uneven progress; small matmuls stay on the calling thread.
  const int64_t bytes = tiles * k_dim * kTile * 4;
  const int64_t helpers = bytes < (1 << 21) ? 0 : threads - 1;
  work->chunk = std::max<int64_t>(1, tiles / (4 * (helpers + 1)));
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load(std::memory_order_acquire) < tiles) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(UniecgSmallBatchMatmul, SmallBatchMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
