// The kernels of bf16_kernels.cpp as the CPU implementations of the custom ops that
// ops/cpu_linear.py, ops/moe_cpu.py and ops/dsa_cpu.py define (schemas and fakes live there, with
// a Python implementation through ctypes under CompositeExplicitAutograd, which this CPU one
// outranks): a compiled graph's call then reaches the kernel through the dispatcher with no Python
// on the way (~10 us a call less). ops/cpu_kernels.py builds it against the installed torch's
// headers and loads it with torch.ops.load_library; where that fails the Python path stays.

#include "bf16_kernels.cpp"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace {

const uint16_t* bf16_in(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.const_data_ptr()); }
uint16_t* bf16_out(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.mutable_data_ptr()); }

void check(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dims, op, ": ", name, " is ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device(), ", expected a ", dims, "-d ", dtype,
              " tensor on cpu");
}

at::Tensor linear_bf16_cpu(const at::Tensor& x_, const at::Tensor& weight_) {
  const char* op = "linear_bf16_cpu";
  const int64_t dims = weight_.dim();
  TORCH_CHECK(dims == 2 || dims == 3, op, ": weight ", weight_.sizes(), " is neither [out, in] nor [H, out, in]");
  check(op, "x", x_, at::kBFloat16, dims);
  check(op, "weight", weight_, at::kBFloat16, dims);
  const int64_t heads = dims == 3 ? weight_.size(0) : 1;
  TORCH_CHECK(x_.size(-1) == weight_.size(-1) && (dims == 2 || x_.size(1) == heads), op, ": x ", x_.sizes(),
              " does not fit weight ", weight_.sizes());
  // read in place when rows have adjacent elements, or the weight is a transpose stored row by row
  // (ops/cpu_linear.py: kernel_layout); else copied
  const at::Tensor x = x_.stride(-1) == 1 || x_.size(-1) == 1 ? x_ : x_.contiguous();
  const bool transposed = !(weight_.stride(-1) == 1 || weight_.size(-1) == 1) && weight_.stride(-2) == 1;
  const at::Tensor weight = transposed || weight_.stride(-1) == 1 || weight_.size(-1) == 1 ? weight_ : weight_.contiguous();
  const int64_t tokens = x.size(0), in = weight.size(-1), out_features = weight.size(-2);
  at::Tensor out = dims == 3 ? at::empty({tokens, heads, out_features}, x.options())
                             : at::empty({tokens, out_features}, x.options());
  int rc = glm5c_linear_bf16(bf16_in(x), bf16_in(weight), bf16_out(out), tokens, heads, in, out_features, x.stride(0),
                             dims == 3 ? x.stride(1) : 0, dims == 3 ? weight.stride(0) : 0,
                             weight.stride(transposed ? -1 : -2), transposed ? 1 : 0, at::get_num_threads());
  TORCH_CHECK(rc == 0, op, ": the kernel rejected its arguments (code ", rc, ")");
  return out;
}

// x [T, K] @ W^T for W blocked [N / 16, K / 2, 16, 2] -> [T, N], or per head x [T, H, K] with W
// [H, N / 16, K / 2, 16, 2] -> [T, H, N] (ops/cpu_kernels.py: block_weight).
at::Tensor linear_packed_cpu(const at::Tensor& x_, const at::Tensor& weight) {
  const char* op = "linear_packed_cpu";
  const int64_t dims = weight.dim();
  TORCH_CHECK(dims == 4 || dims == 5, op, ": weight ", weight.sizes(), " is neither [N / 16, K / 2, 16, 2] nor [H, N / 16, K / 2, 16, 2]");
  check(op, "x", x_, at::kBFloat16, dims - 2);
  check(op, "weight", weight, at::kBFloat16, dims);
  const int64_t heads = dims == 5 ? weight.size(0) : 1;
  TORCH_CHECK(weight.size(-2) == 16 && weight.size(-1) == 2 && x_.size(-1) == 2 * weight.size(-3) &&
                  (dims == 4 || x_.size(1) == heads) && weight.is_contiguous(),
              op, ": x ", x_.sizes(), " does not fit blocked weight ", weight.sizes(), " (contiguous)");
  const at::Tensor x = x_.stride(-1) == 1 || x_.size(-1) == 1 ? x_ : x_.contiguous();
  const int64_t tokens = x.size(0), out_features = weight.size(-4) * 16;
  at::Tensor out = dims == 5 ? at::empty({tokens, heads, out_features}, x.options())
                             : at::empty({tokens, out_features}, x.options());
  int rc = glm5c_linear_packed_bf16(bf16_in(x), bf16_in(weight), bf16_out(out), tokens, heads, x.size(-1), out_features,
                                    x.stride(0), dims == 5 ? x.stride(1) : 0, at::get_num_threads());
  TORCH_CHECK(rc == 0, op, ": the kernel rejected its arguments (code ", rc, ")");
  return out;
}

