// attention.cu — gust's fused causal attention: softmax(scale * q kᵀ, causal) v, forward and
// backward, without ever materialising the (T, T) score matrix (FlashAttention-2 style).
//
// For: fp16/bf16 q, k, v of shape (B, H, T, D), contiguous, D = 64 or 128, any T >= 1, with
// "upcast" numerics: scores, scale, softmax and every accumulator are fp32, so the fp16
// overflow of q kᵀ past 65504 (which blows up deep GPT-2 layers) cannot happen.
// Not for: non-causal masks, dropout, other head sizes, GPUs older than sm_80 (Ampere).
//
// Read it beside reference.py, the twin in plain PyTorch: same tiles, same names, same loops.
// It builds standalone with nvcc (no torch headers); __init__.py calls the extern "C"
// functions at the bottom through ctypes with raw device pointers.
//
// Correctness first: the tensor-core work goes through nvcuda::wmma 16x16x16 fragments, and
// every fp32 tile passes through shared memory, where the softmax reads it row by row. That is
// slower than keeping everything in registers, but each step can be checked by eye.
//
// Thread layout in every tile kernel: a block is 4 warps (128 threads); a tile holds 64 rows;
// warp w owns rows [16 w, 16 w + 16) of it (its "stripe"), so most steps need only __syncwarp.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>
#include <stdint.h>

#include <type_traits>

using namespace nvcuda;

