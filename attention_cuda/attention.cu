// attention.cu — gust's fused causal attention: softmax(scale * q kᵀ, causal) v, forward and
// backward, without ever materialising the (T, T) score matrix (FlashAttention-2 style).
//
// For: fp16/bf16 q, k, v of shape (B, H, T, D), D = 64 or 128, any T >= 1, with
// "upcast" numerics: scores, scale, softmax and every accumulator are fp32, so the fp16
// overflow of q kᵀ past 65504 (which blows up deep GPT-2 layers) cannot happen.
// Not for: non-causal masks, dropout, other head sizes, GPUs older than sm_80 (Ampere).
//
// Tensors need not be contiguous: each comes with its (batch, head, row) strides (struct Strides),
// so q, k, v are read straight out of c_attn's (B, T, 3C) output and y is written as (B, T, C)
// with no copy or transpose around the kernels; only the head dimension must be contiguous.
//
// Read it beside reference.py, the twin in plain PyTorch: same tiles, same names, same loops.
// It builds standalone with nvcc (no torch headers); __init__.py calls the extern "C"
// functions at the bottom through ctypes with raw device pointers.
//
// Thread layout in every tile kernel: a block is 4 warps (128 threads); a tile holds 64 rows;
// warp w owns rows [16 w, 16 w + 16) of it (its "stripe"). 16-bit tiles sit in shared memory;
// everything a warp computes from them (scores, P, dS, the O / dQ / dK / dV accumulators)
// stays in its registers, in the fragment layout of the tensor-core instruction
// mma.sync.m16n8k16, which PTX documents. Only the small wrappers in the "Tensor cores" section speak PTX.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// ----------------------------------------------------------------------------------------
// Sizes and shared-memory layouts
// ----------------------------------------------------------------------------------------

constexpr int BLOCK_Q = 64;             // query rows per tile; reference.BLOCK_Q
constexpr int BLOCK_K = 64;             // key rows per tile; reference.BLOCK_K
constexpr int WARPS = 4;                // one 16-row stripe of the tile per warp
constexpr int THREADS = WARPS * 32;     // 128 threads per block
constexpr int STRIPE = 16;              // rows per warp = the M of mma.m16n8k16
constexpr float LOG2E = 1.4426950408889634f;  // exp(x) = exp2(x * log2(e)); exp2 is one instruction
static_assert(BLOCK_Q == WARPS * STRIPE && BLOCK_K == WARPS * STRIPE, "a warp owns 16 rows of a tile");
// one grid of ⌈T/64⌉ tiles serves as K tiles (dK/dV) and Q tiles (dQ), and recompute_p_and_ds takes (16, 64)
// fragments in both orientations
static_assert(BLOCK_Q == BLOCK_K, "the backward kernels need square tiles");

// Row stride (in elements) of a 16-bit shared tile with `cols` columns. The 8 extra elements
// (16 bytes) shift each row by 4 of the 32 shared-memory banks, so the 8 rows one ldmatrix
// phase reads land on 32 different banks; rows stay 16-byte aligned, as ldmatrix requires.
__host__ __device__ constexpr int ld16(int cols) { return cols + 8; }

// Bytes of a (rows, ld) tile, rounded up to 128 so every tile starts well aligned.
__host__ __device__ constexpr int tile_bytes(int rows, int ld, int elem_bytes) {
    return (rows * ld * elem_bytes + 127) / 128 * 128;
}

// Shared memory of each kernel, as byte offsets. Every tile is (64, D) 16-bit with row stride
// ld16(D), every lse/delta vector (64,) fp32; the tiles a kernel streams (loops over) come in two buffers, so the next one loads
// while the warps compute on this one. `buffer` is 0 or 1.
template <int D>
struct Tiles {
    static constexpr int tile = tile_bytes(BLOCK_Q, ld16(D), 2);  // bytes of one (64, D) tile
    static constexpr int row_values = tile_bytes(BLOCK_Q, 1, 4);  // bytes of one (64,) fp32 vector
};

// Forward: q_tile, and k_tile / v_tile twice. D = 64: 46,080 bytes; D = 128: 87,040.
template <int D>
struct ForwardSmem : Tiles<D> {
    using Tiles<D>::tile;
    static constexpr int q_tile = 0;
    __host__ __device__ static constexpr int k_tile(int buffer) { return tile + buffer * tile; }
    __host__ __device__ static constexpr int v_tile(int buffer) { return 3 * tile + buffer * tile; }
    static constexpr int bytes = 5 * tile;
};

// dK/dV: k_tile, v_tile, and twice q_tile, do_tile, lse, delta. D = 64: 56,320; D = 128: 105,472.
template <int D>
struct DkDvSmem : Tiles<D> {
    using Tiles<D>::tile, Tiles<D>::row_values;
    static constexpr int k_tile = 0;
    static constexpr int v_tile = tile;
    __host__ __device__ static constexpr int q_tile(int buffer) { return 2 * tile + buffer * tile; }
    __host__ __device__ static constexpr int do_tile(int buffer) { return 4 * tile + buffer * tile; }
    __host__ __device__ static constexpr int lse_tile(int buffer) { return 6 * tile + buffer * row_values; }
    __host__ __device__ static constexpr int delta_tile(int buffer) { return 6 * tile + (2 + buffer) * row_values; }
    static constexpr int bytes = 6 * tile + 4 * row_values;
};

// dQ: q_tile, do_tile, lse, delta, twice k_tile and v_tile, then kc_tile (16-bit k - k_mean; one buffer,
// rebuilt every pass).
// D = 64: 65,024 bytes; D = 128: 122,368.
template <int D>
struct DqSmem : Tiles<D> {
    using Tiles<D>::tile, Tiles<D>::row_values;
    static constexpr int q_tile = 0;
    static constexpr int do_tile = tile;
    static constexpr int lse_tile = 2 * tile;
    static constexpr int delta_tile = 2 * tile + row_values;
    __host__ __device__ static constexpr int k_tile(int buffer) { return 2 * tile + 2 * row_values + buffer * tile; }
    __host__ __device__ static constexpr int v_tile(int buffer) { return 4 * tile + 2 * row_values + buffer * tile; }
    static constexpr int kc_tile = 6 * tile + 2 * row_values;
    static constexpr int bytes = 7 * tile + 2 * row_values;
};

// Fused backward (dK, dV and dQ in one kernel): k_tile, v_tile, kc_tile (16-bit k - k_mean, built once:
// the K tile is the block's for the whole loop), ds_tile (this pass's 16-bit dSᵀ, keys as rows, which
// every warp reads for its 16 queries' dQ), then twice q_tile, do_tile, lse, delta as in dK/dV.
// D = 64: 74,752 bytes (2 blocks per SM, as dK/dV); D = 128: 132,096 (1 block per SM, dK/dV has 2).
template <int D>
struct FusedSmem : Tiles<D> {
    using Tiles<D>::tile, Tiles<D>::row_values;
    static constexpr int ds_bytes = tile_bytes(BLOCK_K, ld16(BLOCK_Q), 2);  // (64 keys, 64 queries)
    static constexpr int k_tile = 0;
    static constexpr int v_tile = tile;
    static constexpr int kc_tile = 2 * tile;
    static constexpr int ds_tile = 3 * tile;
    __host__ __device__ static constexpr int q_tile(int buffer) { return 3 * tile + ds_bytes + buffer * tile; }
    __host__ __device__ static constexpr int do_tile(int buffer) { return 5 * tile + ds_bytes + buffer * tile; }
    __host__ __device__ static constexpr int lse_tile(int buffer) { return 7 * tile + ds_bytes + buffer * row_values; }
    __host__ __device__ static constexpr int delta_tile(int buffer) {
        return 7 * tile + ds_bytes + (2 + buffer) * row_values;
    }
    static constexpr int bytes = 7 * tile + ds_bytes + 4 * row_values;
};

// ----------------------------------------------------------------------------------------
// Where the tensors are: strided (B, H, T, D) views
// ----------------------------------------------------------------------------------------

// Element (b, h, t, d) of a (B, H, T, D) tensor sits at base + b * batch + h * head + t * row + d
// (in elements; d is contiguous). Contiguous (B, H, T, D): (H T D, T D, D). A head's slice of
// c_attn's (B, T, 3C) output: (3 T C, D, 3 C). A (B, T, C) output: (T C, D, C).
struct Strides {
    long long batch, head, row;
};

// The strides of every 16-bit tensor a launch touches (the forward uses q, k, v, o), and the
// number of heads, which splits blockIdx.x into (batch, head). lse, delta, row_abs_max and
// k_mean are always contiguous (B*H, T) or (B*H, D) fp32 arrays the op allocates itself.
struct Layout {
    Strides q, k, v, o, d_o, dq, dk, dv;
    int heads;
};

// One (batch, head)'s (seq_len, D) matrix: row t starts at rows + t * stride. The stride is 32-bit
// (the host checks seq_len * stride < 2^31): 64-bit row arithmetic in every tile load costs
// registers the kernels do not have to spare.
template <typename scalar_t>
struct HeadMatrix {
    scalar_t* rows;
    int stride;
};

// The (seq_len, D) matrix of the (batch, head) this block works on (blockIdx.x = b * heads + h).
template <typename scalar_t>
__device__ __forceinline__ HeadMatrix<scalar_t> head_matrix(scalar_t* tensor, const Strides& strides, int heads) {
    const int b = blockIdx.x / heads, h = blockIdx.x % heads;
    return {tensor + b * strides.batch + h * strides.head, static_cast<int>(strides.row)};
}

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

// Two floats rounded to 16 bits and packed in one 32-bit register, `lo` in the low half: the
// form every mma operand and every paired store takes.
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const scalar_t pair[2] = {from_float<scalar_t>(lo), from_float<scalar_t>(hi)};
    uint32_t bits;
    memcpy(&bits, pair, sizeof(bits));
    return bits;
}

// Reductions over the 4 lanes that hold one row of an accumulator fragment (lanes 4g..4g+3,
// see below); the fixed pairing order keeps them deterministic.
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// True where query i must not see key j: the future (j > i), and the padding rows past the end
// of the sequence in the last tile (i >= seq_len), so those rows add nothing anywhere.
// reference._causal_mask (the twin never builds padding rows, so it needs only j > i).
__device__ __forceinline__ bool is_masked(int i, int j, int seq_len) { return j > i || i >= seq_len; }

// False if no (query i, key j) pair of a warp's fragment can be masked: queries [i0, i0 + queries),
// keys [j0, j0 + keys). Off the diagonal and away from the tail (most tiles at long T) the
// element-wise is_masked is then skipped: the MASK = false instantiations below.
__device__ __forceinline__ bool fragment_needs_mask(int i0, int queries, int j0, int keys, int seq_len) {
    return j0 + keys - 1 > i0 || i0 + queries > seq_len;
}