// x [T, K] through several blocked weights [N_i / 16, K / 2, 16, 2] at once -> [T, N_i] each.
std::vector<at::Tensor> linear_packed_multi_cpu(const at::Tensor& x_, at::TensorList weights) {
  const char* op = "linear_packed_multi_cpu";
  check(op, "x", x_, at::kBFloat16, 2);
  TORCH_CHECK(!weights.empty(), op, ": no weights");
  const at::Tensor x = x_.stride(-1) == 1 || x_.size(-1) == 1 ? x_ : x_.contiguous();
  std::vector<at::Tensor> outs;
  std::vector<const uint16_t*> ws;
  std::vector<uint16_t*> out_ptrs;
  std::vector<int64_t> out_features;
  for (const at::Tensor& w : weights) {
    check(op, "a weight", w, at::kBFloat16, 4);
    TORCH_CHECK(w.size(-2) == 16 && w.size(-1) == 2 && x.size(-1) == 2 * w.size(-3) && w.is_contiguous(), op, ": x ",
                x.sizes(), " does not fit blocked weight ", w.sizes(), " (contiguous)");
    outs.push_back(at::empty({x.size(0), w.size(0) * 16}, x.options()));
    ws.push_back(bf16_in(w));
    out_ptrs.push_back(bf16_out(outs.back()));
    out_features.push_back(w.size(0) * 16);
  }
  int rc = glm5c_linear_packed_multi_bf16(bf16_in(x), int64_t(ws.size()), ws.data(), out_ptrs.data(), out_features.data(),
                                          x.size(0), x.size(1), x.stride(0), at::get_num_threads());
  TORCH_CHECK(rc == 0, op, ": the kernel rejected its arguments (code ", rc, ")");
  return outs;
}

// moe_experts_cpu, and moe_experts_packed_cpu over blocked stacks (ops/cpu_kernels.py:
// block_weight): gate_proj, up_proj [E, I / 16, D / 2, 16, 2], down_proj [E, D / 16, I / 2, 16, 2];
// with `shared` (gate, up, down: one expert's blocked matrices, [I / 16, D / 2, 16, 2] and
// [D / 16, I / 2, 16, 2]) moe_experts_shared_packed_cpu: routed + shared in bf16.
at::Tensor experts(bool blocked, const at::Tensor& x_, const at::Tensor& ids_, const at::Tensor& weights_,
                   const at::Tensor& gate_, const at::Tensor& up_, const at::Tensor& down_, int64_t first_expert,
                   const at::Tensor* shared = nullptr) {
  const char* op = shared ? "moe_experts_shared_packed_cpu" : blocked ? "moe_experts_packed_cpu" : "moe_experts_cpu";
  const int64_t dims = blocked ? 5 : 3;
  check(op, "x", x_, at::kBFloat16, 2);
  check(op, "expert_ids", ids_, at::kLong, 2);
  check(op, "expert_weights", weights_, at::kFloat, 2);
  check(op, "gate_proj", gate_, at::kBFloat16, dims);
  check(op, "up_proj", up_, at::kBFloat16, dims);
  check(op, "down_proj", down_, at::kBFloat16, dims);
  const char* shared_names[3] = {"shared_gate", "shared_up", "shared_down"};
  for (int i = 0; shared && i < 3; ++i) check(op, shared_names[i], shared[i], at::kBFloat16, 4);
  const int64_t tokens = x_.size(0), hidden = x_.size(1), n = gate_.size(0), inter = gate_.size(1) * (blocked ? 16 : 1);
  const bool stacks_fit = blocked ? gate_.sizes() == at::IntArrayRef({n, inter / 16, hidden / 2, 16, 2}) &&
                                        down_.sizes() == at::IntArrayRef({n, hidden / 16, inter / 2, 16, 2}) &&
                                        hidden % 16 == 0
                                  : gate_.sizes() == at::IntArrayRef({n, inter, hidden}) &&
                                        down_.sizes() == at::IntArrayRef({n, hidden, inter});
  const bool shared_fits = !shared || (shared[0].sizes() == gate_.sizes().slice(1) &&
                                       shared[1].sizes() == gate_.sizes().slice(1) &&
                                       shared[2].sizes() == down_.sizes().slice(1));
  TORCH_CHECK(ids_.size(0) == tokens && weights_.sizes() == ids_.sizes() && up_.sizes() == gate_.sizes() && stacks_fit &&
                  shared_fits,
              op, ": shapes do not fit: x ", x_.sizes(), ", expert_ids ", ids_.sizes(), ", expert_weights ",
              weights_.sizes(), ", gate_proj ", gate_.sizes(), ", up_proj ", up_.sizes(), ", down_proj ",
              down_.sizes(), shared ? ", shared expert " : "", shared ? shared[0].sizes() : at::IntArrayRef(), " ",
              shared ? shared[1].sizes() : at::IntArrayRef(), " ", shared ? shared[2].sizes() : at::IntArrayRef());
  const at::Tensor x = x_.contiguous(), ids = ids_.contiguous(), w = weights_.contiguous();
  const at::Tensor gate = gate_.contiguous(), up = up_.contiguous(), down = down_.contiguous();
  at::Tensor s[3];
  for (int i = 0; shared && i < 3; ++i) s[i] = shared[i].contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const float* wt = w.const_data_ptr<float>();
  int rc = blocked ? glm5c_moe_experts_shared_packed_bf16(
                         bf16_in(x), id, wt, bf16_in(gate), bf16_in(up), bf16_in(down), shared ? bf16_in(s[0]) : nullptr,
                         shared ? bf16_in(s[1]) : nullptr, shared ? bf16_in(s[2]) : nullptr, bf16_out(out), tokens,
                         ids.size(1), hidden, inter, n, first_expert, at::get_num_threads())
                   : glm5c_moe_experts_bf16(bf16_in(x), id, wt, bf16_in(gate), bf16_in(up), bf16_in(down), bf16_out(out),
                                            tokens, ids.size(1), hidden, inter, n, first_expert, at::get_num_threads());
  TORCH_CHECK(rc == 0, op, ": the kernel rejected its arguments (code ", rc, ")");
  return out;
}

