// cuda_on_cpu.h — runs attention.cu's kernels on CPU threads, so tests on machines without a
// GPU exercise the kernel's own index arithmetic, tile loops, masking, tails and shared-memory
// layout against reference.py.
//
// Not a CUDA implementation: it covers exactly the subset attention.cu uses. Each CUDA thread
// is an OS thread; __syncthreads, __syncwarp and the shuffles are real barriers, so a missing
// barrier shows up as a wrong answer only sometimes. mma.sync and ldmatrix are emulated from the
// register layouts the PTX ISA documents (bottom of this file). Checks that fail loudly: ldmatrix
// rows not 16-byte aligned or outside shared memory, and the opt-in shared-memory limit of an
// H100. Shared memory starts filled with NaN bytes so a read of a never-written tile poisons
// the output. Blocks run one at a time in increasing linear index (or reversed, for a test), and
// a spin-wait on a counter that does not yet hold its value fails the launch instead of hanging
// (bottom of this file).
//
// emulate.py compiles attention.cu with this header in place of the CUDA headers, after turning
// each `kernel<<<grid, threads, smem_bytes, stream>>>(args)` into `emu_launch(kernel, ...)` and
// `extern __shared__ ... smem[];` into a pointer to the block's shared memory.

#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

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
struct alignas(8) float2 {
    float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

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
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct cudaFuncAttributes {
    int maxThreadsPerBlock;
};
constexpr int EMU_SMEM_OPTIN_BYTES = 232448;  // an H100's opt-in limit (227 KB)

constexpr int EMU_SMEM_DEFAULT_BYTES = 48 * 1024;  // what a kernel may use without opting in

// Each kernel's opted-in dynamic shared memory, as a GPU keeps it: per function (one device here).
inline std::map<const void*, int>& emu_allowed_smem() {
    static std::map<const void*, int> bytes;
    return bytes;
}
inline std::atomic<int> emu_smem_optin_calls{0};  // cudaFuncSetAttribute calls so far (tests read it)
extern "C" int gust_emu_smem_optin_calls() { return emu_smem_optin_calls; }

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel kernel, cudaFuncAttribute, int value) {
    ++emu_smem_optin_calls;
    if (value > EMU_SMEM_OPTIN_BYTES) return cudaErrorInvalidValue;
    emu_allowed_smem()[reinterpret_cast<const void*>(kernel)] = value;
    return cudaSuccess;
}
template <typename Kernel>
int emu_smem_limit(Kernel kernel) {
    const auto found = emu_allowed_smem().find(reinterpret_cast<const void*>(kernel));
    return found == emu_allowed_smem().end() ? EMU_SMEM_DEFAULT_BYTES : std::max(found->second, EMU_SMEM_DEFAULT_BYTES);
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
    if (error == cudaErrorLaunchFailure)
        return "emulated kernel: a spin-wait's condition was false when it ran, so on a GPU it would wait for a "
               "block launched after it (blocks are ordered wrongly); see stderr";
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
inline size_t shared_bytes = 0;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline float warp_exchange[32][32];  // [warp][lane] slots for the shuffles
inline std::atomic<bool> spin_failed{false};  // a spin-wait of this launch found its condition false (spin_until_equal)
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
// walks the blocks in the same order, so the per-block barriers line up. The order is increasing
// linear block index (x fastest, then y), the order in which a GPU hands blocks to its SMs in
// practice; with GUST_EMU_BLOCK_ORDER=reverse in the environment (tests only) it is decreasing,
// which a kernel whose blocks wait on earlier blocks (the fused backward) must not survive: its
// spin-waits then find their condition false and the launch fails (see spin_until_equal).
template <typename... Params, typename... Args>
cudaError_t emu_launch(void (*kernel)(Params...), dim3 grid, int threads, int smem_bytes, cudaStream_t,
                       Args... args) {
    if (threads % 32 != 0 || threads > 1024 || smem_bytes > emu_smem_limit(kernel) || grid.x == 0 || grid.y == 0) {
        emu_last_error() = cudaErrorInvalidValue;
        return cudaErrorInvalidValue;
    }
    const char* order = std::getenv("GUST_EMU_BLOCK_ORDER");
    const bool reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
    emu::spin_failed = false;
    const size_t bytes = (size_t(smem_bytes) + 127) / 128 * 128;
    unsigned char* shared = bytes ? static_cast<unsigned char*>(std::aligned_alloc(128, bytes)) : nullptr;
    std::barrier<> block_barrier(threads);
    emu::block_barrier = &block_barrier;
    emu::warp_barriers.clear();
    for (int w = 0; w < threads / 32; ++w) emu::warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    emu::grid_dim = grid;
    emu::shared_memory = shared;
    emu::shared_bytes = bytes;
    auto run = [&](unsigned thread) {
        emu::thread_idx = uint3_emu{thread, 0, 0};
        const size_t blocks = size_t(grid.x) * grid.y;
        for (size_t n = 0; n < blocks; ++n) {
            const size_t linear = reverse ? blocks - 1 - n : n;  // blockIdx.x + gridDim.x * blockIdx.y
            if (thread == 0 && shared) std::memset(shared, 0xff, bytes);  // NaN in every dtype
            block_barrier.arrive_and_wait();  // shared memory is reset before the block starts
            emu::block_idx = uint3_emu{unsigned(linear % grid.x), unsigned(linear / grid.x), 0};
            kernel(static_cast<Params>(args)...);
            block_barrier.arrive_and_wait();  // the block is over before shared memory is reset
        }
    };
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back(run, unsigned(t));
    for (auto& thread : pool) thread.join();
    std::free(shared);
    if (emu::spin_failed) {
        emu_last_error() = cudaErrorLaunchFailure;
        return cudaErrorLaunchFailure;
    }
    return cudaSuccess;
}

// ---- tensor cores: mma.m16n8k16 and ldmatrix, from the PTX ISA's fragment layouts ----
// Written from the PTX documentation independently of attention.cu's comments: each lane posts
// its registers, then computes its own outputs from every lane's, so a kernel that puts the
// wrong element in the wrong lane or register gets a wrong answer here too.
#define GUST_CUDA_ON_CPU 1

namespace emu {
inline uint32_t mma_words[32][32][6];           // [warp][lane]: a[0..3], b[0..1] of the mma in flight
inline const unsigned char* matrix_rows[32][32];  // [warp][lane]: the row address each lane names
}  // namespace emu

// Element `half` (0: low 16 bits, 1: high) of a packed register, as a float.
template <typename scalar_t>
inline float emu_unpack(uint32_t word, int half) {
    const uint16_t bits = uint16_t(word >> (16 * half));
    scalar_t x;
    std::memcpy(&x, &bits, 2);
    return emu_to_float(x);
}

// d = a @ b + c for one warp. PTX: A[m][k] is in register (m / 8) + 2 (k / 8) of lane
// 4 (m % 8) + (k % 8) / 2, half k % 2; B[k][n] in register k / 8 of lane 4 n + (k % 8) / 2,
// half k % 2; lane l holds C[l/4 + 8 (e / 2)][2 (l % 4) + e % 2] in c[e].
template <typename scalar_t>
inline void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const unsigned warp = emu::thread_idx.x / 32, lane = emu::thread_idx.x % 32;
    uint32_t* mine = emu::mma_words[warp][lane];
    for (int r = 0; r < 4; ++r) mine[r] = a[r];
    mine[4] = b[0];
    mine[5] = b[1];
    __syncwarp();  // every lane has posted its registers
    float result[4];
    for (int e = 0; e < 4; ++e) {
        const int m = int(lane / 4) + 8 * (e / 2), n = 2 * int(lane % 4) + e % 2;
        float sum = c[e];
        for (int k = 0; k < 16; ++k) {
            const float a_mk = emu_unpack<scalar_t>(emu::mma_words[warp][4 * (m % 8) + (k % 8) / 2][m / 8 + 2 * (k / 8)], k % 2);
            const float b_kn = emu_unpack<scalar_t>(emu::mma_words[warp][4 * n + (k % 8) / 2][4 + k / 8], k % 2);
            sum += a_mk * b_kn;
        }
        result[e] = sum;
    }
    __syncwarp();  // every lane has read before the slots are reused
    for (int e = 0; e < 4; ++e) c[e] = result[e];
}