// ----------------------------------------------------------------------------------------
// Tensor cores: the three PTX instructions, and the fragment layout they define
//
// mma.sync.m16n8k16: D (16x8, fp32) = A (16x16, 16-bit) @ B (16x8, 16-bit) + C, by one warp.
// With g = lane / 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for mma.m16n8k16"):
//   A, 4 registers of 2 elements: a[0] = A[g][2t, 2t+1]      a[1] = A[g+8][2t, 2t+1]
//                                 a[2] = A[g][2t+8, 2t+9]    a[3] = A[g+8][2t+8, 2t+9]
//   B, 2 registers:               b[0] = B[2t, 2t+1][g]      b[1] = B[2t+8, 2t+9][g]
//   C and D, 4 fp32:              c[0], c[1] = C[g][2t, 2t+1]   c[2], c[3] = C[g+8][2t, 2t+1]
// So a warp's (16, N) fp32 result is N/8 arrays c[4], and lane (g, t) holds rows g and g+8,
// columns 8n + 2t and 8n + 2t + 1 of each: frag_row() and frag_col() below.
//
// ldmatrix.m8n8.x4 loads four 8x8 16-bit matrices from shared memory; lane l names the address
// of row l % 8 of matrix l / 8, and receives, of matrix i, elements [l/4][2(l%4), 2(l%4)+1] in
// register i: an A register, or a B register when the tile holds Bᵀ. With .trans it receives
// [2(l%4), 2(l%4)+1][l/4]: a B register when the tile holds B itself.
//
// cp.async copies 16 (or 4) bytes global -> shared without passing through registers, so a tile
// for the next loop pass can load while the warps compute on this one (sm_80+). Copies are
// grouped by cp_async_commit; cp_async_wait<N> returns when all but the newest N groups of
// this thread have landed.
//
// The fused backward also orders blocks through counters in global memory: ld.acquire in a spin
// loop, red.release to hand the turn on (spin_until_equal, release_increment).
//
// cuda_on_cpu.h defines the same functions for the CPU tests.
// ----------------------------------------------------------------------------------------

#ifndef GUST_CUDA_ON_CPU
template <typename scalar_t>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    if constexpr (std::is_same_v<scalar_t, __half>) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
// 16 bytes from `source` (global) to `destination` (shared); zeros instead if !fill.
__device__ __forceinline__ void cp_async_16(void* destination, const void* source, bool fill) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(destination));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(source), "r"(fill ? 16 : 0));
}
// The same for 4 bytes (one float); .ca because .cg (L2 only) is allowed only for 16-byte copies.
__device__ __forceinline__ void cp_async_4(void* destination, const void* source, bool fill) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(destination));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(address), "l"(source), "r"(fill ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
// The fused backward's turn counters (see attention_backward_fused_kernel). Spins until *counter ==
// value; each read is an acquire at GPU scope, so what the block that set the value wrote before
// its release is visible to this thread (and, after a __syncthreads, to the block).
__device__ __forceinline__ void spin_until_equal(const unsigned* counter, unsigned value) {
    unsigned seen;
    do {
        asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
    } while (seen != value);
}
// *counter += 1 as a release at GPU scope: every write ordered before it (this thread's, and the
// block's through __threadfence and __syncthreads) is visible to a thread that acquires the new value.
__device__ __forceinline__ void release_increment(unsigned* counter) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}
#endif

// Starts copying rows [row0, row0 + ROWS) of one head's (seq_len, D) matrix into a shared tile
// with row stride ld16(D), 16 bytes (8 elements) per cp.async; the data is there only after
// cp_async_wait (and, for other threads' rows, __syncthreads). Rows past seq_len are
// zero-filled (a copy of 0 source bytes): out-of-range memory is never read, and the zeros are
// masked or multiply into nothing.
template <int ROWS, int D, typename scalar_t>
__device__ void load_tile_async(scalar_t* tile, HeadMatrix<const scalar_t> matrix, int row0, int seq_len) {
    constexpr int PER_CHUNK = 16 / sizeof(scalar_t);  // 8 elements
    constexpr int CHUNKS_PER_ROW = D / PER_CHUNK;
    constexpr int ROWS_PER_PASS = THREADS / CHUNKS_PER_ROW;  // rows the block covers with one chunk per thread
    static_assert(THREADS % CHUNKS_PER_ROW == 0 && ROWS % ROWS_PER_PASS == 0, "every thread copies whole passes");
    // chunk c = threadIdx.x + pass * THREADS holds row c / CHUNKS_PER_ROW, columns (c % CHUNKS_PER_ROW) * 8..:
    // a thread keeps its columns and steps down ROWS_PER_PASS rows per pass (center_own_chunks relies on it).
    // One source pointer walked by a step, not an address per chunk: the strides are run-time values, and
    // ptxas would otherwise keep every chunk's offset in a register across the kernels' loops.
    const int first_row = threadIdx.x / CHUNKS_PER_ROW, col = (threadIdx.x % CHUNKS_PER_ROW) * PER_CHUNK;
    const scalar_t* source = matrix.rows + (row0 + first_row) * matrix.stride + col;
    const int step = ROWS_PER_PASS * matrix.stride;
#pragma unroll
    for (int pass = 0; pass < ROWS / ROWS_PER_PASS; ++pass, source += step) {
        const int r = first_row + pass * ROWS_PER_PASS;
        const bool inside = row0 + r < seq_len;
        // past the end: 0 bytes are read, but the address must still be a valid one
        cp_async_16(tile + r * ld16(D) + col, inside ? source : matrix.rows, inside);
    }
}

// Starts copying values[row0, row0 + ROWS) of one head's per-row vector (lse or delta) into
// shared memory, like load_tile_async; rows past seq_len get 0 (they are masked anyway).
template <int ROWS>
__device__ void load_rows_async(float* dst, const float* values, int row0, int seq_len) {
    for (int r = threadIdx.x; r < ROWS; r += THREADS) {
        const bool inside = row0 + r < seq_len;
        cp_async_4(dst + r, inside ? values + row0 + r : values, inside);
    }
}

// kc_tile = 16-bit(k_tile - k_mean) for the 8-element chunks this thread itself copied into
// k_tile (load_tile_async's chunk-to-thread rule), so after cp_async_wait it needs no barrier.
// Every chunk of a thread lies in the same 8 columns, whose mean it holds in `mean`. Rows past
// seq_len stay zero.
template <int D, typename scalar_t>
__device__ void center_own_chunks(scalar_t* kc_tile, const scalar_t* k_tile, const float (&mean)[8], int k_start,
                                  int seq_len) {
    constexpr int CHUNKS_PER_ROW = D / 8;
    static_assert(THREADS % CHUNKS_PER_ROW == 0, "a thread's chunks must share their columns");
    for (int chunk = threadIdx.x; chunk < BLOCK_K * CHUNKS_PER_ROW; chunk += THREADS) {
        const int r = chunk / CHUNKS_PER_ROW;
        const int col = (chunk % CHUNKS_PER_ROW) * 8;
        const uint4 bits = *reinterpret_cast<const uint4*>(k_tile + r * ld16(D) + col);
        scalar_t key[8];
        memcpy(key, &bits, sizeof(bits));
        const bool inside = k_start + r < seq_len;
        uint32_t centered[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
            centered[e] = inside ? pack2<scalar_t>(to_float(key[2 * e]) - mean[2 * e], to_float(key[2 * e + 1]) - mean[2 * e + 1])
                                 : 0u;
        *reinterpret_cast<uint4*>(kc_tile + r * ld16(D) + col) = make_uint4(centered[0], centered[1], centered[2], centered[3]);
    }
}

// Where element e of a lane's c[4] sits in the (16, 8) block: row g or g + 8, column 2t or 2t + 1.
__device__ __forceinline__ int frag_row(int e) { return (threadIdx.x % 32) / 4 + 8 * (e / 2); }
__device__ __forceinline__ int frag_col(int e) { return 2 * (threadIdx.x % 4) + e % 2; }

// A fragment = tile[row0 .. row0+16)[col0 .. col0+16): lanes 0-15 name rows row0.. at col0,
// lanes 16-31 the same rows at col0 + 8, giving a[0..3] in the order above.
template <typename scalar_t>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const scalar_t* tile, int ld, int row0, int col0) {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4(a, tile + (row0 + lane % 16) * ld + col0 + (lane / 16) * 8);
}

// A fragment of A = tileᵀ: A[m][k] = tile[col0 + k][row0 + m] for m, k in [0, 16), from a tile that holds
// the matrix transposed (the fused backward's dSᵀ, keys as rows, read as dS). Matrix i of the x4 is
// a[i]'s 8x8 block, A rows 8 (i % 2).. and columns 8 (i / 2)..: tile rows col0 + 8 (i / 2).., columns
// row0 + 8 (i % 2)..; .trans hands lane (g, t) tile[2t, 2t+1][g] of it, which is A[g][2t, 2t+1].
template <typename scalar_t>
__device__ __forceinline__ void load_a_transposed(uint32_t (&a)[4], const scalar_t* tile, int ld, int row0, int col0) {
    const int lane = threadIdx.x % 32, matrix = lane / 8;
    ldmatrix_x4_trans(a, tile + (col0 + 8 * (matrix / 2) + lane % 8) * ld + row0 + 8 * (matrix % 2));
}

// Two B fragments (columns n0.. and n0+8..) for B[k][n] = tile[n][k], k in [k0, k0+16): the
// "other tile transposed" operand of q kᵀ, dO vᵀ. Matrix i of the x4 covers tile rows
// n0 + 8 (i / 2).. and columns k0 + 8 (i % 2)..; b[j] is the fragment of columns n0 + 8 j...
template <typename scalar_t>
__device__ __forceinline__ void load_b_transposed(uint32_t (&b)[2][2], const scalar_t* tile, int ld, int n0, int k0) {
    const int lane = threadIdx.x % 32, matrix = lane / 8;
    uint32_t r[4];
    ldmatrix_x4(r, tile + (n0 + 8 * (matrix / 2) + lane % 8) * ld + k0 + 8 * (matrix % 2));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// Two B fragments for B[k][n] = tile[k][n], k in [k0, k0+16), n in [n0, n0+16): the "tile as
// it is" operand of P v, Pᵀ dO, dSᵀ q, dS (k - k_mean). Matrix i covers tile rows k0 + 8 (i % 2).. and
// columns n0 + 8 (i / 2)..; .trans hands each lane the (k, k+1) pair of its column g that a B register holds.
template <typename scalar_t>
__device__ __forceinline__ void load_b(uint32_t (&b)[2][2], const scalar_t* tile, int ld, int k0, int n0) {
    const int lane = threadIdx.x % 32, matrix = lane / 8;
    uint32_t r[4];
    ldmatrix_x4_trans(r, tile + (k0 + 8 * (matrix % 2) + lane % 8) * ld + n0 + 8 * (matrix / 2));
    b[0][0] = r[0], b[0][1] = r[1], b[1][0] = r[2], b[1][1] = r[3];
}

// A warp's stripe, rows [row0, row0 + 16) of a (64, D) tile in shared memory, as the A operand of
// q kᵀ or dO vᵀ. Each kernel multiplies the same stripes by every tile of its loop (q in the forward,
// q and dO in the dQ kernel, k and v in the dK/dV ones), so where registers allow (IN_REGISTERS) a warp
// reads a stripe with ldmatrix once, on the loop's first pass, and keeps its D / 4 registers per lane
// instead of re-reading it from the tile for every product (NOTES.md, v3.3, has the counts).
template <int D, typename scalar_t, bool IN_REGISTERS>
struct Stripe {
    const scalar_t* tile;
    int row0;
    uint32_t fragments[IN_REGISTERS ? D / 16 : 1][4];  // IN_REGISTERS: fragment kk = columns [16 kk, 16 kk + 16)

    __device__ Stripe(const scalar_t* tile, int row0) : tile(tile), row0(row0) {}
    __device__ __forceinline__ void load() {  // once the tile has landed (after the barrier); a no-op when not IN_REGISTERS
        if constexpr (IN_REGISTERS) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) load_a(fragments[kk], tile, ld16(D), row0, 16 * kk);
        }
    }
    __device__ __forceinline__ void fragment(uint32_t (&a)[4], int kk) const {
        if constexpr (IN_REGISTERS) {
#pragma unroll
            for (int r = 0; r < 4; ++r) a[r] = fragments[kk][r];
        } else {
            load_a(a, tile, ld16(D), row0, 16 * kk);
        }
    }
};