at::Tensor moe_experts_cpu(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights, const at::Tensor& gate,
                           const at::Tensor& up, const at::Tensor& down, int64_t first_expert) {
  return experts(false, x, ids, weights, gate, up, down, first_expert);
}

at::Tensor moe_experts_packed_cpu(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                                  const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                                  int64_t first_expert) {
  return experts(true, x, ids, weights, gate, up, down, first_expert);
}

at::Tensor moe_experts_shared_packed_cpu(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                                         const at::Tensor& gate, const at::Tensor& up, const at::Tensor& down,
                                         const at::Tensor& shared_gate, const at::Tensor& shared_up,
                                         const at::Tensor& shared_down, int64_t first_expert) {
  const at::Tensor shared[3] = {shared_gate, shared_up, shared_down};
  return experts(true, x, ids, weights, gate, up, down, first_expert, shared);
}

at::Tensor sparse_mla_cpu(const at::Tensor& q_, const at::Tensor& kv_, const at::Tensor& indices_,
                          const at::Tensor& tables_, const at::Tensor& seq_ids_, double softmax_scale, int64_t v_dim) {
  const char* op = "sparse_mla_cpu";
  check(op, "q", q_, at::kBFloat16, 3);
  check(op, "kv_cache", kv_, at::kBFloat16, 3);
  check(op, "indices", indices_, at::kInt, 2);
  check(op, "block_tables", tables_, at::kInt, 2);
  check(op, "seq_ids", seq_ids_, at::kLong, 1);
  const int64_t tokens = q_.size(0), heads = q_.size(1), dk = q_.size(2);
  TORCH_CHECK(kv_.size(2) == dk && indices_.size(0) == tokens && seq_ids_.size(0) == tokens && v_dim > 0 &&
                  v_dim <= dk,
              op, ": shapes do not fit: q ", q_.sizes(), ", kv_cache ", kv_.sizes(), ", indices ", indices_.sizes(),
              ", seq_ids ", seq_ids_.sizes(), ", v_dim ", v_dim);
  const at::Tensor q = q_.contiguous(), kv = kv_.contiguous(), indices = indices_.contiguous();
  const at::Tensor tables = tables_.contiguous(), seq_ids = seq_ids_.contiguous();
  at::Tensor out = at::empty({tokens, heads, v_dim}, q.options());
  int rc = glm5c_sparse_mla_bf16(bf16_in(q), bf16_in(kv), indices.const_data_ptr<int32_t>(),
                                 tables.const_data_ptr<int32_t>(), seq_ids.const_data_ptr<int64_t>(), bf16_out(out),
                                 tokens, heads, dk, v_dim, indices.size(1), kv.size(1), tables.size(0), tables.size(1),
                                 kv.size(0) * kv.size(1), float(softmax_scale), at::get_num_threads());
  TORCH_CHECK_INDEX(rc != 2, op, ": a selected position or its block lies outside the block table or the cache");
  TORCH_CHECK(rc == 0, op, ": the kernel rejected its arguments (code ", rc, ")");
  return out;
}