// ldmatrix .x4: lane l names row l % 8 of matrix l / 8; it receives, of matrix i, elements
// [l/4][2 (l%4) + 0, 1] in r[i], or with .trans elements [2 (l%4) + 0, 1][l/4].
inline void emu_ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
    const unsigned warp = emu::thread_idx.x / 32, lane = emu::thread_idx.x % 32;
    const auto* address = static_cast<const unsigned char*>(row);
    if (reinterpret_cast<uintptr_t>(address) % 16 != 0) emu_fail("ldmatrix row address not 16-byte aligned");
    if (address < emu::shared_memory || address + 16 > emu::shared_memory + emu::shared_bytes)
        emu_fail("ldmatrix row outside the block's shared memory");
    emu::matrix_rows[warp][lane] = address;
    __syncwarp();  // every lane has named its row
    for (int i = 0; i < 4; ++i) {
        uint16_t halves[2];
        for (int e = 0; e < 2; ++e) {
            const int row_in = trans ? 2 * int(lane % 4) + e : int(lane / 4);
            const int col_in = trans ? int(lane / 4) : 2 * int(lane % 4) + e;
            std::memcpy(&halves[e], emu::matrix_rows[warp][8 * i + row_in] + 2 * col_in, 2);
        }
        r[i] = uint32_t(halves[0]) | uint32_t(halves[1]) << 16;
    }
    __syncwarp();  // every lane has read before the slots are reused
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu_ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emu_ldmatrix(r, row, true); }

