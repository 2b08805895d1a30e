// glm5c: SM90 FP8 grouped GEMM with block-wise scales, for the MoE experts.
//
// What it computes. For every local expert e (group) with rows [start_e, end_e) of the
// expert-sorted activations (end_e = group_ends[e], start_e = group_ends[e-1] or 0), and for
// each of one or two weight stacks s (gate and up share one launch):
//
//   D[start_e:end_e, s*N : s*N+N] = bf16( sum_kb  a_scale[row, kb] * b_scale_s[e, n/128, kb]
//                                          * (A[row, kb*128 : kb*128+128] . B_s[e, n, kb*128 : ...]) )
//
//   A        [rows, K]  float8_e4m3fn, row-major (K contiguous): activations sorted by expert
//   a_scale  [rows, ceil(K/128)] fp32: one scale per token and 128 columns (per-token layout)
//   B_s      [E, N, K]  float8_e4m3fn, K contiguous (an nn.Linear weight stack)
//   b_scale  [E, ceil(N/128), ceil(K/128)] fp32 (GLM-5-FP8's weight_scale_inv, stacked)
//   D        [rows, ldd] bf16, row-major; rows past group_ends[E-1] are not written
//
// fp32 accumulation; each 128-deep K block's partial product is scaled on the CUDA cores before
// it joins the accumulator (CUTLASS's FP8 block-wise mainloop; promotion every K block).
//
// Alignment (checked by the entry point, which returns GLM5C_GG_EINVAL otherwise): K a multiple
// of 16 and N and ldd multiples of 8 (TMA needs 16-byte aligned row strides and group bases),
// A, B and D 16-byte aligned, scales 4-byte aligned. M (rows per group) needs no padding, and
// groups with no rows are skipped. K and N need not be multiples of 128 (TMA zero-fills).
//
// Configurations (template instances below; `config` picks one at run time):
//   0  "tile128x128_coop_cluster1x2": cooperative warp-specialized persistent kernel, tile
//      128(M rows) x 128(N) x 128(K), cluster 1x2x1 (the activation tile is multicast to the two
//      CTAs that share it), 6 pipeline stages. For prefill: many rows per expert.
//   1  "swapab_tile128x32_pingpong": the same product computed transposed, D^T = B A^T, so the
//      weight rows fill the 128-row MMA side and the few tokens of an expert the 32-wide side
//      (pingpong warp-specialized kernel, tile 128(N) x 32(rows) x 128(K), cluster 1x1x1, 10
//      stages). For decode: one or a few rows per expert, where a 128-row tile of tokens would
//      be mostly padding. Scales: 128x128 on the (weight) A side, 1x128 on the (token) B side.
// Both read the scales in their K-major layouts above directly (no transposes). Built with
// nvcc 13.0: 168 registers per thread, no spills; SASS QGMMA.64x128x32 / 64x32x32 .E4M3.E4M3.
//
// No host synchronization: problem sizes, per-group pointers and strides are written on the
// device by `setup_groups` from `group_ends`, and the CUTLASS kernel reads them from there, so
// a launch sequence can be captured in a CUDA graph. All device-side arrays live in the
// caller's workspace (size from glm5c_gg_fp8_workspace_size).
//
// Build: see ops/cutlass/build.py (sm_90a only; --cudart=static, so loading the library needs
// no libcuda and a launch without a driver returns an error code instead of crashing).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <string>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"

#define GLM5C_GG_ABI_VERSION 1

// error codes (glm5c_gg_fp8_error_string names them; glm5c_gg_fp8_last_error has the details)
#define GLM5C_GG_OK 0
#define GLM5C_GG_EINVAL 1      // bad argument: size, alignment, null pointer, unknown config
#define GLM5C_GG_EWORKSPACE 2  // workspace smaller than glm5c_gg_fp8_workspace_size
#define GLM5C_GG_ECUTLASS 3    // CUTLASS refused the problem (can_implement / initialize)
#define GLM5C_GG_ECUDA 4       // a CUDA runtime error (no driver, no device, launch failure)

namespace glm5c {

using namespace cute;

using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using UnderlyingProblem = ProblemShape::UnderlyingProblemShape;

// One kernel configuration. kSwapAB: A is the weight stack and B the tokens (see above).
template <class TileShape_, class ClusterShape_, class KernelSchedule_, class EpilogueSchedule_, bool kSwapAB_>
struct Config {
  static constexpr bool kSwapAB = kSwapAB_;
  using TileShape = TileShape_;
  using ClusterShape = ClusterShape_;