namespace {

// ----------------------------------------------------------------------------------------
// Sizes and shared-memory layouts
// ----------------------------------------------------------------------------------------

constexpr int BLOCK_Q = 64;             // query rows per tile; reference.BLOCK_Q
constexpr int BLOCK_K = 64;             // key rows per tile; reference.BLOCK_K
constexpr int WARPS = 4;                // one 16-row stripe of the tile per warp
constexpr int THREADS = WARPS * 32;     // 128 threads per block
constexpr int STRIPE = 16;              // rows per warp = the wmma fragment's 16
static_assert(BLOCK_Q == WARPS * STRIPE && BLOCK_K == WARPS * STRIPE, "a warp owns 16 rows of a tile");
static_assert(BLOCK_Q == BLOCK_K, "the backward kernels share one layout of square tiles");
static_assert(BLOCK_K % 32 == 0 && BLOCK_Q % 32 == 0, "softmax loops give each lane whole columns");

using AccFrag = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Row strides (in elements) of shared tiles. The padding shifts consecutive rows across the 32
// shared-memory banks so wmma's loads do not all hit one bank, and keeps every 16-row fragment
// 32-byte aligned with a stride that is a multiple of 16 bytes, as wmma requires.
__host__ __device__ constexpr int ld16(int cols) { return cols + 8; }  // 16-bit tiles
__host__ __device__ constexpr int ld32(int cols) { return cols + 4; }  // fp32 tiles

// Bytes of a (rows, ld) tile, rounded up to 128 so every tile starts well aligned.
__host__ __device__ constexpr int tile_bytes(int rows, int ld, int elem_bytes) {
    return (rows * ld * elem_bytes + 127) / 128 * 128;
}

// Forward kernel's shared memory, byte offsets. 16-bit tiles are the tensor-core operands;
// fp32 tiles hold scores and the output accumulator. D = 64: 72,192 bytes; D = 128: 113,152.
template <int D>
struct ForwardSmem {
    static constexpr int q_tile = 0;                                               // (BLOCK_Q, D) 16-bit
    static constexpr int k_tile = q_tile + tile_bytes(BLOCK_Q, ld16(D), 2);         // (BLOCK_K, D) 16-bit
    static constexpr int v_tile = k_tile + tile_bytes(BLOCK_K, ld16(D), 2);         // (BLOCK_K, D) 16-bit
    static constexpr int p_tile = v_tile + tile_bytes(BLOCK_K, ld16(D), 2);         // (BLOCK_Q, BLOCK_K) 16-bit
    static constexpr int s_tile = p_tile + tile_bytes(BLOCK_Q, ld16(BLOCK_K), 2);   // (BLOCK_Q, BLOCK_K) fp32
    static constexpr int o_acc = s_tile + tile_bytes(BLOCK_Q, ld32(BLOCK_K), 4);    // (BLOCK_Q, D) fp32
    static constexpr int row_max = o_acc + tile_bytes(BLOCK_Q, ld32(D), 4);         // (BLOCK_Q,) fp32
    static constexpr int row_sum = row_max + tile_bytes(BLOCK_Q, 1, 4);             // (BLOCK_Q,) fp32
    static constexpr int bytes = row_sum + tile_bytes(BLOCK_Q, 1, 4);
};

// Backward kernels' shared memory (dK/dV and dQ use the same one; tiles are square). The two
// fp32 tiles sit next to each other so that, once the tile loop is over, they can be reused as
// one (64, D) fp32 staging area for writing the gradients out. D = 64: 99,840 bytes; D = 128: 140,800.
template <int D>
struct BackwardSmem {
    static constexpr int q_tile = 0;                                               // (BLOCK_Q, D) 16-bit
    static constexpr int do_tile = q_tile + tile_bytes(BLOCK_Q, ld16(D), 2);        // (BLOCK_Q, D) 16-bit
    static constexpr int k_tile = do_tile + tile_bytes(BLOCK_Q, ld16(D), 2);        // (BLOCK_K, D) 16-bit
    static constexpr int v_tile = k_tile + tile_bytes(BLOCK_K, ld16(D), 2);         // (BLOCK_K, D) 16-bit
    static constexpr int s_tile = v_tile + tile_bytes(BLOCK_K, ld16(D), 2);         // (64, 64) fp32 scores
    static constexpr int dp_tile = s_tile + tile_bytes(BLOCK_Q, ld32(BLOCK_K), 4);  // (64, 64) fp32 dL/dP
    static constexpr int p_tile = dp_tile + tile_bytes(BLOCK_Q, ld32(BLOCK_K), 4);  // (64, 64) 16-bit P
    static constexpr int ds_tile = p_tile + tile_bytes(BLOCK_Q, ld16(BLOCK_K), 2);  // (64, 64) 16-bit dS
    static constexpr int lse_tile = ds_tile + tile_bytes(BLOCK_Q, ld16(BLOCK_K), 2);  // (BLOCK_Q,) fp32
    static constexpr int delta_tile = lse_tile + tile_bytes(BLOCK_Q, 1, 4);         // (BLOCK_Q,) fp32
    static constexpr int kc_tile = delta_tile + tile_bytes(BLOCK_Q, 1, 4);          // (BLOCK_K, D) 16-bit, dQ only
    static constexpr int bytes = kc_tile + tile_bytes(BLOCK_K, ld16(D), 2);
    static constexpr int stage = s_tile;  // (64, D) fp32 after the loop, over s_tile + dp_tile
    static_assert(tile_bytes(BLOCK_K, ld32(D), 4) <= p_tile - s_tile, "gradient stage must fit in s_tile + dp_tile");
};

// ----------------------------------------------------------------------------------------
// Small device helpers
// ----------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Butterfly reductions over the 32 lanes of a warp; every lane ends with the result, and the
// fixed pairing order makes them deterministic.
__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// True where query i must not see key j: the future (j > i), and the padding rows past the end
// of the sequence in the last tile (i >= seq_len), so those rows add nothing anywhere.
// reference._causal_mask (the twin never builds padding rows, so it needs only j > i).
__device__ __forceinline__ bool is_masked(int i, int j, int seq_len) { return j > i || i >= seq_len; }

// Copies rows [row0, row0 + ROWS) of one head's (seq_len, D) matrix into a shared tile with row
// stride ld16(D). Rows past seq_len are zero-filled: out-of-range memory is never read, and the
// zeros are masked or multiply into nothing. Each thread moves 16 bytes (8 elements) at a time.
template <int ROWS, int D, typename scalar_t>
__device__ void load_tile(scalar_t* tile, const scalar_t* matrix, int row0, int seq_len) {
    constexpr int PER_CHUNK = 16 / sizeof(scalar_t);  // 8 elements = one uint4
    constexpr int CHUNKS_PER_ROW = D / PER_CHUNK;
    for (int chunk = threadIdx.x; chunk < ROWS * CHUNKS_PER_ROW; chunk += THREADS) {
        const int r = chunk / CHUNKS_PER_ROW;
        const int col = (chunk % CHUNKS_PER_ROW) * PER_CHUNK;
        uint4 bits = make_uint4(0u, 0u, 0u, 0u);  // all-zero bits are +0.0 in fp16 and bf16
        if (row0 + r < seq_len) bits = *reinterpret_cast<const uint4*>(matrix + (size_t)(row0 + r) * D + col);
        *reinterpret_cast<uint4*>(tile + r * ld16(D) + col) = bits;
    }
}

// load_tile for the dQ kernel's centered keys: tile = 16-bit(k - k_mean), with k_mean the
// head's (D,) fp32 mean key; rows past seq_len are zero (their dS is 0).
template <int ROWS, int D, typename scalar_t>
__device__ void load_centered_tile(scalar_t* tile, const scalar_t* matrix, const float* k_mean, int row0,
                                   int seq_len) {
    for (int idx = threadIdx.x; idx < ROWS * D; idx += THREADS) {
        const int r = idx / D, col = idx % D;
        const float centered = (row0 + r < seq_len) ? to_float(matrix[(size_t)(row0 + r) * D + col]) - k_mean[col] : 0.0f;
        tile[r * ld16(D) + col] = from_float<scalar_t>(centered);
    }
}

// Copies values[row0, row0 + ROWS) of one head's per-row vector (lse or delta) into shared
// memory; rows past seq_len get 0 (they are masked, so the value never matters).
template <int ROWS>
__device__ void load_rows(float* dst, const float* values, int row0, int seq_len) {
    for (int r = threadIdx.x; r < ROWS; r += THREADS) dst[r] = (row0 + r < seq_len) ? values[row0 + r] : 0.0f;
}

// ----------------------------------------------------------------------------------------
// Tensor-core helpers: each warp multiplies its own 16-row stripe
// ----------------------------------------------------------------------------------------

// out[stripe] (16, COLS) fp32 = a_tile[stripe] (16, D) @ b_tile (COLS, D)ᵀ, stored row-major
// into the fp32 tile `out` (row stride ld32(COLS)). Every "rows times the other tile
// transposed" product: scores = q_tile @ k_tileᵀ and dp = do_tile @ v_tileᵀ (and their
// transposes, with keys as rows, in the dK/dV kernel). Reads shared memory only.
template <int D, int COLS, typename scalar_t>
__device__ void warp_matmul_abt(const scalar_t* a_tile, const scalar_t* b_tile, float* out) {
    const int warp = threadIdx.x / 32;
    AccFrag acc[COLS / 16];  // (16, COLS) as COLS/16 fragments of (16, 16)
#pragma unroll
    for (int n = 0; n < COLS / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {  // inner dimension D in steps of 16
        wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> a_frag;
        wmma::load_matrix_sync(a_frag, a_tile + warp * STRIPE * ld16(D) + kk * 16, ld16(D));
#pragma unroll
        for (int n = 0; n < COLS / 16; ++n) {
            // b_tile rows read column-major are b_tileᵀ: element (d, j) is b_tile[j][d]
            wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::col_major> b_frag;
            wmma::load_matrix_sync(b_frag, b_tile + n * 16 * ld16(D) + kk * 16, ld16(D));
            wmma::mma_sync(acc[n], a_frag, b_frag, acc[n]);
        }
    }
#pragma unroll
    for (int n = 0; n < COLS / 16; ++n)
        wmma::store_matrix_sync(out + warp * STRIPE * ld32(COLS) + n * 16, acc[n], ld32(COLS), wmma::mem_row_major);
}

// acc (16, D) fp32 += a_tile[stripe] (16, INNER) @ b_tile (INNER, D), both 16-bit in shared
// memory (row strides ld16(INNER) and ld16(D)). P @ V in the forward; Pᵀ @ dO, dSᵀ @ Q and
// dS @ K in the backward.
template <int D, int INNER, typename scalar_t>
__device__ void warp_matmul_ab(const scalar_t* a_tile, const scalar_t* b_tile, AccFrag (&acc)[D / 16]) {
    const int warp = threadIdx.x / 32;
#pragma unroll
    for (int kk = 0; kk < INNER / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, scalar_t, wmma::row_major> a_frag;
        wmma::load_matrix_sync(a_frag, a_tile + warp * STRIPE * ld16(INNER) + kk * 16, ld16(INNER));
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, scalar_t, wmma::row_major> b_frag;
            wmma::load_matrix_sync(b_frag, b_tile + kk * 16 * ld16(D) + n * 16, ld16(D));
            wmma::mma_sync(acc[n], a_frag, b_frag, acc[n]);
        }
    }
}

// ----------------------------------------------------------------------------------------
// Forward: one block per (Q tile, batch*head); reference.flash_forward
// ----------------------------------------------------------------------------------------

// Online softmax over this warp's 16 rows of the new score tile; reference.flash_forward's
// lines from `scores = ...` to `row_max = new_max`, except the P @ V matmul (next step).
// Reads s_tile (raw q kᵀ, fp32), writes p_tile (16-bit P), rescales o_acc rows by alpha, and
// updates row_max / row_sum. A whole warp walks one row at a time; lane l holds columns l, l+32.
template <int D, typename scalar_t>
__device__ void online_softmax_stripe(const float* s_tile, scalar_t* p_tile, float* o_acc, float* row_max,
                                      float* row_sum, int q_start, int k_start, int seq_len, float scale) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = 0; r < STRIPE; ++r) {
        const int row = warp * STRIPE + r;  // row inside the tile
        const int i = q_start + row;        // its query position
        const float old_max = row_max[row];
        const float old_sum = row_sum[row];
        float scores[BLOCK_K / 32];  // this lane's columns of the row, scaled, masked: fp32
        float tile_max = -INFINITY;
#pragma unroll
        for (int c = 0; c < BLOCK_K / 32; ++c) {
            const int col = lane + 32 * c;
            // upcast: the scale multiplies fp32 scores, never 16-bit ones
            scores[c] = is_masked(i, k_start + col, seq_len) ? -INFINITY : s_tile[row * ld32(BLOCK_K) + col] * scale;
            tile_max = fmaxf(tile_max, scores[c]);
        }
        const float new_max = fmaxf(old_max, warp_max(tile_max));
        // guard: a row with nothing visible yet keeps max -inf, and exp(-inf - -inf) would be NaN
        const float safe_max = (new_max == -INFINITY) ? 0.0f : new_max;
        float tile_sum = 0.0f;
#pragma unroll
        for (int c = 0; c < BLOCK_K / 32; ++c) {
            const float p = expf(scores[c] - safe_max);  // masked: exp(-inf) = 0
            tile_sum += p;                                 // the fp32 p, not its 16-bit rounding
            p_tile[row * ld16(BLOCK_K) + lane + 32 * c] = from_float<scalar_t>(p);
        }
        tile_sum = warp_sum(tile_sum);
        const float alpha = expf(old_max - safe_max);  // 0 on the first visible tile (old_max = -inf)
        for (int d = lane; d < D; d += 32) o_acc[row * ld32(D) + d] *= alpha;
        __syncwarp();  // every lane has read row_max/row_sum[row] above before lane 0 replaces them
        if (lane == 0) {
            row_max[row] = new_max;
            row_sum[row] = alpha * old_sum + tile_sum;
        }
    }
}