// ---- cp.async: copies are held back until cp_async_wait lets their group land ----
// So a kernel that reads a tile before waiting for it (or before the __syncthreads after the
// wait) reads the NaN that shared memory starts with, as it might on a GPU.
namespace emu {
struct PendingCopy {
    void* destination;
    const void* source;
    int bytes;  // 16 or 4
    bool fill;
};
inline thread_local std::vector<PendingCopy> open_group;                // not yet committed
inline thread_local std::vector<std::vector<PendingCopy>> committed;    // oldest first
}  // namespace emu

inline void emu_cp_async(void* destination, const void* source, int bytes, bool fill) {
    const auto* address = static_cast<const unsigned char*>(destination);
    if (reinterpret_cast<uintptr_t>(address) % bytes != 0 || reinterpret_cast<uintptr_t>(source) % bytes != 0)
        emu_fail("cp.async address not aligned to its size");
    if (address < emu::shared_memory || address + bytes > emu::shared_memory + emu::shared_bytes)
        emu_fail("cp.async destination outside the block's shared memory");
    emu::open_group.push_back({destination, source, bytes, fill});
}
inline void cp_async_16(void* destination, const void* source, bool fill) { emu_cp_async(destination, source, 16, fill); }
inline void cp_async_4(void* destination, const void* source, bool fill) { emu_cp_async(destination, source, 4, fill); }
inline void cp_async_commit() {
    emu::committed.push_back(std::move(emu::open_group));
    emu::open_group.clear();
}
template <int N>
inline void cp_async_wait() {
    while (emu::committed.size() > size_t(N)) {
        for (const auto& copy : emu::committed.front()) {
            if (copy.fill) std::memcpy(copy.destination, copy.source, copy.bytes);
            else std::memset(copy.destination, 0, copy.bytes);
        }
        emu::committed.erase(emu::committed.begin());
    }
}

// ---- ordering between blocks: global-memory fences, L2 loads and stores, acquire/release counters ----
// PTX: __threadfence() is fence.sc.gpu (membar.gl); ld.global.cg / st.global.cg (__ldcg, __stcg) read and
// write at L2, bypassing L1; ld.acquire.gpu and red.release.gpu are a load-acquire and an atomic
// add-release at GPU scope. The emulation runs one block at a time, so between blocks every effect is
// already ordered; within a block the OS threads still need real fences and atomics, which these give.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline float2 __ldcg(const float2* address) { return *address; }
inline void __stcg(float2* address, float2 value) { *address = value; }

// A spin until *counter == value (the GPU version loops on ld.acquire.gpu). Here no other block runs
// while this one does, so a counter that does not already hold the value never will: on a GPU this
// block would wait for one launched after it. That is reported instead of hanging: the first such
// spin prints which block waited for what, and the launch fails with cudaErrorLaunchFailure. The
// thread then carries on as if it had the turn (the results are garbage; the error is the point).
inline void spin_until_equal(const unsigned* counter, unsigned value) {
    const unsigned seen = __atomic_load_n(counter, __ATOMIC_ACQUIRE);
    if (seen == value) return;
    if (!emu::spin_failed)
        std::fprintf(stderr, "cuda_on_cpu: block (%u, %u) spins until a counter holds %u, but it holds %u and no "
                     "other block runs: on a GPU it would wait for a block launched after it\n",
                     emu::block_idx.x, emu::block_idx.y, value, seen);
    emu::spin_failed = true;
}
inline void release_increment(unsigned* counter) { __atomic_fetch_add(counter, 1u, __ATOMIC_RELEASE); }