  using ElementIn = cutlass::float_e4m3_t;
  using ElementOut = cutlass::bfloat16_t;
  using ElementAcc = float;
  static constexpr int kAlignIn = 16;  // elements of 8 bits: 16 bytes, TMA's minimum
  static constexpr int kAlignOut = 8;  // elements of 16 bits

  // Both operands K-major: A as [M, K] row-major, B stored [N, K] ("column-major" K x N).
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  // D is [rows, ldd] row-major; in the swapped product (weights x tokens) it is the transpose.
  using LayoutD = cute::conditional_t<kSwapAB, cutlass::layout::ColumnMajor, cutlass::layout::RowMajor>;

  // Scale granularity (M, N, K): 1x128 for tokens, 128x128 for weights; both K-major, which is
  // the per-token [rows, K/128] and weight_scale_inv [N/128, K/128] layouts as they are.
  using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<kSwapAB ? 128 : 1, kSwapAB ? 1 : 128, 128,
                                                                cute::GMMA::Major::K, cute::GMMA::Major::K>;
  using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
  using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc,
      void, LayoutD*, kAlignOut,  // no source C
      ElementOut, LayoutD*, kAlignOut, EpilogueSchedule_,
      cutlass::epilogue::fusion::LinearCombination<ElementOut, ElementAcc, void, ElementAcc>>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
      ElementIn, cute::tuple<LayoutA*, LayoutSFA*>, kAlignIn,
      ElementIn, cute::tuple<LayoutB*, LayoutSFB*>, kAlignIn,
      ElementAcc, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      KernelSchedule_>::CollectiveOp;

  using GemmKernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<GemmKernel>;

  using StrideA = typename GemmKernel::InternalStrideA;
  using StrideB = typename GemmKernel::InternalStrideB;
  using StrideD = typename GemmKernel::InternalStrideD;
  using StrideC = typename GemmKernel::StrideC;  // a pointer type; void C: never read
};

using ConfigTile128x128 = Config<Shape<_128, _128, _128>, Shape<_1, _2, _1>,
                                 cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise,
                                 cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative, false>;
using ConfigSwapAB128x32 = Config<Shape<_128, _32, _128>, Shape<_1, _1, _1>,
                                  cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpongFP8Blockwise,
                                  cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong, true>;

// Device-side arrays of one launch, carved out of the workspace (one entry per group).
template <class Cfg>
struct GroupArrays {
  UnderlyingProblem* problem;
  typename Cfg::ElementIn const** ptr_a;
  typename Cfg::ElementIn const** ptr_b;
  float const** ptr_sfa;
  float const** ptr_sfb;
  typename Cfg::ElementOut** ptr_d;
  typename Cfg::StrideA* stride_a;
  typename Cfg::StrideB* stride_b;
  typename Cfg::StrideD* stride_d;
  typename Cfg::LayoutSFA* layout_sfa;
  typename Cfg::LayoutSFB* layout_sfb;
  void* cutlass_workspace;
};

constexpr size_t kAlign = 256;

inline size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Lays the arrays out from `base` (nullptr: only measures). Returns the bytes used before the
// CUTLASS workspace, whose own size is added by the caller.
template <class Cfg>
size_t carve(char* base, int groups, GroupArrays<Cfg>* out) {
  size_t off = 0;
  auto take = [&](size_t bytes) {
    char* p = base ? base + off : nullptr;
    off = round_up(off + bytes, kAlign);
    return p;
  };
  size_t g = static_cast<size_t>(groups);
  GroupArrays<Cfg> a{};
  a.problem = reinterpret_cast<UnderlyingProblem*>(take(g * sizeof(UnderlyingProblem)));
  a.ptr_a = reinterpret_cast<typename Cfg::ElementIn const**>(take(g * sizeof(void*)));
  a.ptr_b = reinterpret_cast<typename Cfg::ElementIn const**>(take(g * sizeof(void*)));
  a.ptr_sfa = reinterpret_cast<float const**>(take(g * sizeof(void*)));
  a.ptr_sfb = reinterpret_cast<float const**>(take(g * sizeof(void*)));
  a.ptr_d = reinterpret_cast<typename Cfg::ElementOut**>(take(g * sizeof(void*)));
  a.stride_a = reinterpret_cast<typename Cfg::StrideA*>(take(g * sizeof(typename Cfg::StrideA)));
  a.stride_b = reinterpret_cast<typename Cfg::StrideB*>(take(g * sizeof(typename Cfg::StrideB)));
  a.stride_d = reinterpret_cast<typename Cfg::StrideD*>(take(g * sizeof(typename Cfg::StrideD)));
  a.layout_sfa = reinterpret_cast<typename Cfg::LayoutSFA*>(take(g * sizeof(typename Cfg::LayoutSFA)));
  a.layout_sfb = reinterpret_cast<typename Cfg::LayoutSFB*>(take(g * sizeof(typename Cfg::LayoutSFB)));
  a.cutlass_workspace = base ? base + off : nullptr;
  if (out) *out = a;
  return off;
}

struct Operands {
  uint8_t const* a;
  float const* a_scale;
  uint8_t const* b0;  // two weight stacks as two fields: an indexed array would go to local memory
  uint8_t const* b1;
  float const* b0_scale;
  float const* b1_scale;
  int32_t const* group_ends;
  int num_experts;
  int num_sets;
  int n;
  int k;
  int64_t ldd;
  uint16_t* d;  // bf16 bits
};

// One thread per group g = set * E + expert: the group's rows from group_ends, its problem
// size, operand and scale pointers and strides. The only data-dependent part of a launch.
template <class Cfg>
__global__ void setup_groups(Operands op, GroupArrays<Cfg> arrays) {
  int const g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= op.num_sets * op.num_experts) return;
  int const set = g / op.num_experts;
  int const e = g - set * op.num_experts;
  int const end = op.group_ends[e];
  int const start = e > 0 ? op.group_ends[e - 1] : 0;
  int const rows = end > start ? end - start : 0;
  int64_t const kb = (op.k + 127) / 128;
  int64_t const nb = (op.n + 127) / 128;