// o_acc[stripe] (16, D) fp32 += p_tile[stripe] (16, BLOCK_K) @ v_tile (BLOCK_K, D); reference
// `o_acc = alpha * o_acc + p_tile @ v_tile` (the alpha part was done by the softmax step).
// wmma's register layout is opaque, so the accumulator lives in shared memory between tiles:
// load it into fragments, multiply-add, store it back.
template <int D, typename scalar_t>
__device__ void accumulate_pv_stripe(const scalar_t* p_tile, const scalar_t* v_tile, float* o_acc) {
    const int warp = threadIdx.x / 32;
    float* o_stripe = o_acc + warp * STRIPE * ld32(D);
    AccFrag acc[D / 16];  // (16, D)
#pragma unroll
    for (int n = 0; n < D / 16; ++n) wmma::load_matrix_sync(acc[n], o_stripe + n * 16, ld32(D), wmma::mem_row_major);
    warp_matmul_ab<D, BLOCK_K>(p_tile, v_tile, acc);
#pragma unroll
    for (int n = 0; n < D / 16; ++n) wmma::store_matrix_sync(o_stripe + n * 16, acc[n], ld32(D), wmma::mem_row_major);
}

// Writes this warp's finished rows: o = o_acc / row_sum (16-bit), lse = row_max + log(row_sum)
// and, if asked, the row's max scaled score. Rows past seq_len are padding and not written.
template <int D, typename scalar_t>
__device__ void write_forward_stripe(const float* o_acc, const float* row_max, const float* row_sum,
                                     scalar_t* o, float* lse, float* row_max_out, size_t head, int q_start,
                                     int seq_len) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = 0; r < STRIPE; ++r) {
        const int row = warp * STRIPE + r;
        const int i = q_start + row;
        if (i >= seq_len) break;  // same for all lanes: rows only grow
        const float sum = row_sum[row];
        // sum > 0 always for i < seq_len (key 0 is visible to every query); guard anyway
        const float inv_sum = sum > 0.0f ? 1.0f / sum : 0.0f;
        for (int d = lane; d < D; d += 32) o[(head + i) * D + d] = from_float<scalar_t>(o_acc[row * ld32(D) + d] * inv_sum);
        if (lane == 0) {
            lse[head + i] = row_max[row] + logf(sum);
            if (row_max_out != nullptr) row_max_out[head + i] = row_max[row];
        }
    }
}