// acc (16, COLS) fp32 = a (16, D) @ b_tile (COLS, D)ᵀ, a a warp's Stripe and b_tile 16-bit in shared
// memory: scores q kᵀ and dp = dO vᵀ (and their transposes in the dK/dV kernels).
// Inlined: a call would pass the stripe's registers through local memory.
template <int D, int COLS, typename scalar_t, bool IN_REGISTERS>
__device__ __forceinline__ void warp_matmul_abt(float (&acc)[COLS / 8][4], const Stripe<D, scalar_t, IN_REGISTERS>& a_stripe,
                                const scalar_t* b_tile) {
#pragma unroll
    for (int n = 0; n < COLS / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[n][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t a[4];
        a_stripe.fragment(a, kk);
#pragma unroll
        for (int n = 0; n < COLS / 16; ++n) {
            uint32_t b[2][2];
            load_b_transposed(b, b_tile, ld16(D), 16 * n, 16 * kk);
            mma_16x8x16<scalar_t>(acc[2 * n], a, b[0]);
            mma_16x8x16<scalar_t>(acc[2 * n + 1], a, b[1]);
        }
    }
}

// Where the dK/dV and fused kernels keep their k and v stripes in registers: at D = 64 they go from
// 184-188 to 236-243 registers, inside the 255 that 2 blocks (8 warps) per SM allow; at D = 128 they
// already use 254-255, and the 64 more registers would spill.
__host__ __device__ constexpr bool key_stripes_in_registers(int D) { return D == 64; }

// acc (16, COLS) fp32 += a (16, INNER) @ b_tile (INNER, COLS), with `a` already in registers as A
// fragments (P or dS, from to_a_fragments or load_a_transposed) and b_tile 16-bit in shared memory
// with row stride ld16(D): all D columns of a tile (COLS = D), or the COLS columns at b_tile.
template <int INNER, int D, typename scalar_t, int COLS = D>
__device__ void warp_matmul_ab(float (&acc)[COLS / 8][4], const uint32_t (&a)[INNER / 16][4], const scalar_t* b_tile) {
#pragma unroll
    for (int kk = 0; kk < INNER / 16; ++kk) {
#pragma unroll
        for (int n = 0; n < COLS / 16; ++n) {
            uint32_t b[2][2];
            load_b(b, b_tile, ld16(D), 16 * kk, 16 * n);
            mma_16x8x16<scalar_t>(acc[2 * n], a[kk], b[0]);
            mma_16x8x16<scalar_t>(acc[2 * n + 1], a[kk], b[1]);
        }
    }
}

// An fp32 result (16, COLS) as A fragments (16-bit) for the next matmul, without leaving the
// registers: result blocks 2kk and 2kk+1 (columns 16kk..16kk+15) hold exactly the elements
// A fragment kk needs, in the same lanes (compare the C and A layouts above).
template <int COLS, typename scalar_t>
__device__ __forceinline__ void to_a_fragments(uint32_t (&a)[COLS / 16][4], const float (&x)[COLS / 8][4]) {
#pragma unroll
    for (int kk = 0; kk < COLS / 16; ++kk) {
        a[kk][0] = pack2<scalar_t>(x[2 * kk][0], x[2 * kk][1]);
        a[kk][1] = pack2<scalar_t>(x[2 * kk][2], x[2 * kk][3]);
        a[kk][2] = pack2<scalar_t>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
        a[kk][3] = pack2<scalar_t>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
    }
}

// Writes a warp's (16, D) fp32 result, times row_scale[h] for rows g + 8h, as 16-bit rows
// [row0, row0 + 16) of one head's (seq_len, D) matrix; padding rows are not written. Each lane
// stores its column pairs as one 32-bit word.
template <int D, typename scalar_t>
__device__ void store_stripe(const float (&acc)[D / 8][4], const float (&row_scale)[2], HeadMatrix<scalar_t> out,
                             int row0, int seq_len) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + frag_row(2 * h);
        if (row >= seq_len) continue;
        uint32_t* out_row = reinterpret_cast<uint32_t*>(out.rows + row * out.stride);
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            out_row[(8 * n + frag_col(0)) / 2] = pack2<scalar_t>(acc[n][2 * h] * row_scale[h], acc[n][2 * h + 1] * row_scale[h]);
    }
}

// ----------------------------------------------------------------------------------------
// Forward: one block per (Q tile, batch*head); reference.flash_forward
// ----------------------------------------------------------------------------------------

// Online softmax over this warp's (16, BLOCK_K) scores, in place: raw q kᵀ in, P out (fp32).
// reference.flash_forward's lines from `scores = ...` to `row_max = new_max`, except P @ V.
// A lane holds 2 rows (h = 0, 1: rows g and g + 8); row_max is the row's running max of the
// scaled scores (the same in its 4 lanes), row_sum the lane's own share of the row's sum (added
// up once, at the end). The scale is never applied score by score: for scale > 0, rounding keeps
// order, so fl(max(s) * scale) is exactly max(fl(s * scale)), and p = exp(s * scale - max) is
// exp2 of one FMA, s * (scale log2 e) - max log2 e (FlashAttention's softmax_scale_log2).
// TRACK_ABS_MAX: abs_max is the lane's share of the row's max |raw score| over visible keys
// (the overflow diagnostic, scaled and reduced over the 4 lanes once, at the end). The signed
// row_max is not that diagnostic: a row whose scores are all very negative has a small row_max.
template <bool TRACK_ABS_MAX, bool MASK>
__device__ void online_softmax(float (&s)[BLOCK_K / 8][4], float (&row_max)[2], float (&row_sum)[2],
                               float (&abs_max)[2], float (&alpha)[2], int q_row0, int k_start, int seq_len,
                               float scale) {
    const float scale_log2 = scale * LOG2E;  // upcast: the scale multiplies fp32 scores, never 16-bit ones
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int i = q_row0 + frag_row(2 * h);  // query position of this half's row
        float tile_max = -INFINITY;              // of the raw scores
#pragma unroll
        for (int n = 0; n < BLOCK_K / 8; ++n)
#pragma unroll
            for (int e = 2 * h; e < 2 * h + 2; ++e) {
                const bool masked = MASK && is_masked(i, k_start + 8 * n + frag_col(e), seq_len);
                if constexpr (TRACK_ABS_MAX) abs_max[h] = masked ? abs_max[h] : fmaxf(abs_max[h], fabsf(s[n][e]));
                s[n][e] = masked ? -INFINITY : s[n][e];
                tile_max = fmaxf(tile_max, s[n][e]);
            }
        const float new_max = fmaxf(row_max[h], quad_max(tile_max) * scale);  // scaled: -inf stays -inf
        // guard: a row with nothing visible yet keeps max -inf, and exp(-inf - -inf) would be NaN
        const float safe_max = (new_max == -INFINITY) ? 0.0f : new_max;
        const float max_log2 = safe_max * LOG2E;
        float tile_sum = 0.0f;
#pragma unroll
        for (int n = 0; n < BLOCK_K / 8; ++n)
#pragma unroll
            for (int e = 2 * h; e < 2 * h + 2; ++e) {
                s[n][e] = exp2f(fmaf(s[n][e], scale_log2, -max_log2));  // masked: exp2(-inf) = 0
                tile_sum += s[n][e];                                     // the fp32 p, not its 16-bit rounding
            }
        alpha[h] = exp2f((row_max[h] - safe_max) * LOG2E);  // 0 on the first visible tile (old max -inf)
        row_sum[h] = alpha[h] * row_sum[h] + tile_sum;
        row_max[h] = new_max;
    }
}

// Blocks per SM the forward must fit in registers: 65,536 / (4 blocks x 128 threads) = 128
// registers at D = 64 (16 warps per SM). Without the cap ptxas spends registers on keeping
// strided row addresses (one per tile chunk) and lands at 136: 3 blocks. At D = 128 shared memory
// allows 2 (3 x 87,040 B is more than an SM's 228 KB), so registers may use what 2 allow (255).
__host__ __device__ constexpr int forward_min_blocks(int D) { return D == 64 ? 4 : 2; }