  auto const* act = reinterpret_cast<typename Cfg::ElementIn const*>(op.a + int64_t(start) * op.k);
  float const* act_scale = op.a_scale + int64_t(start) * kb;
  auto const* w = reinterpret_cast<typename Cfg::ElementIn const*>((set ? op.b1 : op.b0) + int64_t(e) * op.n * op.k);
  float const* w_scale = (set ? op.b1_scale : op.b0_scale) + int64_t(e) * nb * kb;
  auto* d = reinterpret_cast<typename Cfg::ElementOut*>(op.d + int64_t(start) * op.ldd + int64_t(set) * op.n);

  typename Cfg::StrideA stride_a{};
  typename Cfg::StrideB stride_b{};
  typename Cfg::StrideD stride_d{};
  get<0>(stride_a) = op.k;  // A and B: K-major, row stride K
  get<0>(stride_b) = op.k;
  UnderlyingProblem problem;
  if constexpr (Cfg::kSwapAB) {
    problem = UnderlyingProblem{op.n, rows, op.k};  // M = weight rows, N = tokens
    arrays.ptr_a[g] = w;
    arrays.ptr_sfa[g] = w_scale;
    arrays.ptr_b[g] = act;
    arrays.ptr_sfb[g] = act_scale;
    get<1>(stride_d) = op.ldd;  // D^T column-major: token stride ldd
  } else {
    problem = UnderlyingProblem{rows, op.n, op.k};
    arrays.ptr_a[g] = act;
    arrays.ptr_sfa[g] = act_scale;
    arrays.ptr_b[g] = w;
    arrays.ptr_sfb[g] = w_scale;
    get<0>(stride_d) = op.ldd;
  }
  arrays.problem[g] = problem;
  arrays.ptr_d[g] = d;
  arrays.stride_a[g] = stride_a;
  arrays.stride_b[g] = stride_b;
  arrays.stride_d[g] = stride_d;
  // (the grouped mainloop derives these again from the problem size; kept for completeness)
  arrays.layout_sfa[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFA(make_shape(get<0>(problem), get<1>(problem), op.k, 1));
  arrays.layout_sfb[g] = Cfg::ScaleConfig::tile_atom_to_shape_SFB(make_shape(get<0>(problem), get<1>(problem), op.k, 1));
}

template <class Cfg>
typename Cfg::Gemm::Arguments make_arguments(GroupArrays<Cfg> const& arrays, int groups, int sm_count, int device = 0) {
  cutlass::KernelHardwareInfo hw_info;
  hw_info.device_id = device;
  hw_info.sm_count = sm_count;
  typename Cfg::Gemm::Arguments args;
  args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
  args.problem_shape = ProblemShape{groups, arrays.problem, nullptr};  // sizes on the device only
  args.mainloop.ptr_A = arrays.ptr_a;
  args.mainloop.dA = arrays.stride_a;
  args.mainloop.ptr_B = arrays.ptr_b;
  args.mainloop.dB = arrays.stride_b;
  args.mainloop.ptr_SFA = arrays.ptr_sfa;
  args.mainloop.layout_SFA = arrays.layout_sfa;
  args.mainloop.ptr_SFB = arrays.ptr_sfb;
  args.mainloop.layout_SFB = arrays.layout_sfb;
  args.epilogue.thread.alpha = 1.0f;
  args.epilogue.thread.beta = 0.0f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.dC = nullptr;
  args.epilogue.ptr_D = arrays.ptr_d;
  args.epilogue.dD = arrays.stride_d;
  args.hw_info = hw_info;
  return args;
}

template <class Cfg>
size_t workspace_size(int groups, int sm_count) {
  GroupArrays<Cfg> arrays{};
  size_t const own = carve<Cfg>(nullptr, groups, &arrays);
  auto args = make_arguments<Cfg>(arrays, groups, sm_count);
  return own + round_up(Cfg::Gemm::get_workspace_size(args), kAlign);
}

thread_local std::string g_last_error;

int fail(int code, std::string message) {
  g_last_error = std::move(message);
  return code;
}

int cuda_fail(cudaError_t err, char const* where) {
  return fail(GLM5C_GG_ECUDA, std::string(where) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

template <class Cfg>
int run(Operands const& op, void* workspace, size_t workspace_bytes, int sm_count, int device, cudaStream_t stream) {
  int const groups = op.num_sets * op.num_experts;
  size_t const need = workspace_size<Cfg>(groups, sm_count);
  if (workspace_bytes < need) {
    return fail(GLM5C_GG_EWORKSPACE, "workspace has " + std::to_string(workspace_bytes) + " bytes, needs " +
                                         std::to_string(need));
  }
  GroupArrays<Cfg> arrays{};
  carve<Cfg>(static_cast<char*>(workspace), groups, &arrays);

  // This library has its own (static) CUDA runtime, whose current device is not the caller's.
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cuda_fail(err, "cudaSetDevice");
  // Clear an error left in this runtime by an earlier call, so that the check below is ours.
  (void)cudaGetLastError();
  int const threads = 128;
  setup_groups<Cfg><<<(groups + threads - 1) / threads, threads, 0, stream>>>(op, arrays);
  err = cudaGetLastError();
  if (err != cudaSuccess) return cuda_fail(err, "setup_groups launch");

  auto args = make_arguments<Cfg>(arrays, groups, sm_count, device);
  typename Cfg::Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) {
    return fail(GLM5C_GG_ECUTLASS, std::string("CUTLASS can_implement: ") + cutlassGetStatusString(status));
  }
  status = gemm.initialize(args, arrays.cutlass_workspace, stream);
  if (status != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return fail(GLM5C_GG_ECUTLASS, std::string("CUTLASS initialize: ") + cutlassGetStatusString(status) +
                                       (err != cudaSuccess ? std::string(" / ") + cudaGetErrorString(err) : ""));
  }
  status = gemm.run(stream);
  err = cudaGetLastError();
  if (status != cutlass::Status::kSuccess || err != cudaSuccess) {
    return fail(err != cudaSuccess ? GLM5C_GG_ECUDA : GLM5C_GG_ECUTLASS,
                std::string("CUTLASS run: ") + cutlassGetStatusString(status) +
                    (err != cudaSuccess ? std::string(" / ") + cudaGetErrorString(err) : ""));
  }
  return GLM5C_GG_OK;
}

bool aligned(void const* p, uintptr_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace glm5c

extern "C" {

int glm5c_gg_fp8_abi_version(void) { return GLM5C_GG_ABI_VERSION; }

// Number of kernel configurations; their names by index.
int glm5c_gg_fp8_num_configs(void) { return 2; }

char const* glm5c_gg_fp8_config_name(int config) {
  switch (config) {
    case 0: return "tile128x128_coop_cluster1x2";
    case 1: return "swapab_tile128x32_pingpong";
    default: return nullptr;
  }
}

// Dynamic shared memory of a configuration's GEMM kernel (bytes; -1 for an unknown config).
int glm5c_gg_fp8_shared_bytes(int config) {
  switch (config) {
    case 0: return glm5c::ConfigTile128x128::GemmKernel::SharedStorageSize;
    case 1: return glm5c::ConfigSwapAB128x32::GemmKernel::SharedStorageSize;
    default: return -1;
  }
}

char const* glm5c_gg_fp8_error_string(int code) {
  switch (code) {
    case GLM5C_GG_OK: return "ok";
    case GLM5C_GG_EINVAL: return "invalid argument";
    case GLM5C_GG_EWORKSPACE: return "workspace too small";
    case GLM5C_GG_ECUTLASS: return "CUTLASS refused the problem";
    case GLM5C_GG_ECUDA: return "CUDA error";
    default: return "unknown error";
  }
}

// Details of this thread's last failure (empty when none yet).
char const* glm5c_gg_fp8_last_error(void) { return glm5c::g_last_error.c_str(); }

// Bytes of device workspace a launch with `num_groups` (= sets * experts) groups needs on a GPU
// with `sm_count` SMs. Host arithmetic only: works without a GPU.
int glm5c_gg_fp8_workspace_size(int config, int num_groups, int sm_count, size_t* bytes) {
  if (!bytes || num_groups <= 0 || sm_count <= 0) {
    return glm5c::fail(GLM5C_GG_EINVAL, "workspace_size: need num_groups > 0, sm_count > 0 and a result pointer");
  }
  switch (config) {
    case 0: *bytes = glm5c::workspace_size<glm5c::ConfigTile128x128>(num_groups, sm_count); return GLM5C_GG_OK;
    case 1: *bytes = glm5c::workspace_size<glm5c::ConfigSwapAB128x32>(num_groups, sm_count); return GLM5C_GG_OK;
    default: return glm5c::fail(GLM5C_GG_EINVAL, "workspace_size: unknown config " + std::to_string(config));
  }
}

// The grouped GEMM (see the top of this file). b1 / b1_scale: a second weight stack (gate and up
// in one launch) or NULL; set s writes D columns [s*n, s*n + n). group_ends: int32 [num_experts]
// on the device. `device`: the CUDA device of all pointers and of `stream` (made current in this
// library's own runtime). Asynchronous on `stream`; returns 0 or an error code (then nothing was
// launched unless the code is GLM5C_GG_ECUDA from the GEMM launch itself).
int glm5c_gg_fp8_run(int config, void const* a, float const* a_scale, void const* b0, float const* b0_scale,
                     void const* b1, float const* b1_scale, int32_t const* group_ends, int num_experts, int n, int k,
                     void* d, int64_t ldd, void* workspace, size_t workspace_bytes, int sm_count, int device,
                     cudaStream_t stream) {
  using glm5c::aligned;
  using glm5c::fail;
  int const sets = b1 ? 2 : 1;
  if (num_experts <= 0 || n <= 0 || k <= 0 || sm_count <= 0 || device < 0) {
    return fail(GLM5C_GG_EINVAL, "need num_experts, n, k, sm_count > 0 and device >= 0");
  }
  if (k % 16 != 0) return fail(GLM5C_GG_EINVAL, "k must be a multiple of 16, got " + std::to_string(k));
  if (n % 8 != 0) return fail(GLM5C_GG_EINVAL, "n must be a multiple of 8, got " + std::to_string(n));
  if (ldd % 8 != 0 || ldd < int64_t(sets) * n) {
    return fail(GLM5C_GG_EINVAL, "ldd must be a multiple of 8 and >= sets * n, got " + std::to_string(ldd));
  }
  if (!a || !a_scale || !b0 || !b0_scale || !group_ends || !d || !workspace || (b1 && !b1_scale)) {
    return fail(GLM5C_GG_EINVAL, "null pointer argument");
  }
  if (!aligned(a, 16) || !aligned(b0, 16) || !aligned(d, 16) || (b1 && !aligned(b1, 16))) {
    return fail(GLM5C_GG_EINVAL, "a, b0, b1 and d must be 16-byte aligned");
  }
  if (!aligned(a_scale, 4) || !aligned(b0_scale, 4) || (b1 && !aligned(b1_scale, 4)) || !aligned(group_ends, 4) ||
      !aligned(workspace, glm5c::kAlign)) {
    return fail(GLM5C_GG_EINVAL, "scales and group_ends must be 4-byte aligned, the workspace 256-byte aligned");
  }
  glm5c::Operands op{static_cast<uint8_t const*>(a),
                     a_scale,
                     static_cast<uint8_t const*>(b0),
                     static_cast<uint8_t const*>(b1 ? b1 : b0),
                     b0_scale,
                     b1 ? b1_scale : b0_scale,
                     group_ends,
                     num_experts,
                     sets,
                     n,
                     k,
                     ldd,
                     static_cast<uint16_t*>(d)};
  switch (config) {
    case 0: return glm5c::run<glm5c::ConfigTile128x128>(op, workspace, workspace_bytes, sm_count, device, stream);
    case 1: return glm5c::run<glm5c::ConfigSwapAB128x32>(op, workspace, workspace_bytes, sm_count, device, stream);
    default: return fail(GLM5C_GG_EINVAL, "unknown config " + std::to_string(config));
  }
}

}  // extern "C"
