// cuda_on_cpu.h — runs attention.cu's kernels on CPU threads, so tests on machines without a
// GPU exercise the kernel's own index arithmetic, tile loops, masking, tails and shared-memory
// layout against reference.py.
//
// Not a CUDA implementation: it covers exactly the subset attention.cu uses. Each CUDA thread
// is an OS thread; __syncthreads, __syncwarp and the shuffles are real barriers, so a missing
// barrier shows up as a wrong answer only sometimes. wmma fragments are emulated by giving every
// lane a full copy of the 16x16 matrix (lane 0 alone stores it), following the documented
// row_major / col_major meaning of the API; the real register layout is never involved.
// Checks that fail loudly: wmma pointer alignment (32 bytes) and stride (multiple of 16 bytes),
// and the opt-in shared-memory limit of an H100. Shared memory starts filled with NaN bytes so
// a read of a never-written tile poisons the output.
//
// emulate.py compiles attention.cu with this header in place of the CUDA headers, after turning
// each `kernel<<<grid, threads, smem_bytes, stream>>>(args)` into `emu_launch(kernel, ...)` and
// `extern __shared__ ... smem[];` into a pointer to the block's shared memory.

#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

using std::min;

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3_emu {
    unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- 16-bit floats: fp16 through GCC's _Float16, bf16 by hand (round to nearest even) ----
struct __half {
    _Float16 value;
};
struct __nv_bfloat16 {
    uint16_t bits;
};
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "16-bit types must be 2 bytes");
inline float __half2float(__half h) { return static_cast<float>(h.value); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }
inline float __bfloat162float(__nv_bfloat16 b) {
    const uint32_t bits = uint32_t(b.bits) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
    return __nv_bfloat16{uint16_t(bits >> 16)};
}
inline float emu_to_float(__half h) { return __half2float(h); }
inline float emu_to_float(__nv_bfloat16 b) { return __bfloat162float(b); }
inline float emu_to_float(float f) { return f; }

// ---- the runtime pieces attention.cu's host code calls ----
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct cudaFuncAttributes {
    int maxThreadsPerBlock;
};
constexpr int EMU_SMEM_OPTIN_BYTES = 232448;  // an H100's opt-in limit (227 KB)

inline int& emu_allowed_smem() {
    static int bytes = 48 * 1024;
    return bytes;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int value) {
    if (value > EMU_SMEM_OPTIN_BYTES) return cudaErrorInvalidValue;
    emu_allowed_smem() = std::max(emu_allowed_smem(), value);
    return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
    attributes->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* device) {
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr, int) {
    *value = EMU_SMEM_OPTIN_BYTES;
    return cudaSuccess;
}
inline cudaError_t& emu_last_error() {
    static cudaError_t error = cudaSuccess;
    return error;
}
inline cudaError_t cudaGetLastError() {
    const cudaError_t error = emu_last_error();
    emu_last_error() = cudaSuccess;
    return error;
}
inline const char* cudaGetErrorString(cudaError_t error) {
    return error == cudaSuccess ? "no error" : "emulated launch error (bad configuration or shared memory)";
}

[[noreturn]] inline void emu_fail(const char* what) {
    std::fprintf(stderr, "cuda_on_cpu: %s\n", what);
    std::fflush(stderr);
    std::abort();
}