// TRACK_ABS_MAX: also write each row's max |scaled score| over its visible keys to row_abs_max
// (an instantiation of its own, so the training steps that do not ask pay nothing).
template <int D, typename scalar_t, bool TRACK_ABS_MAX>
__global__ void __launch_bounds__(THREADS, forward_min_blocks(D))
attention_forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                         const scalar_t* __restrict__ v, scalar_t* __restrict__ o, float* __restrict__ lse,
                         float* __restrict__ row_abs_max, const Layout layout, int seq_len, float scale) {
    using Smem = ForwardSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem + Smem::q_tile);
    auto k_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::k_tile(buffer)); };
    auto v_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::v_tile(buffer)); };

    const int warp = threadIdx.x / 32;
    const size_t head_rows = (size_t)blockIdx.x * seq_len;  // this head's first entry in lse, row_abs_max
    const HeadMatrix<const scalar_t> q_head = head_matrix(q, layout.q, layout.heads);
    const HeadMatrix<const scalar_t> k_head = head_matrix(k, layout.k, layout.heads);
    const HeadMatrix<const scalar_t> v_head = head_matrix(v, layout.v, layout.heads);
    // the last Q tiles see the most keys: hand them out first so the final wave is short tiles
    const int q_start = (gridDim.y - 1 - blockIdx.y) * BLOCK_Q;
    const int q_end = min(q_start + BLOCK_Q, seq_len);
    const int q_row0 = q_start + warp * STRIPE;  // this warp's first query position

    // reference: row_max = -inf, row_sum = 0, o_acc = 0 (this lane's rows g, g + 8)
    float o_acc[D / 8][4] = {};
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
    float abs_max[2] = {0.0f, 0.0f};  // TRACK_ABS_MAX only: this lane's share of max |score| per row
    load_tile_async<BLOCK_Q, D>(q_tile, q_head, q_start, seq_len);
    load_tile_async<BLOCK_K, D>(k_tile(0), k_head, 0, seq_len);
    load_tile_async<BLOCK_K, D>(v_tile(0), v_head, 0, seq_len);
    cp_async_commit();

    // causal: K tiles starting after the tile's last query (q_end - 1) are fully masked: skipped
    int buffer = 0;  // which k_tile / v_tile holds this pass's keys
    Stripe<D, scalar_t, true> q_rows(q_tile, warp * STRIPE);  // this warp's queries; fits at D = 64 and 128
    for (int k_start = 0; k_start < q_end; k_start += BLOCK_K, buffer ^= 1) {
        if (k_start + BLOCK_K < q_end) {  // start loading the next K/V tile into the other buffer
            load_tile_async<BLOCK_K, D>(k_tile(buffer ^ 1), k_head, k_start + BLOCK_K, seq_len);
            load_tile_async<BLOCK_K, D>(v_tile(buffer ^ 1), v_head, k_start + BLOCK_K, seq_len);
        }
        cp_async_commit();   // one group per pass (empty on the last), so that:
        cp_async_wait<1>();  // everything but the newest group, the prefetch, has landed
        __syncthreads();     // ... for every thread: this pass's tiles (and q_tile) are complete
        float s[BLOCK_K / 8][4];  // (16, BLOCK_K) scores, then P, fp32
        if (k_start == 0) q_rows.load();  // q_tile landed with the first K/V tile (block-uniform)
        warp_matmul_abt<D, BLOCK_K>(s, q_rows, k_tile(buffer));  // s = q_tile @ k_tileᵀ
        float alpha[2];
        if (fragment_needs_mask(q_row0, STRIPE, k_start, BLOCK_K, seq_len))  // uniform per warp
            online_softmax<TRACK_ABS_MAX, true>(s, row_max, row_sum, abs_max, alpha, q_row0, k_start, seq_len, scale);
        else
            online_softmax<TRACK_ABS_MAX, false>(s, row_max, row_sum, abs_max, alpha, q_row0, k_start, seq_len, scale);
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) o_acc[n][e] *= alpha[e / 2];  // reference: o_acc = alpha * o_acc + ...
        uint32_t p[BLOCK_K / 16][4];
        to_a_fragments<BLOCK_K, scalar_t>(p, s);           // P rounded to 16 bits for the tensor cores
        warp_matmul_ab<BLOCK_K, D, scalar_t>(o_acc, p, v_tile(buffer));  // ... + p_tile @ v_tile
        __syncthreads();  // every warp is done with this buffer before the next pass loads into it
    }

    float inv_sum[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const float sum = quad_sum(row_sum[h]);  // the row's sum from its 4 lanes' shares
        // sum > 0 for i < seq_len (key 0 is visible to every query); padding rows have 0: keep them finite
        inv_sum[h] = sum > 0.0f ? 1.0f / sum : 0.0f;
        const int i = q_row0 + frag_row(2 * h);
        float row_abs = 0.0f;
        // all lanes: the shuffle needs the warp. Scaled after the max: the same bits (see online_softmax)
        if constexpr (TRACK_ABS_MAX) row_abs = quad_max(abs_max[h]) * scale;
        if (i < seq_len && threadIdx.x % 4 == 0) {  // one lane of the 4 writes the row's scalars
            lse[head_rows + i] = row_max[h] + logf(sum);
            if constexpr (TRACK_ABS_MAX) row_abs_max[head_rows + i] = row_abs;
        }
    }
    store_stripe<D>(o_acc, inv_sum, head_matrix(o, layout.o, layout.heads), q_row0, seq_len);  // o = o_acc / row_sum
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

// The backward's first kernel, one launch for what the tile kernels need besides q, k, v, dO:
// - blocks [0, delta_blocks): delta[row] = sum_d dO[row, d] * O[row, d] in fp32 for the B*H*T rows
//   (row = (b * heads + h) * seq_len + t); reference: `delta = (do * o).sum(dim=-1)`;
// - the next batch_heads blocks, one per (batch, head): k_mean[bh, :] = the head's mean key in fp32,
//   which the dQ kernels centre the keys on (reference: `k.mean(dim=2)`), and, for the fused
//   backward (dq_turn not null), that head's dQ turn counters set to 0.
// Every lane reads 16 bytes (8 elements) at a time: D / 8 lanes per row. Sums run in a fixed order.
constexpr int VEC = 8;  // 16-bit elements per 16-byte load

template <typename scalar_t>
__device__ __forceinline__ void load_vec(const scalar_t* from, float (&to)[VEC]) {
    const uint4 bits = *reinterpret_cast<const uint4*>(from);  // 16-byte aligned: rows are (checked on the host)
    scalar_t elements[VEC];
    memcpy(elements, &bits, sizeof(bits));
#pragma unroll
    for (int e = 0; e < VEC; ++e) to[e] = to_float(elements[e]);
}

template <int D, typename scalar_t>
__global__ void __launch_bounds__(THREADS)
attention_backward_prologue_kernel(const scalar_t* __restrict__ o, const scalar_t* __restrict__ d_o,
                                   const scalar_t* __restrict__ k, float* __restrict__ delta,
                                   float* __restrict__ k_mean, unsigned* __restrict__ dq_turn, const Layout layout,
                                   int seq_len, long long total_rows, int delta_blocks) {
    constexpr int LANES_PER_ROW = D / VEC;                  // 8 at D = 64, 16 at D = 128
    constexpr int ROWS_PER_BLOCK = THREADS / LANES_PER_ROW;  // 16 or 8
    const int col = (threadIdx.x % LANES_PER_ROW) * VEC, row_in_block = threadIdx.x / LANES_PER_ROW;
    if ((int)blockIdx.x < delta_blocks) {
        const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + row_in_block;
        float acc = 0.0f;
        if (row < total_rows) {
            const long long batch_head = row / seq_len, t = row % seq_len;
            const long long b = batch_head / layout.heads, h = batch_head % layout.heads;
            float o_vec[VEC], do_vec[VEC];
            load_vec(o + b * layout.o.batch + h * layout.o.head + t * layout.o.row + col, o_vec);
            load_vec(d_o + b * layout.d_o.batch + h * layout.d_o.head + t * layout.d_o.row + col, do_vec);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc += do_vec[e] * o_vec[e];
        }
        // a row's lanes are LANES_PER_ROW consecutive lanes of one warp: xor offsets below that stay inside them
        for (int offset = LANES_PER_ROW / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
        if (row < total_rows && col == 0) delta[row] = acc;
        return;
    }
    const int batch_head = blockIdx.x - delta_blocks, b = batch_head / layout.heads, h = batch_head % layout.heads;
    const scalar_t* k_head = k + b * layout.k.batch + h * layout.k.head + col;
    float sum[VEC] = {};  // this thread's 8 columns over rows row_in_block, + ROWS_PER_BLOCK, ...
    for (int t = row_in_block; t < seq_len; t += ROWS_PER_BLOCK) {
        float k_vec[VEC];
        load_vec(k_head + (long long)t * layout.k.row, k_vec);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum[e] += k_vec[e];
    }
    extern __shared__ __align__(128) unsigned char smem[];
    float* partial = reinterpret_cast<float*>(smem);  // (THREADS, VEC): each thread's sums
#pragma unroll
    for (int e = 0; e < VEC; ++e) partial[threadIdx.x * VEC + e] = sum[e];
    __syncthreads();
    if (row_in_block == 0) {  // the first row's lanes add the ROWS_PER_BLOCK partial sums of their columns in order
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            float total = 0.0f;
            for (int r = 0; r < ROWS_PER_BLOCK; ++r) total += partial[(r * LANES_PER_ROW + threadIdx.x) * VEC + e];
            k_mean[(long long)batch_head * D + col + e] = total / seq_len;
        }
    }
    if (dq_turn != nullptr) {
        const int q_tiles = (seq_len + BLOCK_Q - 1) / BLOCK_Q;
        for (int i = threadIdx.x; i < q_tiles; i += THREADS) dq_turn[(long long)batch_head * q_tiles + i] = 0;
    }
}

constexpr int PROLOGUE_SMEM_BYTES = THREADS * VEC * sizeof(float);  // the k-mean partial sums: 4 KB

// From a warp's raw scores s and dL/dP dp (both (16, 64) fp32 fragments), recomputes in place
// p = exp(scale * s - lse) and ds = p * (dp - delta). reference._recompute_tile.
// ROWS_ARE_KEYS: the dK/dV kernel computes transposed tiles (rows are keys, columns queries),
// so lse and delta are indexed by column there and by row in the dQ kernel.
// row_start, col_start: the positions of the tile's first row and column.
// MASK: evaluate the causal/tail mask per element; false where fragment_needs_mask says none can be masked.
template <bool ROWS_ARE_KEYS, bool MASK>
__device__ void recompute_p_and_ds(float (&s)[BLOCK_K / 8][4], float (&dp)[BLOCK_K / 8][4], const float* lse_tile,
                                   const float* delta_tile, int row_start, int col_start, int seq_len, float scale) {
#pragma unroll
    for (int n = 0; n < BLOCK_K / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int local_row = (threadIdx.x / 32) * STRIPE + frag_row(e), local_col = 8 * n + frag_col(e);
            const int i = ROWS_ARE_KEYS ? col_start + local_col : row_start + local_row;  // query position
            const int j = ROWS_ARE_KEYS ? row_start + local_row : col_start + local_col;  // key position
            const int q_local = ROWS_ARE_KEYS ? local_col : local_row;                    // index into lse/delta
            // upcast: scale and exp in fp32; lse already holds the row's max and sum. Not online_softmax's
            // one FMA, s (scale log2 e) - lse log2 e: on sm_90 it cost the fused kernel 12 bytes of spills
            const float p = MASK && is_masked(i, j, seq_len) ? 0.0f : exp2f((s[n][e] * scale - lse_tile[q_local]) * LOG2E);
            dp[n][e] = p * (dp[n][e] - delta_tile[q_local]);  // dS = dL/d(scaled score), fp32
            s[n][e] = p;
        }
}