template <int D, typename scalar_t>
__global__ void __launch_bounds__(THREADS)
attention_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                         const scalar_t* __restrict__ v, scalar_t* __restrict__ o, float* __restrict__ lse,
                         float* __restrict__ row_max_out, int seq_len, float scale) {
    using Smem = ForwardSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem + Smem::q_tile);
    scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem + Smem::k_tile);
    scalar_t* v_tile = reinterpret_cast<scalar_t*>(smem + Smem::v_tile);
    scalar_t* p_tile = reinterpret_cast<scalar_t*>(smem + Smem::p_tile);
    float* s_tile = reinterpret_cast<float*>(smem + Smem::s_tile);
    float* o_acc = reinterpret_cast<float*>(smem + Smem::o_acc);
    float* row_max = reinterpret_cast<float*>(smem + Smem::row_max);
    float* row_sum = reinterpret_cast<float*>(smem + Smem::row_sum);

    const size_t head = (size_t)blockIdx.x * seq_len;  // first row of this (batch, head) among B*H*T rows
    // the last Q tiles see the most keys: hand them out first so the final wave is short tiles
    const int q_start = (gridDim.y - 1 - blockIdx.y) * BLOCK_Q;
    const int q_end = min(q_start + BLOCK_Q, seq_len);

    // reference: row_max = -inf, row_sum = 0, o_acc = 0 for the tile (each thread its share)
    for (int idx = threadIdx.x; idx < BLOCK_Q * D; idx += THREADS) o_acc[(idx / D) * ld32(D) + idx % D] = 0.0f;
    for (int r = threadIdx.x; r < BLOCK_Q; r += THREADS) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0.0f;
    }
    load_tile<BLOCK_Q, D>(q_tile, q + head * D, q_start, seq_len);

    // causal: K tiles starting after the tile's last query (q_end - 1) are fully masked: skipped
    for (int k_start = 0; k_start < q_end; k_start += BLOCK_K) {
        load_tile<BLOCK_K, D>(k_tile, k + head * D, k_start, seq_len);
        load_tile<BLOCK_K, D>(v_tile, v + head * D, k_start, seq_len);
        __syncthreads();  // k_tile, v_tile (and on the first pass q_tile and the init) are complete
        warp_matmul_abt<D, BLOCK_K>(q_tile, k_tile, s_tile);  // scores = q_tile @ k_tileᵀ, fp32
        __syncwarp();  // fragment stores land in an unspecified lane pattern: finish them before rows are read
        online_softmax_stripe<D>(s_tile, p_tile, o_acc, row_max, row_sum, q_start, k_start, seq_len, scale);
        __syncwarp();  // p_tile and the rescaled o_acc rows are written before the fragments load them
        accumulate_pv_stripe<D>(p_tile, v_tile, o_acc);  // o_acc += p_tile @ v_tile
        __syncthreads();  // every warp is done with k_tile/v_tile before the next pass overwrites them
    }
    write_forward_stripe<D>(o_acc, row_max, row_sum, o, lse, row_max_out, head, q_start, seq_len);
}

// ----------------------------------------------------------------------------------------
// Backward: reference.flash_backward. Three kernels, no floating-point atomics.
//
// FA2 often accumulates dQ with atomicAdd from the dK/dV kernel; float addition is not
// associative, so the order the atomics land in would change the bits of dQ from run to run.
// Here dQ has its own kernel (one block per Q tile, looping over K tiles in a fixed order),
// which recomputes P and dS a second time, so two backward passes give bitwise-identical dQ,
// dK, dV. The price is the extra recompute of q kᵀ and dO vᵀ.
// ----------------------------------------------------------------------------------------

