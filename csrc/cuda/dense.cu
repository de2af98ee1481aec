// CUDA launchers of dense_bn_act_forward / dense_bn_act_backward: act(BN(cat(inputs, 1))) without building the
// concatenation. Checks and the geometry of the virtual concatenation come from the host helpers shared with the
// CPU backend (dense_host.cpp), outputs and statistics follow cpu/dense.cpp, and the launch sequences (the bn_act
// sequences once per input, on channel slices of the output / grad_out) from dense_launch.cuh, shared with the
// emulator tests.
#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "dense.h"
#include "cuda/launcher_common.h"
#include "cuda/dense_launch.cuh"
#include "cuda/bn_act_occupancy.h"

namespace fusedres {
namespace {

std::vector<int64_t> wide_sizes(const at::Tensor& x0, int64_t C) {
  std::vector<int64_t> sizes(x0.sizes().begin(), x0.sizes().end());
  sizes[1] = C;
  return sizes;
}

// forward: sized for the forward's kernels, else the backward's (the dense ops take no SiLU).
gpu::DenseLaunch launch_config(const DenseGeom& g, bool has_mask, at::ScalarType dtype, bool forward) {
  return gpu::dense_launch_config(g.N, g.S, g.channels, g.channels_last, has_mask,
                                  at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                  forward ? bn_act_forward_occupancy(dtype, g.channels_last)
                                          : bn_act_backward_occupancy(dtype, g.channels_last, false));
}

template <typename kscalar_t, typename scalar_t>
std::vector<const kscalar_t*> input_pointers(const std::vector<at::Tensor>& xs) {
  std::vector<const kscalar_t*> p;
  p.reserve(xs.size());
  for (const at::Tensor& x : xs) p.push_back(reinterpret_cast<const kscalar_t*>(x.const_data_ptr<scalar_t>()));
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dense_bn_act_forward_cuda(
    at::TensorList inputs, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const std::optional<at::Tensor>& batch_mean, const std::optional<at::Tensor>& batch_var, bool training,
    double momentum, double eps, c10::string_view activation, double negative_slope) {
  const int act = parse_basic_activation(activation, "dense_bn_act_forward");
  const DenseGeom g = check_dense_forward(inputs, weight, bias, running_mean, running_var, batch_mean, batch_var,
                                          training, momentum, eps, act);
  const at::Tensor& x0 = inputs[0];
  const c10::cuda::CUDAGuard device_guard(x0.device());
  const at::ScalarType acc = bn_act_acc_type(x0.scalar_type());
  const auto acc_opts = x0.options().dtype(acc);
  const bool given = batch_mean.has_value() && batch_mean->defined();
  const bool has_mask = math::act_has_mask(act);
  const bool reduce_here = training && !given;
  at::Tensor y = at::empty(wide_sizes(x0, g.C), x0.options().memory_format(g.format));
  TORCH_INTERNAL_ASSERT(y.is_contiguous(g.format));

  // The same statistics as the CPU backend returns. Contiguous running statistics are updated (training) or read
  // (eval: save_mean / save_invstd written from them) by the kernels; with precomputed batch statistics the update
  // stays with the host helper (no kernel reduces there).
  const bool device_running = !given && running_stats_on_device(running_mean, running_var);
  at::Tensor mean, invstd, var;
  if (training && given) {
    // Precomputed statistics (a copy: outputs never alias inputs); invstd computed in double as the CPU does.
    mean = batch_mean->clone();
    var = *batch_var;
    invstd = batch_var->to(at::kDouble).add(eps).rsqrt().to(acc);
  } else if (training) {
    mean = y.numel() == 0 ? at::zeros({g.C}, acc_opts) : at::empty({g.C}, acc_opts);
    invstd = y.numel() == 0 ? at::zeros({g.C}, acc_opts) : at::empty({g.C}, acc_opts);
    var = y.numel() == 0 ? at::zeros({g.C}, acc_opts) : at::empty({g.C}, acc_opts);
  } else if (device_running && y.numel() > 0) {
    mean = at::empty({g.C}, acc_opts);
    invstd = at::empty({g.C}, acc_opts);
  } else {
    std::tie(mean, invstd) = bn_act_eval_stats(*running_mean, *running_var, eps, acc);
  }
  const std::vector<at::Tensor> xs = dense_inputs(inputs, g);
  // The elementwise kernels write every word of a non-empty input's segment; an input without elements (no
  // channels) has a segment of its own (the spare word) that no kernel touches, so then the mask is zeroed.
  const bool some_input_empty = std::any_of(xs.begin(), xs.end(), [](const at::Tensor& x) { return x.numel() == 0; });
  const auto mask_opts = x0.options().dtype(at::kByte);
  if (y.numel() == 0) return {y, mean, invstd, at::zeros({g.mask_offsets.back()}, mask_opts)};
  at::Tensor mask = some_input_empty ? at::zeros({g.mask_offsets.back()}, mask_opts)
                                     : at::empty({g.mask_offsets.back()}, mask_opts);

  for (const at::Tensor& x : xs) TORCH_INTERNAL_ASSERT(x.is_contiguous(g.format));
  const std::pair<at::Tensor, at::Tensor> params = bn_act_params(weight, bias, g.C, acc, x0.device());
  const gpu::DenseLaunch D = launch_config(g, has_mask, x0.scalar_type(), true);
  TORCH_INTERNAL_ASSERT(D.mask_words * 4 == g.mask_offsets.back() && D.output_ld == g.output_ld());
  const at::Tensor m = mean.contiguous(), is = invstd.contiguous();
  at::Tensor workspace = at::empty({gpu::dense_forward_workspace_elems(D, reduce_here)}, acc_opts);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  FUSEDRES_DISPATCH_FLOATING(x0.scalar_type(), "dense_bn_act_forward_cuda", [&] {
    TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == acc);
    const std::vector<const kscalar_t*> x_ptrs = input_pointers<kscalar_t, scalar_t>(xs);
    const gpu::DenseForwardBuffers<kscalar_t, acc_t> buffers{
        x_ptrs.data(),
        params.first.const_data_ptr<acc_t>(),
        params.second.const_data_ptr<acc_t>(),
        // Read only unless reducing (then m / is are the freshly allocated mean / invstd themselves).
        const_cast<acc_t*>(m.const_data_ptr<acc_t>()),
        const_cast<acc_t*>(is.const_data_ptr<acc_t>()),
        reduce_here ? var.mutable_data_ptr<acc_t>() : nullptr,
        reinterpret_cast<kscalar_t*>(y.mutable_data_ptr<scalar_t>()),
        has_mask ? reinterpret_cast<uint32_t*>(mask.mutable_data_ptr<uint8_t>()) : nullptr,
        workspace.mutable_data_ptr<acc_t>(),
        stat_vector(running_mean, device_running),
        stat_vector(running_var, device_running),
        momentum};
    gpu::dense_forward_launch(D, buffers, reduce_here, static_cast<acc_t>(eps), act,
                              static_cast<acc_t>(negative_slope), stream);
  });

  // Precomputed batch statistics or non-contiguous running statistics only: ATen ops on the same stream, so
  // ordered after the kernels.
  if (training && !device_running) bn_act_update_running_stats(running_mean, running_var, mean, var, g.M(), momentum);
  return {y, mean, invstd, mask};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> dense_bn_act_backward_cuda(
    const at::Tensor& grad_out, at::TensorList inputs, const std::optional<at::Tensor>& weight,
    const at::Tensor& save_mean, const at::Tensor& save_invstd, const at::Tensor& mask, bool training,
    c10::string_view activation, double negative_slope, c10::List<bool> input_mask_list,
    std::array<bool, 2> param_mask) {
  const int act = parse_basic_activation(activation, "dense_bn_act_backward");
  const std::vector<bool> input_mask(input_mask_list.begin(), input_mask_list.end());
  const DenseGeom g = check_dense_backward(grad_out, inputs, weight, save_mean, save_invstd, mask, act, input_mask);
  const at::Tensor& x0 = inputs[0];
  const c10::cuda::CUDAGuard device_guard(x0.device());
  const at::ScalarType acc = bn_act_acc_type(x0.scalar_type());
  const auto acc_opts = x0.options().dtype(acc);
  const bool want_weight = param_mask[0], want_bias = param_mask[1];
  const bool has_w = weight.has_value() && weight->defined();
  const bool want_any_input = std::find(input_mask.begin(), input_mask.end(), true) != input_mask.end();
  const bool any_sums = want_weight || want_bias || (training && want_any_input);
  // Zeros: channels of inputs that are skipped (no elements) keep sums of 0, as on the CPU.
  at::Tensor sum_dz = at::zeros({any_sums ? g.C : 0}, acc_opts);
  at::Tensor sum_dz_xhat = at::zeros({any_sums ? g.C : 0}, acc_opts);
  std::vector<at::Tensor> grads;
  grads.reserve(inputs.size());
  for (size_t j = 0; j < inputs.size(); ++j) {
    grads.push_back(input_mask[j] ? at::empty(inputs[j].sizes(), x0.options().memory_format(g.format))
                                  : bn_act_empty_like_none(x0));
  }

  if (grad_out.numel() > 0 && (any_sums || want_any_input)) {
    const std::vector<at::Tensor> xs = dense_inputs(inputs, g);
    const at::Tensor dy = grad_out.contiguous(g.format);
    TORCH_INTERNAL_ASSERT(dy.is_contiguous(g.format));
    for (size_t j = 0; j < xs.size(); ++j) {
      TORCH_INTERNAL_ASSERT(xs[j].is_contiguous(g.format) && (!input_mask[j] || grads[j].is_contiguous(g.format)));
    }
    const at::Tensor mean = save_mean.contiguous(), invstd = save_invstd.contiguous();
    const at::Tensor w = bn_act_params(weight, std::nullopt, g.C, acc, x0.device()).first;
    const bool has_mask = math::act_has_mask(act);
    // 32-bit words: contiguous and 4-byte aligned (segments start at word offsets).
    at::Tensor mask_words = mask.contiguous();
    if (has_mask && reinterpret_cast<uintptr_t>(mask_words.const_data_ptr()) % alignof(uint32_t) != 0) {
      mask_words = mask_words.clone();
    }
    const gpu::DenseLaunch D = launch_config(g, has_mask, x0.scalar_type(), false);
    TORCH_INTERNAL_ASSERT(D.mask_words * 4 == g.mask_offsets.back() && D.output_ld == g.output_ld());
    at::Tensor workspace = at::empty({gpu::dense_backward_workspace_elems(D, any_sums)}, acc_opts);
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

    FUSEDRES_DISPATCH_FLOATING(x0.scalar_type(), "dense_bn_act_backward_cuda", [&] {
      TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<acc_t>::value == acc);
      const std::vector<const kscalar_t*> x_ptrs = input_pointers<kscalar_t, scalar_t>(xs);
      std::vector<kscalar_t*> grad_ptrs;
      for (size_t j = 0; j < xs.size(); ++j) {
        grad_ptrs.push_back(input_mask[j] ? reinterpret_cast<kscalar_t*>(grads[j].mutable_data_ptr<scalar_t>())
                                          : nullptr);
      }
      const gpu::DenseBackwardBuffers<kscalar_t, acc_t> buffers{
          reinterpret_cast<const kscalar_t*>(dy.const_data_ptr<scalar_t>()),
          x_ptrs.data(),
          has_mask ? reinterpret_cast<const uint32_t*>(mask_words.const_data_ptr<uint8_t>()) : nullptr,
          mean.const_data_ptr<acc_t>(),
          invstd.const_data_ptr<acc_t>(),
          w.const_data_ptr<acc_t>(),
          grad_ptrs.data(),
          any_sums ? sum_dz.mutable_data_ptr<acc_t>() : nullptr,
          any_sums ? sum_dz_xhat.mutable_data_ptr<acc_t>() : nullptr,
          workspace.mutable_data_ptr<acc_t>()};
      gpu::dense_backward_launch(D, buffers, training, want_weight || want_bias, act,
                                 static_cast<acc_t>(negative_slope), stream);
    });
  }

  const at::ScalarType param_dtype = has_w ? weight->scalar_type() : acc;
  at::Tensor grad_weight = want_weight ? sum_dz_xhat.to(param_dtype) : at::empty({0}, acc_opts);
  at::Tensor grad_bias = want_bias ? sum_dz.to(param_dtype) : at::empty({0}, acc_opts);
  return {grads, grad_weight, grad_bias};
}

}  // namespace
}  // namespace fusedres

TORCH_LIBRARY_IMPL(fusedres, CUDA, m) {
  m.impl("dense_bn_act_forward", &fusedres::dense_bn_act_forward_cuda);
  m.impl("dense_bn_act_backward", &fusedres::dense_bn_act_backward_cuda);
}