// dK and dV for one K/V tile: one block per (K tile, batch*head), looping over the Q tiles that
// can see it. reference.flash_backward's first loop. The products are computed transposed
// (keys as rows) so warp w owns the 16 keys [16 w, 16 w + 16) and their dK, dV rows: warps
// never share a result row, and the accumulators stay in registers for the whole loop.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(THREADS)
attention_backward_dkdv_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                               const scalar_t* __restrict__ v, const scalar_t* __restrict__ d_o,
                               const float* __restrict__ lse, const float* __restrict__ delta,
                               scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, const Layout layout, int seq_len,
                               float scale) {
    using Smem = DkDvSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem + Smem::k_tile);
    scalar_t* v_tile = reinterpret_cast<scalar_t*>(smem + Smem::v_tile);
    auto q_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::q_tile(buffer)); };
    auto do_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::do_tile(buffer)); };
    auto lse_tile = [&](int buffer) { return reinterpret_cast<float*>(smem + Smem::lse_tile(buffer)); };
    auto delta_tile = [&](int buffer) { return reinterpret_cast<float*>(smem + Smem::delta_tile(buffer)); };

    const int warp = threadIdx.x / 32;
    const size_t head_rows = (size_t)blockIdx.x * seq_len;  // this head's first entry in lse, delta
    const HeadMatrix<const scalar_t> q_head = head_matrix(q, layout.q, layout.heads);
    const HeadMatrix<const scalar_t> do_head = head_matrix(d_o, layout.d_o, layout.heads);
    const int k_start = blockIdx.y * BLOCK_K;  // the first K tiles see the most queries: launch them first
    const int k_row0 = k_start + warp * STRIPE;  // this warp's first key position
    // causal: Q tiles that end before k_start see none of these keys: start at the one holding k_start
    const int first_q_start = (k_start / BLOCK_Q) * BLOCK_Q;

    // the Q side of one pass: q, dO, lse, delta into `buffer`
    auto load_q_side = [&](int buffer, int q_start) {
        load_tile_async<BLOCK_Q, D>(q_tile(buffer), q_head, q_start, seq_len);
        load_tile_async<BLOCK_Q, D>(do_tile(buffer), do_head, q_start, seq_len);
        load_rows_async<BLOCK_Q>(lse_tile(buffer), lse + head_rows, q_start, seq_len);
        load_rows_async<BLOCK_Q>(delta_tile(buffer), delta + head_rows, q_start, seq_len);
    };
    load_tile_async<BLOCK_K, D>(k_tile, head_matrix(k, layout.k, layout.heads), k_start, seq_len);
    load_tile_async<BLOCK_K, D>(v_tile, head_matrix(v, layout.v, layout.heads), k_start, seq_len);
    load_q_side(0, first_q_start);
    cp_async_commit();
    float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};  // this warp's (16, D) dK and dV, fp32

    int buffer = 0;  // which q_tile / do_tile / lse / delta holds this pass's queries
    // this warp's keys, in registers where key_stripes_in_registers says they fit
    Stripe<D, scalar_t, key_stripes_in_registers(D)> k_rows(k_tile, warp * STRIPE), v_rows(v_tile, warp * STRIPE);
    for (int q_start = first_q_start; q_start < seq_len; q_start += BLOCK_Q, buffer ^= 1) {
        if (q_start + BLOCK_Q < seq_len) load_q_side(buffer ^ 1, q_start + BLOCK_Q);  // prefetch the next pass
        cp_async_commit();   // one group per pass (empty on the last), so that:
        cp_async_wait<1>();  // everything but the newest group, the prefetch, has landed
        __syncthreads();     // ... for every thread: this pass's tiles (and k_tile, v_tile) are complete
        const scalar_t* q_now = q_tile(buffer);
        const scalar_t* do_now = do_tile(buffer);
        float s[BLOCK_Q / 8][4], dp[BLOCK_Q / 8][4];  // sᵀ and dpᵀ: (16 keys, BLOCK_Q queries)
        if (q_start == first_q_start) {  // k_tile, v_tile landed with the first pass (block-uniform)
            k_rows.load();
            v_rows.load();
        }
        warp_matmul_abt<D, BLOCK_Q>(s, k_rows, q_now);   // sᵀ = k_tile @ q_tileᵀ
        warp_matmul_abt<D, BLOCK_Q>(dp, v_rows, do_now);  // dpᵀ = v_tile @ do_tileᵀ
        // warp's keys [k_row0, k_row0 + 16) against queries [q_start, q_start + 64); uniform per warp
        if (fragment_needs_mask(q_start, BLOCK_Q, k_row0, STRIPE, seq_len))
            recompute_p_and_ds<true, true>(s, dp, lse_tile(buffer), delta_tile(buffer), k_start, q_start, seq_len, scale);
        else
            recompute_p_and_ds<true, false>(s, dp, lse_tile(buffer), delta_tile(buffer), k_start, q_start, seq_len, scale);
        uint32_t a[BLOCK_Q / 16][4];
        to_a_fragments<BLOCK_Q, scalar_t>(a, s);               // pᵀ in 16 bits
        warp_matmul_ab<BLOCK_Q, D, scalar_t>(dv_acc, a, do_now);  // dv += pᵀ @ do_tile
        to_a_fragments<BLOCK_Q, scalar_t>(a, dp);              // dsᵀ in 16 bits
        warp_matmul_ab<BLOCK_Q, D, scalar_t>(dk_acc, a, q_now);   // dk += dsᵀ @ q_tile
        __syncthreads();  // every warp is done with this buffer before the next pass loads into it
    }

    const float one[2] = {1.0f, 1.0f}, by_scale[2] = {scale, scale};  // dK = scale dSᵀ Q, in fp32
    store_stripe<D>(dv_acc, one, head_matrix(dv, layout.dv, layout.heads), k_row0, seq_len);
    store_stripe<D>(dk_acc, by_scale, head_matrix(dk, layout.dk, layout.heads), k_row0, seq_len);
}

// Blocks per SM the dQ kernel must fit in registers: at D = 64 its shared memory (65,024 B) allows 3,
// so at most 168 registers (65,536 / (3 x 128) = 170, rounded down to a multiple of 8; it uses 167 with
// its q and dO stripes held, 215 if left uncapped).
// At D = 128 its shared memory (122,368 B) allows only 1.
__host__ __device__ constexpr int dq_min_blocks(int D) { return D == 64 ? 3 : 1; }

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
__global__ void __launch_bounds__(THREADS, dq_min_blocks(D))
attention_backward_dq_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                             const scalar_t* __restrict__ v, const scalar_t* __restrict__ d_o,
                             const float* __restrict__ lse, const float* __restrict__ delta,
                             const float* __restrict__ k_mean, scalar_t* __restrict__ dq, const Layout layout,
                             int seq_len, float scale) {
    using Smem = DqSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    scalar_t* q_tile = reinterpret_cast<scalar_t*>(smem + Smem::q_tile);
    scalar_t* do_tile = reinterpret_cast<scalar_t*>(smem + Smem::do_tile);
    float* lse_tile = reinterpret_cast<float*>(smem + Smem::lse_tile);
    float* delta_tile = reinterpret_cast<float*>(smem + Smem::delta_tile);
    auto k_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::k_tile(buffer)); };
    auto v_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::v_tile(buffer)); };
    scalar_t* kc_tile = reinterpret_cast<scalar_t*>(smem + Smem::kc_tile);  // this pass's 16-bit(k - k_mean)

    const int warp = threadIdx.x / 32;
    const size_t head_rows = (size_t)blockIdx.x * seq_len;  // this head's first entry in lse, delta
    const HeadMatrix<const scalar_t> k_head = head_matrix(k, layout.k, layout.heads);
    const HeadMatrix<const scalar_t> v_head = head_matrix(v, layout.v, layout.heads);
    const int q_start = (gridDim.y - 1 - blockIdx.y) * BLOCK_Q;  // the last Q tiles see the most K tiles: first
    const int q_end = min(q_start + BLOCK_Q, seq_len);
    const int q_row0 = q_start + warp * STRIPE;

    // the K side of one pass: k and v, into `buffer`
    auto load_k_side = [&](int buffer, int k_start) {
        load_tile_async<BLOCK_K, D>(k_tile(buffer), k_head, k_start, seq_len);
        load_tile_async<BLOCK_K, D>(v_tile(buffer), v_head, k_start, seq_len);
    };
    float mean[8];  // the head's mean key, at the 8 columns this thread centers (center_own_chunks)
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = k_mean[(size_t)blockIdx.x * D + (threadIdx.x % (D / 8)) * 8 + e];
    load_tile_async<BLOCK_Q, D>(q_tile, head_matrix(q, layout.q, layout.heads), q_start, seq_len);
    load_tile_async<BLOCK_Q, D>(do_tile, head_matrix(d_o, layout.d_o, layout.heads), q_start, seq_len);
    load_rows_async<BLOCK_Q>(lse_tile, lse + head_rows, q_start, seq_len);
    load_rows_async<BLOCK_Q>(delta_tile, delta + head_rows, q_start, seq_len);
    load_k_side(0, 0);
    cp_async_commit();
    float dq_acc[D / 8][4] = {};  // this warp's (16, D) dQ, fp32

    int buffer = 0;  // which k_tile / v_tile holds this pass's keys
    // this warp's queries; at D = 128 they take it from 167 to 253 registers, but its shared memory allows
    // 1 block per SM there anyway
    Stripe<D, scalar_t, true> q_rows(q_tile, warp * STRIPE), do_rows(do_tile, warp * STRIPE);
    for (int k_start = 0; k_start < q_end; k_start += BLOCK_K, buffer ^= 1) {  // causal: as in the forward
        if (k_start + BLOCK_K < q_end) load_k_side(buffer ^ 1, k_start + BLOCK_K);  // prefetch the next pass
        cp_async_commit();   // one group per pass (empty on the last), so that:
        cp_async_wait<1>();  // everything but the newest group, the prefetch, has landed
        center_own_chunks<D>(kc_tile, k_tile(buffer), mean, k_start, seq_len);  // own copies only: before the barrier
        __syncthreads();     // for every thread: this pass's tiles, kc_tile and the Q side are complete
        float s[BLOCK_K / 8][4], dp[BLOCK_K / 8][4];  // (16 queries, BLOCK_K keys)
        if (k_start == 0) {  // the Q side landed with the first K/V tile (block-uniform)
            q_rows.load();
            do_rows.load();
        }
        warp_matmul_abt<D, BLOCK_K>(s, q_rows, k_tile(buffer));    // s = q_tile @ k_tileᵀ
        warp_matmul_abt<D, BLOCK_K>(dp, do_rows, v_tile(buffer));  // dp = do_tile @ v_tileᵀ
        if (fragment_needs_mask(q_row0, STRIPE, k_start, BLOCK_K, seq_len))  // uniform per warp
            recompute_p_and_ds<false, true>(s, dp, lse_tile, delta_tile, q_start, k_start, seq_len, scale);
        else
            recompute_p_and_ds<false, false>(s, dp, lse_tile, delta_tile, q_start, k_start, seq_len, scale);
        uint32_t a[BLOCK_K / 16][4];
        to_a_fragments<BLOCK_K, scalar_t>(a, dp);                      // ds in 16 bits
        warp_matmul_ab<BLOCK_K, D, scalar_t>(dq_acc, a, kc_tile);  // dq += ds @ (k_tile - k_mean)
        __syncthreads();  // every warp is done with this buffer before the next pass loads into it
    }

    const float by_scale[2] = {scale, scale};  // dQ = scale dS (K - k_mean), in fp32
    store_stripe<D>(dq_acc, by_scale, head_matrix(dq, layout.dq, layout.heads), q_row0, seq_len);
}