// ---- threads, blocks, barriers ----
namespace emu {
inline thread_local uint3_emu thread_idx;
inline thread_local uint3_emu block_idx;
inline dim3 grid_dim;
inline unsigned char* shared_memory = nullptr;  // the running block's dynamic shared memory
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float warp_exchange[32][32];  // [warp][lane] slots for the shuffles
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define gridDim (emu::grid_dim)

inline unsigned char* emu_shared_memory() { return emu::shared_memory; }
inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barriers[emu::thread_idx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const unsigned warp = emu::thread_idx.x / 32, lane = emu::thread_idx.x % 32;
    emu::warp_exchange[warp][lane] = value;
    __syncwarp();  // every lane has published its value
    const float other = emu::warp_exchange[warp][lane ^ unsigned(lane_mask)];
    __syncwarp();  // every lane has read before the slots are reused
    return other;
}

// Runs every block of the grid, one block at a time, with `threads` OS threads; each thread
// walks the blocks in the same order, so the per-block barriers line up.
template <typename... Params, typename... Args>
cudaError_t emu_launch(void (*kernel)(Params...), dim3 grid, int threads, int smem_bytes, cudaStream_t,
                       Args... args) {
    if (threads % 32 != 0 || threads > 1024 || smem_bytes > emu_allowed_smem() || grid.x == 0 || grid.y == 0) {
        emu_last_error() = cudaErrorInvalidValue;
        return cudaErrorInvalidValue;
    }
    const size_t bytes = (size_t(smem_bytes) + 127) / 128 * 128;
    unsigned char* shared = bytes ? static_cast<unsigned char*>(std::aligned_alloc(128, bytes)) : nullptr;
    std::barrier<> block_barrier(threads);
    emu::block_barrier = &block_barrier;
    emu::warp_barriers.clear();
    for (int w = 0; w < threads / 32; ++w) emu::warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    emu::grid_dim = grid;
    emu::shared_memory = shared;
    auto run = [&](unsigned thread) {
        emu::thread_idx = uint3_emu{thread, 0, 0};
        for (unsigned by = 0; by < grid.y; ++by) {
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                if (thread == 0 && shared) std::memset(shared, 0xff, bytes);  // NaN in every dtype
                block_barrier.arrive_and_wait();  // shared memory is reset before the block starts
                emu::block_idx = uint3_emu{bx, by, 0};
                kernel(static_cast<Params>(args)...);
                block_barrier.arrive_and_wait();  // the block is over before shared memory is reset
            }
        }
    };
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(run, unsigned(t));
    for (auto& thread : pool) thread.join();
    std::free(shared);
    return cudaSuccess;
}

// ---- wmma: a logical 16x16 matrix per lane ----
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "only 16x16x16 is emulated");
    static constexpr int num_elements = 256;
    float x[256];  // element (r, c) at x[16 r + c], held whole by every lane
};

template <typename T>
inline void emu_check(const T* pointer, unsigned ldm) {
    if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) emu_fail("wmma pointer not 32-byte aligned");
    if ((ldm * sizeof(T)) % 16 != 0) emu_fail("wmma ldm not a multiple of 16 bytes");
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& frag, const T* pointer, unsigned ldm) {
    emu_check(pointer, ldm);
    constexpr bool rows = std::is_same_v<Layout, row_major>;
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) frag.x[16 * r + c] = emu_to_float(rows ? pointer[r * ldm + c] : pointer[c * ldm + r]);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& frag, const float* pointer, unsigned ldm,
                             layout_t layout) {
    emu_check(pointer, ldm);
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            frag.x[16 * r + c] = layout == mem_row_major ? pointer[r * ldm + c] : pointer[c * ldm + r];
}
inline void store_matrix_sync(float* pointer, const fragment<accumulator, 16, 16, 16, float>& frag, unsigned ldm,
                              layout_t layout) {
    emu_check(pointer, ldm);
    if (emu::thread_idx.x % 32 != 0) return;  // lane 0 writes for the warp; readers must __syncwarp
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            (layout == mem_row_major ? pointer[r * ldm + c] : pointer[c * ldm + r]) = frag.x[16 * r + c];
}
template <typename Use, typename T, typename Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& frag, float value) {
    for (float& element : frag.x) element = value;
}
template <typename T, typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    float result[256];
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 16; ++n) {
            float sum = c.x[16 * m + n];
            for (int k = 0; k < 16; ++k) sum += a.x[16 * m + k] * b.x[16 * k + n];
            result[16 * m + n] = sum;
        }
    std::memcpy(d.x, result, sizeof(result));
}
}  // namespace wmma
}  // namespace nvcuda