// delta[row] = sum_d dO[row, d] * O[row, d] in fp32; one warp per row of the B*H*T rows.
// reference: `delta = (do * o).sum(dim=-1)`.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(THREADS)
attention_backward_delta_kernel(const scalar_t* __restrict__ o, const scalar_t* __restrict__ d_o,
                                float* __restrict__ delta, long long total_rows) {
    const long long row = (long long)blockIdx.x * WARPS + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= total_rows) return;  // whole warps leave together: row depends on the warp only
    float acc = 0.0f;
    for (int d = lane; d < D; d += 32) acc += to_float(d_o[row * D + d]) * to_float(o[row * D + d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[row] = acc;
}

// From this warp's 16 rows of s_tile (raw scores) and dp_tile (dL/dP), both fp32, recomputes
// p = exp(scale * s - lse) and ds = p * (dp - delta), and writes them as 16-bit tiles.
// reference._recompute_tile. ROWS_ARE_KEYS: the dK/dV kernel holds transposed tiles (rows are
// keys, columns queries), so lse and delta are indexed by column there and by row in the dQ kernel.
// p_tile may be null: the dQ kernel needs only ds.
template <bool ROWS_ARE_KEYS, typename scalar_t>
__device__ void recompute_p_and_ds(const float* s_tile, const float* dp_tile, const float* lse_tile,
                                   const float* delta_tile, scalar_t* p_tile, scalar_t* ds_tile, int row_start,
                                   int col_start, int seq_len, float scale) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = 0; r < STRIPE; ++r) {
        const int row = warp * STRIPE + r;
#pragma unroll
        for (int c = 0; c < BLOCK_K / 32; ++c) {
            const int col = lane + 32 * c;
            const int i = ROWS_ARE_KEYS ? col_start + col : row_start + row;  // query position
            const int j = ROWS_ARE_KEYS ? row_start + row : col_start + col;  // key position
            const int q_local = ROWS_ARE_KEYS ? col : row;                    // index into lse/delta
            const int at = row * ld32(BLOCK_K) + col;
            // upcast: scale and exp in fp32; lse already holds the row's max and sum
            const float p = is_masked(i, j, seq_len) ? 0.0f : expf(s_tile[at] * scale - lse_tile[q_local]);
            const float ds = p * (dp_tile[at] - delta_tile[q_local]);  // dL/d(scaled score), fp32
            if (p_tile != nullptr) p_tile[row * ld16(BLOCK_K) + col] = from_float<scalar_t>(p);
            ds_tile[row * ld16(BLOCK_K) + col] = from_float<scalar_t>(ds);  // 16-bit: next it feeds a matmul
        }
    }
}

// Writes a warp's (16, D) fp32 gradient stripe as 16-bit rows [row_start + 16 w, ...) of one
// head. Fragments cannot be written to global memory in another dtype, so they go through the
// warp's own 16 rows of the fp32 stage in shared memory first. Padding rows are not written.
template <int D, typename scalar_t>
__device__ void write_grad_stripe(const AccFrag (&acc)[D / 16], float* stage, scalar_t* out, size_t head,
                                  int row_start, int seq_len) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int n = 0; n < D / 16; ++n)
        wmma::store_matrix_sync(stage + warp * STRIPE * ld32(D) + n * 16, acc[n], ld32(D), wmma::mem_row_major);
    __syncwarp();  // all lanes' fragment stores land before any lane reads a row
    for (int r = 0; r < STRIPE; ++r) {
        const int row = warp * STRIPE + r;
        const int t = row_start + row;
        if (t >= seq_len) break;  // same for all lanes
        for (int d = lane; d < D; d += 32) out[(head + t) * D + d] = from_float<scalar_t>(stage[row * ld32(D) + d]);
    }
    __syncwarp();  // all lanes are done reading the stage before it is reused for the next gradient
}

// dK and dV for one K/V tile: one block per (K tile, batch*head), looping over the Q tiles that
// can see it. reference.flash_backward's first loop. Tiles are held transposed (keys as rows)
// so warp w owns the 16 keys [16 w, 16 w + 16) and their dK, dV rows: warps never share a
// result row, and the accumulators stay in registers (fragments) for the whole loop.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(THREADS)
attention_backward_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ d_o,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, int seq_len, float scale) {
    using Smem = BackwardSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem + Smem::q_tile);
    scalar_t* do_tile = reinterpret_cast<scalar_t*>(smem + Smem::do_tile);
    scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem + Smem::k_tile);
    scalar_t* v_tile = reinterpret_cast<scalar_t*>(smem + Smem::v_tile);
    float* s_tile = reinterpret_cast<float*>(smem + Smem::s_tile);    // sᵀ: (keys, queries)
    float* dp_tile = reinterpret_cast<float*>(smem + Smem::dp_tile);  // dpᵀ: (keys, queries)
    scalar_t* p_tile = reinterpret_cast<scalar_t*>(smem + Smem::p_tile);    // pᵀ, 16-bit
    scalar_t* ds_tile = reinterpret_cast<scalar_t*>(smem + Smem::ds_tile);  // dsᵀ, 16-bit
    float* lse_tile = reinterpret_cast<float*>(smem + Smem::lse_tile);
    float* delta_tile = reinterpret_cast<float*>(smem + Smem::delta_tile);
    float* stage = reinterpret_cast<float*>(smem + Smem::stage);

    const size_t head = (size_t)blockIdx.x * seq_len;
    const int k_start = blockIdx.y * BLOCK_K;  // the first K tiles see the most queries: launch them first

    load_tile<BLOCK_K, D>(k_tile, k + head * D, k_start, seq_len);
    load_tile<BLOCK_K, D>(v_tile, v + head * D, k_start, seq_len);
    AccFrag dk_acc[D / 16], dv_acc[D / 16];  // this warp's (16, D) dK and dV, fp32 in registers
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
        wmma::fill_fragment(dk_acc[n], 0.0f);
        wmma::fill_fragment(dv_acc[n], 0.0f);
    }

    // causal: Q tiles that end before k_start see none of these keys: start at the one holding k_start
    for (int q_start = (k_start / BLOCK_Q) * BLOCK_Q; q_start < seq_len; q_start += BLOCK_Q) {
        load_tile<BLOCK_Q, D>(q_tile, q + head * D, q_start, seq_len);
        load_tile<BLOCK_Q, D>(do_tile, d_o + head * D, q_start, seq_len);
        load_rows<BLOCK_Q>(lse_tile, lse + head, q_start, seq_len);
        load_rows<BLOCK_Q>(delta_tile, delta + head, q_start, seq_len);
        __syncthreads();  // the Q-side tiles (and on the first pass k_tile, v_tile) are complete
        warp_matmul_abt<D, BLOCK_Q>(k_tile, q_tile, s_tile);    // sᵀ = k_tile @ q_tileᵀ
        warp_matmul_abt<D, BLOCK_Q>(v_tile, do_tile, dp_tile);  // dpᵀ = v_tile @ do_tileᵀ
        __syncwarp();  // fragment stores land before lanes read whole rows
        recompute_p_and_ds<true>(s_tile, dp_tile, lse_tile, delta_tile, p_tile, ds_tile, k_start, q_start,
                                 seq_len, scale);
        __syncwarp();  // p_tile, ds_tile rows are written before the fragments load them
        warp_matmul_ab<D, BLOCK_Q>(p_tile, do_tile, dv_acc);  // dv += pᵀ @ do_tile
        warp_matmul_ab<D, BLOCK_Q>(ds_tile, q_tile, dk_acc);  // dk += dsᵀ @ q_tile
        __syncthreads();  // every warp is done with the Q-side tiles before the next pass overwrites them
    }