// ----------------------------------------------------------------------------------------
// Fused backward: dK, dV and dQ in one kernel, 5 matmuls per (Q tile, K tile) pair instead of the
// 7 of the two kernels above, with dQ still bitwise deterministic (FlashAttention-3's scheme).
//
// One block per (K tile j, batch*head), as in the dK/dV kernel; the block also computes, on each
// pass, the dQ partial dQ_ij = dS_ij (K_j - k_mean) of the Q tile i it visits. The partials of Q tile i
// come from blocks j = 0..i and are added into an fp32 accumulator dq_acc (B*H, T, D) in that
// fixed order, so every run adds the same numbers in the same order: the same bits. The order is
// kept by one counter per (head, Q tile), dq_turn[bh][i] = how many K tiles have added into Q
// tile i so far: block j waits (one thread spins on acquire loads, then a barrier) until it reads
// j, adds its partial with plain loads and stores (no other block touches those rows while it
// holds the turn), makes its adds visible (__threadfence, barrier) and hands the turn on (one
// release increment). Block 0 stores instead of adding (so dq_acc needs no zeroing) and takes its
// turn without waiting; block i, the last, writes scale * (accumulator + its partial) as the
// 16-bit dQ instead of storing it back, and releases nothing (nobody comes after it): no
// conversion kernel. The counters are zeroed (by the prologue kernel) before every launch.
//
// Why no block waits forever, and why the waits are short:
// - A block waits only on blocks of its own head with a smaller K tile, which have a smaller
//   linear block index (blockIdx.x = head, blockIdx.y = K tile: linear index head + heads * j).
//   CUDA hands blocks to the SMs in increasing linear index in practice (not a documented
//   guarantee; FlashAttention-3's deterministic backward relies on the same), so when block j is
//   resident, every block it waits on is resident or finished, and by induction from K tile 0
//   (which never waits) all of them finish. Blocks dispatched in another order could hang; the
//   CPU emulation runs blocks in increasing index and turns a spin whose condition is false into
//   an error, so a kernel that waits on a later block fails there (the tests reverse the order
//   to show that this check fires).
// - Each block walks its Q tiles downwards (i = n-1, ..., j), so blocks j-1 and j visit the same
//   Q tile on the same pass and a block trails its predecessor by one add. (Walking upwards,
//   block j's first tile, i = j, would wait until blocks 0..j-1 had all reached it: j passes idle.)
//
// dQ keeps the dQ kernel's centered keys (see there): kc_tile = K_j - k_mean is built once per
// block, since the K tile stays the block's for the whole loop.
// The dQ product needs, for each of a warp's 16 queries, dS over all 64 keys, while a warp's
// registers hold dSᵀ for its own 16 keys: each warp writes its 16-bit dSᵀ into ds_tile and, after
// a barrier, reads its queries' dS back as A fragments (load_a_transposed). dQ is computed and
// added DQ_COLS columns at a time (once at D = 64, twice at D = 128), so the partial costs 32
// registers.
// Costs: dq_acc (B*H*T*D*4 bytes: 25 MB at GPT-2 Small's 8x12x1024x64), two more shared tiles
// (kc_tile, ds_tile), and 4 barriers per pass instead of 2.
// ----------------------------------------------------------------------------------------

constexpr int DQ_COLS = 64;  // columns of dQ computed and added at a time

// Writes a warp's (16, COLS) 16-bit A fragments (to_a_fragments' layout) into rows [row0, row0 + 16)
// of a shared tile with row stride ld, as the 16-bit matrix they hold.
template <int COLS, typename scalar_t>
__device__ __forceinline__ void store_a_fragments(scalar_t* tile, int ld, const uint32_t (&a)[COLS / 16][4], int row0) {
    const int lane = threadIdx.x % 32;
    uint32_t* top = reinterpret_cast<uint32_t*>(tile + (row0 + lane / 4) * ld);         // row g
    uint32_t* bottom = reinterpret_cast<uint32_t*>(tile + (row0 + lane / 4 + 8) * ld);  // row g + 8
#pragma unroll
    for (int kk = 0; kk < COLS / 16; ++kk) {  // a[kk]: columns 16 kk + 2t (regs 0, 1) and 16 kk + 8 + 2t (2, 3)
        top[8 * kk + lane % 4] = a[kk][0];
        bottom[8 * kk + lane % 4] = a[kk][1];
        top[8 * kk + 4 + lane % 4] = a[kk][2];
        bottom[8 * kk + 4 + lane % 4] = a[kk][3];
    }
}

// Adds a warp's (16, DQ_COLS) fp32 dQ partial, rows [row0, row0 + 16) and columns [col0, col0 +
// DQ_COLS) of the head, into the head's fp32 accumulator acc (seq_len, D) while the block holds the
// turn: `first` stores it (acc holds nothing of this run yet), otherwise load, add, store; `last`
// writes scale * (acc + partial) to dq as 16-bit instead of storing. Rows past seq_len are skipped.
// acc is read and written at L2 (.cg), where the other blocks' adds land, not through this SM's L1.
template <int D, typename scalar_t>
__device__ void add_dq_partial(const float (&part)[DQ_COLS / 8][4], float* acc, HeadMatrix<scalar_t> dq, int row0,
                               int col0, int seq_len, bool first, bool last, float scale) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + frag_row(2 * h);
        if (row >= seq_len) continue;
        float* acc_row = acc + row * D + col0;
        uint32_t* out_row = reinterpret_cast<uint32_t*>(dq.rows + row * dq.stride + col0);
#pragma unroll
        for (int n = 0; n < DQ_COLS / 8; ++n) {
            const int col = 8 * n + frag_col(0);
            float2 sum = make_float2(part[n][2 * h], part[n][2 * h + 1]);
            if (!first) {
                const float2 before = __ldcg(reinterpret_cast<const float2*>(acc_row + col));
                sum.x = before.x + sum.x;
                sum.y = before.y + sum.y;
            }
            if (last) out_row[col / 2] = pack2<scalar_t>(sum.x * scale, sum.y * scale);  // dQ = scale dS (K - k_mean)
            else __stcg(reinterpret_cast<float2*>(acc_row + col), sum);
        }
    }
}