at::Tensor indexer_topk_cpu(const at::Tensor& q_, const at::Tensor& weights_, const at::Tensor& cache_,
                            const at::Tensor& tables_, const at::Tensor& seq_ids_, const at::Tensor& positions_,
                            int64_t topk) {
  const char* op = "indexer_topk_cpu";
  check(op, "q", q_, at::kFloat, 3);
  check(op, "weights", weights_, at::kFloat, 2);
  check(op, "index_cache", cache_, at::kBFloat16, 3);
  check(op, "block_tables", tables_, at::kInt, 2);
  check(op, "seq_ids", seq_ids_, at::kLong, 1);
  check(op, "positions", positions_, at::kLong, 1);
  const int64_t tokens = q_.size(0), heads = q_.size(1), dim = q_.size(2);
  TORCH_CHECK(weights_.size(0) == tokens && weights_.size(1) == heads && cache_.size(2) == dim &&
                  seq_ids_.size(0) == tokens && positions_.size(0) == tokens && topk > 0,
              op, ": shapes do not fit: q ", q_.sizes(), ", weights ", weights_.sizes(), ", index_cache ",
              cache_.sizes(), ", seq_ids ", seq_ids_.sizes(), ", positions ", positions_.sizes(), ", topk ", topk);
  const at::Tensor q = q_.contiguous(), weights = weights_.contiguous(), cache = cache_.contiguous();
  const at::Tensor tables = tables_.contiguous(), seq_ids = seq_ids_.contiguous(), positions = positions_.contiguous();
  at::Tensor out = at::empty({tokens, topk}, tables.options());
  int rc = glm5c_indexer_topk_bf16(q.const_data_ptr<float>(), weights.const_data_ptr<float>(), bf16_in(cache),
                                   tables.const_data_ptr<int32_t>(), seq_ids.const_data_ptr<int64_t>(),
                                   positions.const_data_ptr<int64_t>(), out.mutable_data_ptr<int32_t>(), tokens, heads,
                                   dim, topk, cache.size(1), tables.size(0), tables.size(1), cache.size(0) * cache.size(1),
                                   at::get_num_threads());
  TORCH_CHECK_INDEX(rc != 2, op, ": a position or its block lies outside the block table or the cache");
  TORCH_CHECK(rc == 0, op, ": the kernel rejected its arguments (code ", rc, ")");
  return out;
}

std::tuple<at::Tensor, at::Tensor> route_cpu(const at::Tensor& x_, const at::Tensor& gate_, const at::Tensor& bias_,
                                             int64_t top_k, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                                             double scaling_factor) {
  const char* op = "route_cpu";
  check(op, "x", x_, at::kBFloat16, 2);
  check(op, "gate_weight", gate_, at::kFloat, 2);
  check(op, "correction_bias", bias_, at::kFloat, 1);
  const int64_t tokens = x_.size(0), hidden = x_.size(1), n_experts = gate_.size(0);
  TORCH_CHECK(gate_.size(1) == hidden && bias_.size(0) == n_experts, op, ": shapes do not fit: x ", x_.sizes(),
              ", gate_weight ", gate_.sizes(), ", correction_bias ", bias_.sizes());
  const at::Tensor x = x_.contiguous(), gate = gate_.contiguous(), bias = bias_.contiguous();
  at::Tensor weights = at::empty({tokens, top_k}, gate.options());
  at::Tensor ids = at::empty({tokens, top_k}, gate.options().dtype(at::kLong));
  int rc = glm5c_route_bf16(bf16_in(x), gate.const_data_ptr<float>(), bias.const_data_ptr<float>(),
                            weights.mutable_data_ptr<float>(), ids.mutable_data_ptr<int64_t>(), tokens, hidden,
                            n_experts, top_k, n_group, topk_group, norm_topk_prob ? 1 : 0, float(scaling_factor),
                            at::get_num_threads());
  TORCH_CHECK(rc == 0, op, ": top_k ", top_k, ", n_group ", n_group, ", topk_group ", topk_group, " do not fit ",
              n_experts, " experts");
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm5c, CPU, m) {
  m.impl("indexer_topk_cpu", &indexer_topk_cpu);
  m.impl("linear_bf16_cpu", &linear_bf16_cpu);
  m.impl("linear_packed_cpu", &linear_packed_cpu);
  m.impl("linear_packed_multi_cpu", &linear_packed_multi_cpu);
  m.impl("moe_experts_cpu", &moe_experts_cpu);
  m.impl("moe_experts_packed_cpu", &moe_experts_packed_cpu);
  m.impl("moe_experts_shared_packed_cpu", &moe_experts_shared_packed_cpu);
  m.impl("route_cpu", &route_cpu);
  m.impl("sparse_mla_cpu", &sparse_mla_cpu);
}