#pragma unroll
    for (int n = 0; n < D / 16; ++n)
        for (int t = 0; t < dk_acc[n].num_elements; ++t) dk_acc[n].x[t] *= scale;  // dK = scale dSᵀ Q, in fp32
    write_grad_stripe<D>(dv_acc, stage, dv, head, k_start, seq_len);
    write_grad_stripe<D>(dk_acc, stage, dk, head, k_start, seq_len);
}

// dQ for one Q tile: one block per (Q tile, batch*head), looping over the K tiles it can see.
// reference.flash_backward's second loop. Warp w owns query rows [16 w, 16 w + 16) and their
// dQ rows, accumulated in registers.
//
// dQ = scale dS @ (K - k_mean), not scale dS @ K. Each row of dS sums to 0 in exact math, so
// shifting every key by the same vector changes nothing, except that the large components all
// keys share (the ones that push fp16 scores past 65,504 in deep layers) no longer multiply
// the small errors in dS: the rounding of lse (~1e-3 at 8,000), of O inside delta and of dS to
// 16 bits. Measured with a shared component of 260 (scores ~67,600): bf16 dQ was 10% off with
// K, 0.4% with K - k_mean (the fp32 naive path: 0.2%). dK (dSᵀ Q) has no such cancellation.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(THREADS)
attention_backward_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                             const scalar_t* __restrict__ v, const scalar_t* __restrict__ d_o,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             const float* __restrict__ k_mean, scalar_t* __restrict__ dq, int seq_len,
                             float scale) {
    using Smem = BackwardSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem + Smem::q_tile);
    scalar_t* do_tile = reinterpret_cast<scalar_t*>(smem + Smem::do_tile);
    scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem + Smem::k_tile);
    scalar_t* v_tile = reinterpret_cast<scalar_t*>(smem + Smem::v_tile);
    float* s_tile = reinterpret_cast<float*>(smem + Smem::s_tile);    // (queries, keys)
    float* dp_tile = reinterpret_cast<float*>(smem + Smem::dp_tile);  // (queries, keys)
    scalar_t* ds_tile = reinterpret_cast<scalar_t*>(smem + Smem::ds_tile);
    scalar_t* kc_tile = reinterpret_cast<scalar_t*>(smem + Smem::kc_tile);  // 16-bit(k - k_mean)
    float* lse_tile = reinterpret_cast<float*>(smem + Smem::lse_tile);
    float* delta_tile = reinterpret_cast<float*>(smem + Smem::delta_tile);
    float* stage = reinterpret_cast<float*>(smem + Smem::stage);

    const size_t head = (size_t)blockIdx.x * seq_len;
    const int q_start = (gridDim.y - 1 - blockIdx.y) * BLOCK_Q;  // longest rows of K tiles first
    const int q_end = min(q_start + BLOCK_Q, seq_len);

    load_tile<BLOCK_Q, D>(q_tile, q + head * D, q_start, seq_len);
    load_tile<BLOCK_Q, D>(do_tile, d_o + head * D, q_start, seq_len);
    load_rows<BLOCK_Q>(lse_tile, lse + head, q_start, seq_len);
    load_rows<BLOCK_Q>(delta_tile, delta + head, q_start, seq_len);
    AccFrag dq_acc[D / 16];  // this warp's (16, D) dQ, fp32 in registers
#pragma unroll
    for (int n = 0; n < D / 16; ++n) wmma::fill_fragment(dq_acc[n], 0.0f);

    for (int k_start = 0; k_start < q_end; k_start += BLOCK_K) {  // causal: as in the forward
        load_tile<BLOCK_K, D>(k_tile, k + head * D, k_start, seq_len);
        load_tile<BLOCK_K, D>(v_tile, v + head * D, k_start, seq_len);
        load_centered_tile<BLOCK_K, D>(kc_tile, k + head * D, k_mean + (size_t)blockIdx.x * D, k_start, seq_len);
        __syncthreads();  // k_tile, v_tile, kc_tile (and on the first pass the Q-side tiles) are complete
        warp_matmul_abt<D, BLOCK_K>(q_tile, k_tile, s_tile);    // s = q_tile @ k_tileᵀ
        warp_matmul_abt<D, BLOCK_K>(do_tile, v_tile, dp_tile);  // dp = do_tile @ v_tileᵀ
        __syncwarp();  // fragment stores land before lanes read whole rows
        recompute_p_and_ds<false>(s_tile, dp_tile, lse_tile, delta_tile, static_cast<scalar_t*>(nullptr), ds_tile,
                                  q_start, k_start, seq_len, scale);
        __syncwarp();  // ds_tile rows are written before the fragments load them
        warp_matmul_ab<D, BLOCK_K>(ds_tile, kc_tile, dq_acc);  // dq += ds @ (k_tile - k_mean)
        __syncthreads();  // every warp is done with k_tile/v_tile/kc_tile before the next pass overwrites them
    }