// dK, dV for one K tile and its share of dQ for every Q tile that sees it: one block per (K tile,
// batch*head). Warp w owns keys [16 w, 16 w + 16) of the tile for dK, dV (as in the dK/dV kernel)
// and queries [16 w, 16 w + 16) of each visited Q tile for dQ.
template <int D, typename scalar_t>
__global__ void __launch_bounds__(THREADS)
attention_backward_fused_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                const scalar_t* __restrict__ v, const scalar_t* __restrict__ d_o,
                                const float* __restrict__ lse, const float* __restrict__ delta,
                                const float* __restrict__ k_mean, float* dq_acc,  // both shared with other blocks:
                                unsigned* dq_turn, scalar_t* __restrict__ dq,     // no __restrict__
                                scalar_t* __restrict__ dk, scalar_t* __restrict__ dv, const Layout layout,
                                int seq_len, float scale) {
    using Smem = FusedSmem<D>;
    extern __shared__ __align__(128) unsigned char smem[];
    scalar_t* k_tile = reinterpret_cast<scalar_t*>(smem + Smem::k_tile);
    scalar_t* v_tile = reinterpret_cast<scalar_t*>(smem + Smem::v_tile);
    scalar_t* kc_tile = reinterpret_cast<scalar_t*>(smem + Smem::kc_tile);  // 16-bit(k - k_mean)
    scalar_t* ds_tile = reinterpret_cast<scalar_t*>(smem + Smem::ds_tile);  // this pass's dSᵀ, keys as rows
    auto q_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::q_tile(buffer)); };
    auto do_tile = [&](int buffer) { return reinterpret_cast<scalar_t*>(smem + Smem::do_tile(buffer)); };
    auto lse_tile = [&](int buffer) { return reinterpret_cast<float*>(smem + Smem::lse_tile(buffer)); };
    auto delta_tile = [&](int buffer) { return reinterpret_cast<float*>(smem + Smem::delta_tile(buffer)); };

    const int warp = threadIdx.x / 32;
    const size_t head_rows = (size_t)blockIdx.x * seq_len;  // this head's first entry in lse, delta, dq_acc rows
    const HeadMatrix<const scalar_t> q_head = head_matrix(q, layout.q, layout.heads);
    const HeadMatrix<const scalar_t> do_head = head_matrix(d_o, layout.d_o, layout.heads);
    const HeadMatrix<scalar_t> dq_head = head_matrix(dq, layout.dq, layout.heads);
    float* head_acc = dq_acc + head_rows * D;                        // (seq_len, D) fp32
    unsigned* head_turns = dq_turn + (size_t)blockIdx.x * gridDim.y;  // one counter per Q tile
    const int k_start = blockIdx.y * BLOCK_K;  // K tile j = blockIdx.y: the order the turns rely on (above)
    const int k_row0 = k_start + warp * STRIPE;  // this warp's first key position
    const bool first = blockIdx.y == 0;          // K tile 0 adds first into every Q tile
    const int last_q_start = (gridDim.y - 1) * BLOCK_Q;  // Q tiles from the last down to the diagonal one

    auto load_q_side = [&](int buffer, int q_start) {  // q, dO, lse, delta of one pass into `buffer`
        load_tile_async<BLOCK_Q, D>(q_tile(buffer), q_head, q_start, seq_len);
        load_tile_async<BLOCK_Q, D>(do_tile(buffer), do_head, q_start, seq_len);
        load_rows_async<BLOCK_Q>(lse_tile(buffer), lse + head_rows, q_start, seq_len);
        load_rows_async<BLOCK_Q>(delta_tile(buffer), delta + head_rows, q_start, seq_len);
    };
    load_tile_async<BLOCK_K, D>(k_tile, head_matrix(k, layout.k, layout.heads), k_start, seq_len);
    load_tile_async<BLOCK_K, D>(v_tile, head_matrix(v, layout.v, layout.heads), k_start, seq_len);
    load_q_side(0, last_q_start);
    cp_async_commit();
    float dk_acc[D / 8][4] = {}, dv_acc[D / 8][4] = {};  // this warp's (16, D) dK and dV, fp32

    int buffer = 0;  // which q_tile / do_tile / lse / delta holds this pass's queries
    // this warp's keys, in registers where key_stripes_in_registers says they fit
    Stripe<D, scalar_t, key_stripes_in_registers(D)> k_rows(k_tile, warp * STRIPE), v_rows(v_tile, warp * STRIPE);
    for (int q_start = last_q_start; q_start >= k_start; q_start -= BLOCK_Q, buffer ^= 1) {
        if (q_start - BLOCK_Q >= k_start) load_q_side(buffer ^ 1, q_start - BLOCK_Q);  // prefetch the next pass
        cp_async_commit();   // one group per pass (empty on the last), so that:
        cp_async_wait<1>();  // everything but the newest group, the prefetch, has landed
        if (q_start == last_q_start) {  // first pass: this thread's chunks of k_tile have landed; center them
            float mean[8];  // the head's mean key at the 8 columns this thread centers
#pragma unroll
            for (int e = 0; e < 8; ++e) mean[e] = k_mean[(size_t)blockIdx.x * D + (threadIdx.x % (D / 8)) * 8 + e];
            center_own_chunks<D>(kc_tile, k_tile, mean, k_start, seq_len);
        }
        __syncthreads();  // for every thread: this pass's tiles (and k_tile, v_tile, kc_tile) are complete
        const scalar_t* q_now = q_tile(buffer);
        const scalar_t* do_now = do_tile(buffer);
        float s[BLOCK_Q / 8][4], dp[BLOCK_Q / 8][4];  // sᵀ and dpᵀ: (16 keys, BLOCK_Q queries)
        if (q_start == last_q_start) {  // k_tile, v_tile landed with the first pass (block-uniform)
            k_rows.load();
            v_rows.load();
        }
        warp_matmul_abt<D, BLOCK_Q>(s, k_rows, q_now);    // sᵀ = k_tile @ q_tileᵀ
        warp_matmul_abt<D, BLOCK_Q>(dp, v_rows, do_now);  // dpᵀ = v_tile @ do_tileᵀ
        if (fragment_needs_mask(q_start, BLOCK_Q, k_row0, STRIPE, seq_len))  // uniform per warp
            recompute_p_and_ds<true, true>(s, dp, lse_tile(buffer), delta_tile(buffer), k_start, q_start, seq_len, scale);
        else
            recompute_p_and_ds<true, false>(s, dp, lse_tile(buffer), delta_tile(buffer), k_start, q_start, seq_len, scale);
        uint32_t a[BLOCK_Q / 16][4];
        to_a_fragments<BLOCK_Q, scalar_t>(a, s);                  // pᵀ in 16 bits
        warp_matmul_ab<BLOCK_Q, D, scalar_t>(dv_acc, a, do_now);  // dv += pᵀ @ do_tile
        to_a_fragments<BLOCK_Q, scalar_t>(a, dp);                 // dsᵀ in 16 bits
        warp_matmul_ab<BLOCK_Q, D, scalar_t>(dk_acc, a, q_now);   // dk += dsᵀ @ q_tile
        store_a_fragments<BLOCK_Q>(ds_tile, ld16(BLOCK_Q), a, warp * STRIPE);  // this warp's keys' rows of dsᵀ
        __syncthreads();  // ds_tile is complete

        const bool last = q_start == k_start;  // the diagonal Q tile: this block adds last into it
        unsigned* turn = head_turns + q_start / BLOCK_Q;
        uint32_t ds[BLOCK_K / 16][4];  // dS as A fragments: this warp's 16 queries x the tile's 64 keys
#pragma unroll
        for (int kk = 0; kk < BLOCK_K / 16; ++kk) load_a_transposed(ds[kk], ds_tile, ld16(BLOCK_Q), warp * STRIPE, 16 * kk);
#pragma unroll
        for (int c = 0; c < D / DQ_COLS; ++c) {
            float part[DQ_COLS / 8][4] = {};
            warp_matmul_ab<BLOCK_K, D, scalar_t, DQ_COLS>(part, ds, kc_tile + c * DQ_COLS);  // dS (K - k_mean)
            if (c == 0 && !first) {  // block-uniform: wait until K tiles 0..j-1 have added into this Q tile
                if (threadIdx.x == 0) spin_until_equal(turn, blockIdx.y);
                __syncthreads();  // the turn is the block's (thread 0's acquire, passed on by the barrier)
            }
            add_dq_partial<D>(part, head_acc, dq_head, q_start + warp * STRIPE, c * DQ_COLS, seq_len, first, last, scale);
        }
        if (!last) __threadfence();  // this thread's adds are visible GPU-wide before the release below
        __syncthreads();  // every warp is done with this buffer and ds_tile, and has added
        if (!last && threadIdx.x == 0) release_increment(turn);  // the turn passes to K tile j + 1
    }

    const float one[2] = {1.0f, 1.0f}, by_scale[2] = {scale, scale};  // dK = scale dSᵀ Q, in fp32
    store_stripe<D>(dv_acc, one, head_matrix(dv, layout.dv, layout.heads), k_row0, seq_len);
    store_stripe<D>(dk_acc, by_scale, head_matrix(dk, layout.dk, layout.heads), k_row0, seq_len);
}

// ----------------------------------------------------------------------------------------
// Host side: launches for one (head size, dtype), then the extern "C" API for ctypes
// ----------------------------------------------------------------------------------------

// Error codes: 0 is success, positive values are cudaError_t, negative values are ours.
enum GustStatus {
    GUST_OK = 0,
    GUST_BAD_HEAD_DIM = -1,      // head_dim is not 64 or 128
    GUST_BAD_DTYPE = -2,         // dtype flag is not GUST_FP16 or GUST_BF16
    GUST_MISALIGNED = -3,        // a pointer or stride is not 16-byte aligned (the tile loads are 16 bytes wide)
    GUST_BAD_SIZE = -4,          // negative sizes, or more Q tiles than a grid dimension holds
    GUST_SMEM_TOO_SMALL = -5,    // the device cannot give a block the shared memory it needs
    GUST_BAD_SCALE = -6,         // scale is not a positive finite number (online_softmax scales after the max)
};
enum GustDtype { GUST_FP16 = 0, GUST_BF16 = 1 };

int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Shared memory above 48 KB must be opted into per kernel and device. The attribute stays set for
// the process's life, so it is set once per (kernel, device), not before every launch (a driver call
// each time). Each kernel is always launched with the same bytes (a constant of its instantiation).
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
    static std::mutex mutex;  // one per Kernel type; the key below names the kernel itself
    static std::vector<std::pair<const void*, int>> opted_in;  // (kernel, device) pairs done
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const std::pair<const void*, int> key(reinterpret_cast<const void*>(kernel), device);
    std::lock_guard<std::mutex> lock(mutex);  // launches from several host threads
    if (std::find(opted_in.begin(), opted_in.end(), key) != opted_in.end()) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (err == cudaSuccess) opted_in.push_back(key);
    return err;
}

template <int D, typename scalar_t>
int launch_forward(const void* q, const void* k, const void* v, void* o, float* lse, float* row_abs_max,
                   const Layout& layout, int batch_heads, int seq_len, float scale, cudaStream_t stream) {
    constexpr int smem_bytes = ForwardSmem<D>::bytes;
    auto kernel = row_abs_max != nullptr ? attention_forward_kernel<D, scalar_t, true>
                                         : attention_forward_kernel<D, scalar_t, false>;
    cudaError_t err = allow_smem(kernel, smem_bytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(batch_heads, ceil_div(seq_len, BLOCK_Q));  // x: (batch, head); y: Q tile
    kernel<<<grid, THREADS, smem_bytes, stream>>>(static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k),
                                            static_cast<const scalar_t*>(v), static_cast<scalar_t*>(o), lse,
                                            row_abs_max, layout, seq_len, scale);
    return cudaGetLastError();
}

// delta = rowsum(dO * O), the first kernel of both backwards.
// delta, k_mean and (fused backward) the zeroed turn counters, the first kernel of both backwards.
template <int D, typename scalar_t>
int launch_prologue(const void* o, const void* d_o, const void* k, float* delta, float* k_mean, unsigned* dq_turn,
                    const Layout& layout, int batch_heads, int seq_len, cudaStream_t stream) {
    const long long total_rows = (long long)batch_heads * seq_len;
    constexpr int rows_per_block = THREADS / (D / VEC);
    const long long delta_blocks = (total_rows + rows_per_block - 1) / rows_per_block;
    if (delta_blocks + batch_heads > 0x7fffffffLL) return GUST_BAD_SIZE;  // a grid's x dimension
    auto kernel = attention_backward_prologue_kernel<D, scalar_t>;
    kernel<<<(unsigned)(delta_blocks + batch_heads), THREADS, PROLOGUE_SMEM_BYTES, stream>>>(
        static_cast<const scalar_t*>(o), static_cast<const scalar_t*>(d_o), static_cast<const scalar_t*>(k), delta,
        k_mean, dq_turn, layout, seq_len, total_rows, (int)delta_blocks);
    return cudaGetLastError();
}

template <int D, typename scalar_t>
int launch_backward(const void* q, const void* k, const void* v, const void* o, const void* d_o,
                    const float* lse, float* k_mean, float* delta, void* dq, void* dk, void* dv,
                    const Layout& layout, int batch_heads, int seq_len, float scale, cudaStream_t stream) {
    const scalar_t* q_ = static_cast<const scalar_t*>(q);
    const scalar_t* k_ = static_cast<const scalar_t*>(k);
    const scalar_t* v_ = static_cast<const scalar_t*>(v);
    const scalar_t* do_ = static_cast<const scalar_t*>(d_o);
    cudaError_t err = static_cast<cudaError_t>(
        launch_prologue<D, scalar_t>(o, d_o, k, delta, k_mean, nullptr, layout, batch_heads, seq_len, stream));
    if (err != cudaSuccess) return err;

    const dim3 grid(batch_heads, ceil_div(seq_len, BLOCK_Q));  // x: (batch, head); y: K tile, then Q tile
    auto dkdv_kernel = attention_backward_dkdv_kernel<D, scalar_t>;
    if ((err = allow_smem(dkdv_kernel, DkDvSmem<D>::bytes)) != cudaSuccess) return err;
    dkdv_kernel<<<grid, THREADS, DkDvSmem<D>::bytes, stream>>>(q_, k_, v_, do_, lse, delta, static_cast<scalar_t*>(dk),
                                                         static_cast<scalar_t*>(dv), layout, seq_len, scale);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;

    auto dq_kernel = attention_backward_dq_kernel<D, scalar_t>;
    if ((err = allow_smem(dq_kernel, DqSmem<D>::bytes)) != cudaSuccess) return err;
    dq_kernel<<<grid, THREADS, DqSmem<D>::bytes, stream>>>(q_, k_, v_, do_, lse, delta, k_mean,
                                                     static_cast<scalar_t*>(dq), layout, seq_len, scale);
    return cudaGetLastError();
}