#pragma unroll
    for (int n = 0; n < D / 16; ++n)
        for (int t = 0; t < dq_acc[n].num_elements; ++t) dq_acc[n].x[t] *= scale;  // dQ = scale dS (K - k_mean), fp32
    write_grad_stripe<D>(dq_acc, stage, dq, head, q_start, seq_len);
}

// ----------------------------------------------------------------------------------------
// Host side: launches for one (head size, dtype), then the extern "C" API for ctypes
// ----------------------------------------------------------------------------------------

// Error codes: 0 is success, positive values are cudaError_t, negative values are ours.
enum GustStatus {
    GUST_OK = 0,
    GUST_BAD_HEAD_DIM = -1,      // head_dim is not 64 or 128
    GUST_BAD_DTYPE = -2,         // dtype flag is not GUST_FP16 or GUST_BF16
    GUST_MISALIGNED = -3,        // a pointer is not 16-byte aligned (the tile loads are 16 bytes wide)
    GUST_BAD_SIZE = -4,          // negative sizes, or more Q tiles than a grid dimension holds
    GUST_SMEM_TOO_SMALL = -5,    // the device cannot give a block the shared memory it needs
};
enum GustDtype { GUST_FP16 = 0, GUST_BF16 = 1 };

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Shared memory above 48 KB must be opted into per kernel.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <int D, typename scalar_t>
int launch_forward(const void* q, const void* k, const void* v, void* o, float* lse, float* row_max,
                   int batch_heads, int seq_len, float scale, cudaStream_t stream) {
    constexpr int smem_bytes = ForwardSmem<D>::bytes;
    auto kernel = attention_forward_kernel<D, scalar_t>;
    cudaError_t err = allow_smem(kernel, smem_bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(batch_heads, ceil_div(seq_len, BLOCK_Q));  // x: (batch, head); y: Q tile
    kernel<<<grid, THREADS, smem_bytes, stream>>>(static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k),
                                            static_cast<const scalar_t*>(v), static_cast<scalar_t*>(o), lse,
                                            row_max, seq_len, scale);
    return cudaGetLastError();
}

template <int D, typename scalar_t>
int launch_backward(const void* q, const void* k, const void* v, const void* o, const void* d_o,
                    const float* lse, const float* k_mean, float* delta, void* dq, void* dk, void* dv,
                    int batch_heads, int seq_len, float scale, cudaStream_t stream) {
    const scalar_t* q_ = static_cast<const scalar_t*>(q);
    const scalar_t* k_ = static_cast<const scalar_t*>(k);
    const scalar_t* v_ = static_cast<const scalar_t*>(v);
    const scalar_t* do_ = static_cast<const scalar_t*>(d_o);
    const long long total_rows = (long long)batch_heads * seq_len;
    auto delta_kernel = attention_backward_delta_kernel<D, scalar_t>;
    const unsigned delta_blocks = (unsigned)((total_rows + WARPS - 1) / WARPS);  // a warp per row
    delta_kernel<<<delta_blocks, THREADS, 0, stream>>>(static_cast<const scalar_t*>(o), do_, delta, total_rows);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;

    constexpr int smem_bytes = BackwardSmem<D>::bytes;
    const dim3 grid(batch_heads, ceil_div(seq_len, BLOCK_Q));  // x: (batch, head); y: K tile, then Q tile
    auto dkdv_kernel = attention_backward_dkdv_kernel<D, scalar_t>;
    if ((err = allow_smem(dkdv_kernel, smem_bytes)) != cudaSuccess) return err;
    dkdv_kernel<<<grid, THREADS, smem_bytes, stream>>>(q_, k_, v_, do_, lse, delta, static_cast<scalar_t*>(dk),
                                                 static_cast<scalar_t*>(dv), seq_len, scale);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    auto dq_kernel = attention_backward_dq_kernel<D, scalar_t>;
    if ((err = allow_smem(dq_kernel, smem_bytes)) != cudaSuccess) return err;
    dq_kernel<<<grid, THREADS, smem_bytes, stream>>>(q_, k_, v_, do_, lse, delta, k_mean, static_cast<scalar_t*>(dq),
                                               seq_len, scale);
    return cudaGetLastError();
}

template <typename T>
struct TypeTag {
    using type = T;
};