// The fused backward: delta, k_mean and the turn counters zeroed (one prologue kernel), then one kernel
// for dK, dV and dQ. dq_acc: (batch_heads, seq_len, head_dim) fp32 scratch (need not be zeroed);
// dq_turn: batch_heads * ⌈T/64⌉ counters, zeroed by the prologue on the stream.
template <int D, typename scalar_t>
int launch_backward_fused(const void* q, const void* k, const void* v, const void* o, const void* d_o,
                          const float* lse, float* k_mean, float* delta, float* dq_acc, unsigned* dq_turn,
                          void* dq, void* dk, void* dv, const Layout& layout, int batch_heads, int seq_len,
                          float scale, cudaStream_t stream) {
    static_assert(BLOCK_K == BLOCK_Q, "the prologue zeroes one counter per Q tile: ⌈T/64⌉ per head");
    cudaError_t err = static_cast<cudaError_t>(
        launch_prologue<D, scalar_t>(o, d_o, k, delta, k_mean, dq_turn, layout, batch_heads, seq_len, stream));
    if (err != cudaSuccess) return err;
    // x: (batch, head); y: K tile. This order is what the kernel's turns rely on: a block waits only
    // on blocks of its head with a smaller y, hence a smaller linear index, dispatched before it.
    const dim3 grid(batch_heads, ceil_div(seq_len, BLOCK_K));
    auto kernel = attention_backward_fused_kernel<D, scalar_t>;
    if ((err = allow_smem(kernel, FusedSmem<D>::bytes)) != cudaSuccess) return err;
    kernel<<<grid, THREADS, FusedSmem<D>::bytes, stream>>>(
        static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v),
        static_cast<const scalar_t*>(d_o), lse, delta, k_mean, dq_acc, dq_turn, static_cast<scalar_t*>(dq),
        static_cast<scalar_t*>(dk), static_cast<scalar_t*>(dv), layout, seq_len, scale);
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

// Sizes the grid can hold: batch*heads on x (up to 2^31 - 1), Q tiles on y (up to 65,535); and a
// positive finite scale (online_softmax takes the row max before scaling).
int check_sizes_and_scale(int batch, int heads, int seq_len, float scale) {
    if (batch < 0 || heads <= 0 || seq_len < 0) return GUST_BAD_SIZE;
    if ((long long)batch * heads > 2147483647LL || ceil_div(seq_len, BLOCK_Q) > 65535) return GUST_BAD_SIZE;
    if (!(scale > 0.0f && scale < INFINITY)) return GUST_BAD_SCALE;  // NaN fails both
    return GUST_OK;
}

// A Layout from `count` (batch, head, row) stride triples in Layout's order (q, k, v, o, d_o, dq,
// dk, dv); the rest stay 0. Every 16-byte tile load and 4-byte pair store stays aligned only if
// each stride is a multiple of 8 elements (16 bytes): GUST_MISALIGNED otherwise. Row offsets
// within a head must fit in 32 bits (HeadMatrix): GUST_BAD_SIZE otherwise.
int make_layout(Layout* layout, const long long* strides, int count, int heads, int seq_len) {
    Strides* fields[] = {&layout->q, &layout->k, &layout->v, &layout->o, &layout->d_o, &layout->dq, &layout->dk, &layout->dv};
    *layout = Layout{};
    layout->heads = heads;
    for (int i = 0; i < count; ++i) {
        *fields[i] = Strides{strides[3 * i], strides[3 * i + 1], strides[3 * i + 2]};
        for (int j = 0; j < 3; ++j)
            if (strides[3 * i + j] % 8 != 0) return GUST_MISALIGNED;
        if (strides[3 * i + 2] < 0 || (long long)seq_len * strides[3 * i + 2] > 2147483647LL) return GUST_BAD_SIZE;
    }
    return GUST_OK;
}

}  // namespace

extern "C" {

// Forward. q, k, v, o: (batch, heads, seq_len, head_dim) 16-bit views, 16-byte aligned, with
// element strides[0..11] = (batch, head, row) of q, k, v, o in turn (head_dim contiguous; each
// stride a multiple of 8). lse: (batch * heads, seq_len) fp32, written. row_abs_max: same shape,
// or null; if given, receives each row's largest |scaled score| over its visible keys (how close
// scores get to overflow). dtype: 0 fp16, 1 bf16. stream: a cudaStream_t. Returns 0 or an
// error code (see error_string).
int gust_attention_forward(const void* q, const void* k, const void* v, void* o, void* lse, void* row_abs_max,
                           const long long* strides, int batch, int heads, int seq_len, int head_dim, float scale,
                           int dtype, void* stream) {
    if (int bad = check_sizes_and_scale(batch, heads, seq_len, scale)) return bad;
    if (!aligned16(q) || !aligned16(k) || !aligned16(v) || !aligned16(o)) return GUST_MISALIGNED;
    Layout layout;
    if (int bad = make_layout(&layout, strides, 4, heads, seq_len)) return bad;
    if (batch == 0 || seq_len == 0) return GUST_OK;  // nothing to do; an empty grid is a launch error
    return dispatch(head_dim, dtype, [&](auto head_dim_tag, auto type_tag) {
        constexpr int D = decltype(head_dim_tag)::value;
        using scalar_t = typename decltype(type_tag)::type;
        return launch_forward<D, scalar_t>(q, k, v, o, static_cast<float*>(lse), static_cast<float*>(row_abs_max),
                                           layout, batch * heads, seq_len, scale, static_cast<cudaStream_t>(stream));
    });
}

// Backward. q, k, v, o, d_o (the output's gradient), dq, dk, dv (outputs): views as in the
// forward, with strides[0..23] = (batch, head, row) of q, k, v, o, d_o, dq, dk, dv in turn; lse:
// the forward's. k_mean: (batch * heads, head_dim) fp32, written here: each head's mean key over the
// sequence (see the dQ kernel for why). delta: (batch * heads, seq_len) fp32, written here: rowsum(dO * O).
int gust_attention_backward(const void* q, const void* k, const void* v, const void* o, const void* d_o,
                            const void* lse, void* k_mean, void* delta, void* dq, void* dk, void* dv,
                            const long long* strides, int batch, int heads, int seq_len, int head_dim, float scale,
                            int dtype, void* stream) {
    if (int bad = check_sizes_and_scale(batch, heads, seq_len, scale)) return bad;
    const void* tiles[] = {q, k, v, o, d_o, dq, dk, dv};
    for (const void* p : tiles)
        if (!aligned16(p)) return GUST_MISALIGNED;
    Layout layout;
    if (int bad = make_layout(&layout, strides, 8, heads, seq_len)) return bad;
    if (batch == 0 || seq_len == 0) return GUST_OK;
    return dispatch(head_dim, dtype, [&](auto head_dim_tag, auto type_tag) {
        constexpr int D = decltype(head_dim_tag)::value;
        using scalar_t = typename decltype(type_tag)::type;
        return launch_backward<D, scalar_t>(q, k, v, o, d_o, static_cast<const float*>(lse),
                                            static_cast<float*>(k_mean), static_cast<float*>(delta), dq, dk,
                                            dv, layout, batch * heads, seq_len, scale,
                                            static_cast<cudaStream_t>(stream));
    });
}

// The fused backward: the same arguments as gust_attention_backward, plus dq_acc, (batch * heads,
// seq_len, head_dim) fp32 scratch (16-byte aligned, any contents), and dq_turn, batch * heads *
// ⌈seq_len / 64⌉ unsigned counters (any contents: zeroed on the stream first). dK, dV and dQ come out of one
// kernel; dQ is accumulated in a fixed order, so two calls give the same bits (see the kernel).
int gust_attention_backward_fused(const void* q, const void* k, const void* v, const void* o, const void* d_o,
                                  const void* lse, void* k_mean, void* delta, void* dq_acc, void* dq_turn,
                                  void* dq, void* dk, void* dv, const long long* strides, int batch, int heads,
                                  int seq_len, int head_dim, float scale, int dtype, void* stream) {
    if (int bad = check_sizes_and_scale(batch, heads, seq_len, scale)) return bad;
    const void* tiles[] = {q, k, v, o, d_o, dq, dk, dv, dq_acc};
    for (const void* p : tiles)
        if (!aligned16(p)) return GUST_MISALIGNED;
    Layout layout;
    if (int bad = make_layout(&layout, strides, 8, heads, seq_len)) return bad;
    if (batch == 0 || seq_len == 0) return GUST_OK;
    return dispatch(head_dim, dtype, [&](auto head_dim_tag, auto type_tag) {
        constexpr int D = decltype(head_dim_tag)::value;
        using scalar_t = typename decltype(type_tag)::type;
        return launch_backward_fused<D, scalar_t>(q, k, v, o, d_o, static_cast<const float*>(lse),
                                                  static_cast<float*>(k_mean), static_cast<float*>(delta),
                                                  static_cast<float*>(dq_acc), static_cast<unsigned*>(dq_turn), dq, dk,
                                                  dv, layout, batch * heads, seq_len, scale,
                                                  static_cast<cudaStream_t>(stream));
    });
}

// Dynamic shared memory one block needs: which = 0 forward, 1 split backward (the larger of dK/dV,
// dQ), 2 fused backward.
int gust_attention_smem_bytes(int head_dim, int which) {
    if (which < 0 || which > 2) return GUST_BAD_SIZE;
    if (head_dim == 64)
        return which == 0 ? ForwardSmem<64>::bytes
               : which == 1 ? std::max(DkDvSmem<64>::bytes, DqSmem<64>::bytes) : FusedSmem<64>::bytes;
    if (head_dim == 128)
        return which == 0 ? ForwardSmem<128>::bytes
               : which == 1 ? std::max(DkDvSmem<128>::bytes, DqSmem<128>::bytes) : FusedSmem<128>::bytes;
    return GUST_BAD_HEAD_DIM;
}

// 0 if the kernels for head_dim can run on the current device: the library holds machine code
// for it (cudaFuncGetAttributes fails otherwise) and a block may have the shared memory needed.
int gust_attention_check_device(int head_dim) {
    int needed = 0;
    for (int which = 0; which <= 2; ++which) needed = std::max(needed, gust_attention_smem_bytes(head_dim, which));
    if (gust_attention_smem_bytes(head_dim, 0) < 0) return gust_attention_smem_bytes(head_dim, 0);
    cudaFuncAttributes attributes;
    cudaError_t err = cudaFuncGetAttributes(&attributes, attention_forward_kernel<64, __half, false>);
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
        case GUST_MISALIGNED: return "a tensor's data pointer or a stride is not 16-byte aligned";
        case GUST_BAD_SIZE: return "sizes out of range (negative, no heads, B * H over 2^31 - 1, or T over 65,535 * 64)";
        case GUST_SMEM_TOO_SMALL: return "this GPU cannot give a block enough shared memory";
        case GUST_BAD_SCALE: return "scale must be a positive finite number";
        default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown gust error";
    }
}

}  // extern "C"