// Calls fn(head-size tag, dtype tag) with compile-time values for the run-time head_dim and
// dtype flag: the one place the four kernel instantiations are chosen.
template <typename Fn>
int dispatch(int head_dim, int dtype, Fn fn) {
    if (dtype != GUST_FP16 && dtype != GUST_BF16) return GUST_BAD_DTYPE;
    if (head_dim == 64) {
        return dtype == GUST_FP16 ? fn(std::integral_constant<int, 64>{}, TypeTag<__half>{})
                                  : fn(std::integral_constant<int, 64>{}, TypeTag<__nv_bfloat16>{});
    }
    if (head_dim == 128) {
        return dtype == GUST_FP16 ? fn(std::integral_constant<int, 128>{}, TypeTag<__half>{})
                                  : fn(std::integral_constant<int, 128>{}, TypeTag<__nv_bfloat16>{});
    }
    return GUST_BAD_HEAD_DIM;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Sizes the grid can hold: batch*heads on x (up to 2^31 - 1), Q tiles on y (up to 65,535).
int check_sizes(int batch_heads, int seq_len) {
    if (batch_heads < 0 || seq_len < 0) return GUST_BAD_SIZE;
    if (ceil_div(seq_len, BLOCK_Q) > 65535) return GUST_BAD_SIZE;
    return GUST_OK;
}

}  // namespace

extern "C" {

// Forward. q, k, v, o: (batch_heads, seq_len, head_dim) 16-bit, contiguous, 16-byte aligned.
// lse: (batch_heads, seq_len) fp32, written. row_max: same shape, or null; if given, receives
// each row's largest scaled score (a cheap diagnostic of how close scores get to overflow).
// dtype: 0 fp16, 1 bf16. stream: a cudaStream_t. Returns 0 or an error code (see error_string).
int gust_attention_forward(const void* q, const void* k, const void* v, void* o, void* lse, void* row_max,
                           int batch_heads, int seq_len, int head_dim, float scale, int dtype, void* stream) {
    if (int bad = check_sizes(batch_heads, seq_len)) return bad;
    if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(o)) return GUST_MISALIGNED;
    if (batch_heads == 0 || seq_len == 0) return GUST_OK;  // nothing to do; an empty grid is a launch error
    return dispatch(head_dim, dtype, [&](auto head_dim_tag, auto type_tag) {
        constexpr int D = decltype(head_dim_tag)::value;
        using scalar_t = typename decltype(type_tag)::type;
        return launch_forward<D, scalar_t>(q, k, v, o, static_cast<float*>(lse), static_cast<float*>(row_max),
                                           batch_heads, seq_len, scale, static_cast<cudaStream_t>(stream));
    });
}

// Backward. q, k, v, o, d_o (the output's gradient): as in the forward; lse: the forward's.
// k_mean: (batch_heads, head_dim) fp32, each head's mean key over the sequence (see the dQ
// kernel for why). delta: (batch_heads, seq_len) fp32 scratch. dq, dk, dv: outputs, like q.
int gust_attention_backward(const void* q, const void* k, const void* v, const void* o, const void* d_o,
                            const void* lse, const void* k_mean, void* delta, void* dq, void* dk, void* dv,
                            int batch_heads, int seq_len, int head_dim, float scale, int dtype, void* stream) {
    if (int bad = check_sizes(batch_heads, seq_len)) return bad;
    const void* tiles[] = {q, k, v, o, d_o, dq, dk, dv};
    for (const void* p : tiles)
        if (!aligned16(p)) return GUST_MISALIGNED;
    if (batch_heads == 0 || seq_len == 0) return GUST_OK;
    return dispatch(head_dim, dtype, [&](auto head_dim_tag, auto type_tag) {
        constexpr int D = decltype(head_dim_tag)::value;
        using scalar_t = typename decltype(type_tag)::type;
        return launch_backward<D, scalar_t>(q, k, v, o, d_o, static_cast<const float*>(lse),
                                            static_cast<const float*>(k_mean), static_cast<float*>(delta), dq, dk,
                                            dv, batch_heads, seq_len, scale, static_cast<cudaStream_t>(stream));
    });
}

// Dynamic shared memory one block needs: which = 0 forward, 1 backward.
int gust_attention_smem_bytes(int head_dim, int which) {
    if (head_dim == 64) return which == 0 ? ForwardSmem<64>::bytes : BackwardSmem<64>::bytes;
    if (head_dim == 128) return which == 0 ? ForwardSmem<128>::bytes : BackwardSmem<128>::bytes;
    return GUST_BAD_HEAD_DIM;
}

// 0 if the kernels for head_dim can run on the current device: the library holds machine code
// for it (cudaFuncGetAttributes fails otherwise) and a block may have the shared memory needed.
int gust_attention_check_device(int head_dim) {
    const int needed = gust_attention_smem_bytes(head_dim, 1) > gust_attention_smem_bytes(head_dim, 0)
                           ? gust_attention_smem_bytes(head_dim, 1)
                           : gust_attention_smem_bytes(head_dim, 0);
    if (needed < 0) return needed;
    cudaFuncAttributes attributes;
    cudaError_t err = cudaFuncGetAttributes(&attributes, attention_forward_kernel<64, __half>);
    if (err != cudaSuccess) return err;
    int device = 0, optin_bytes = 0;
    if ((err = cudaGetDevice(&device)) != cudaSuccess) return err;
    err = cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (err != cudaSuccess) return err;
    return optin_bytes >= needed ? GUST_OK : GUST_SMEM_TOO_SMALL;
}

const char* gust_attention_error_string(int code) {
    switch (code) {
        case GUST_OK: return "no error";
        case GUST_BAD_HEAD_DIM: return "head size must be 64 or 128";
        case GUST_BAD_DTYPE: return "dtype must be float16 or bfloat16";
        case GUST_MISALIGNED: return "a tensor's data pointer is not 16-byte aligned";
        case GUST_BAD_SIZE: return "sizes out of range (negative, or T over 65,535 * 64)";
        case GUST_SMEM_TOO_SMALL: return "this GPU cannot give a block enough shared memory";
        default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown gust error";
    }
}

}  // extern "C"
