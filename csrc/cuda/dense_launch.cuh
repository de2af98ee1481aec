// Host-side launch sequences of dense_bn_act_forward / dense_bn_act_backward: act(BN(cat(inputs, 1))) without the
// concatenation (docs/design.md section 3). Input j is a dense (N, C_j, S) tensor whose channels are the output's
// channels [channel_offset_j, channel_offset_j + C_j); every per-input step is one of the bn_act launch sequences
// of bn_act_launch.cuh on input j, with the per-channel arrays at the channel offset, the output y (forward) /
// grad_out (backward) addressed as a channel slice of the wider (N, C, S) tensor (pointer + element offset and a
// leading dimension) and the mask as input j's own segment. No ATen: dense.cu allocates, checks and calls these
// functions, and the emulator tests (tests/cuda_emu/emu_bn_act.cpp) call the same functions on host buffers.
//
// Launches per call, k inputs (each input is launched separately; a single launch over a pointer + channel-offset
// table would be the better GPU shape):
//   forward, training (batch statistics reduced here): 3 per input (reduce, stats finalize with input j's channels
//                                                      of the running statistics updated, elementwise)
//   forward, eval or precomputed batch statistics:     1 per input (elementwise; in eval from the running statistics,
//                                                      writing input j's channels of save_mean / save_invstd)
//   backward: per input with something to compute: [reduce,] [finalize,] [elementwise], at most 3
#pragma once

#include <cstdint>
#include <vector>

#include "bn_act_launch.cuh"

namespace fusedres {
namespace gpu {

// Launch shapes and offsets of one dense call; made on the host by dense_launch_config.
struct DenseLaunch {
  int64_t N = 0, S = 0, C = 0;
  bool channels_last = false;
  int64_t output_ld = 0;  // leading dimension of the output seen from one input: C * S (NCHW) or C (channels_last)
  std::vector<BnActLaunch> inputs;        // bn_act_launch_config of input j alone
  std::vector<int64_t> channel_offset;    // first output channel of input j
  std::vector<int64_t> output_offset;     // element offset of that channel's (0, 0) in the output
  std::vector<int64_t> mask_word_offset;  // first 32-bit word of input j's mask segment (0 without a mask)
  int64_t mask_words = 0;                 // all segments
  int64_t max_numel() const {
    int64_t m = 0;
    for (const BnActLaunch& L : inputs) m = max_i64(m, L.shape.numel);
    return m;
  }
};

// channels[j] = C_j; has_mask: the activation keeps a mask (segment j is math::mask_bytes(N * C_j * S) bytes).
// occ: as bn_act_launch_config's.
inline DenseLaunch dense_launch_config(int64_t N, int64_t S, const std::vector<int64_t>& channels, bool channels_last,
                                       bool has_mask, int num_sms, const BnActOccupancy& occ) {
  DenseLaunch D;
  D.N = N;
  D.S = S;
  D.channels_last = channels_last;
  for (const int64_t c : channels) D.C += c;
  D.output_ld = channels_last ? D.C : D.C * S;
  int64_t channel = 0, word = 0;
  for (const int64_t c : channels) {
    D.inputs.push_back(bn_act_launch_config(N, c, S, channels_last, has_mask, num_sms, occ));
    D.channel_offset.push_back(channel);
    D.output_offset.push_back(channels_last ? channel : channel * S);
    D.mask_word_offset.push_back(word);
    channel += c;
    if (has_mask) word += math::mask_bytes(N * c * S) / 4;
  }
  D.mask_words = word;
  return D;
}

// Workspace of either dense sequence, in acc_t elements: the largest per-input workspace (the inputs run one after
// another on one stream, so they share it).
inline int64_t dense_forward_workspace_elems(const DenseLaunch& D, bool training) {
  int64_t w = 0;
  for (const BnActLaunch& L : D.inputs) w = max_i64(w, bn_act_forward_workspace_elems(L, training));
  return w;
}
inline int64_t dense_backward_workspace_elems(const DenseLaunch& D, bool need_sums) {
  int64_t w = 0;
  for (const BnActLaunch& L : D.inputs) w = max_i64(w, bn_act_backward_workspace_elems(L, need_sums));
  return w;
}

template <typename scalar_t, typename acc_t>
struct DenseForwardBuffers {
  const scalar_t* const* x;  // x[j]: input j, dense (N, C_j, S) in D's layout
  const acc_t* weight;       // [C]
  const acc_t* bias;         // [C]
  acc_t* save_mean;          // [C]: written when reducing or normalising with the running statistics (eval); else
                             // the statistics to use (read)
  acc_t* save_invstd;        // [C]: as save_mean
  acc_t* var;                // [C] biased batch variance, written when reducing (may be nullptr otherwise)
  scalar_t* y;               // the output, dense (N, C, S) in D's layout
  uint32_t* mask;            // D.mask_words words (all segments written), or nullptr without a mask
  acc_t* workspace;          // dense_forward_workspace_elems(D, reduce), uninitialised
  // Running statistics [C] (both or neither): updated when reducing, normalised with in eval (reduce false and
  // running statistics given); absent with precomputed batch statistics, whose running update stays with the caller.
  StatVector running_mean = {nullptr, kStatFloat};
  StatVector running_var = {nullptr, kStatFloat};
  double momentum = 0;
};

// reduce: batch statistics of every input (training without precomputed statistics); otherwise the given
// save_mean / save_invstd are used (eval, or training with the batch statistics of the concatenation given).
// Inputs without elements are skipped (their mask segment is left to the caller). Requires a non-empty output.
template <typename scalar_t, typename acc_t>
void dense_forward_launch(const DenseLaunch& D, const DenseForwardBuffers<scalar_t, acc_t>& b, bool reduce, acc_t eps,
                          int act, acc_t negative_slope, cudaStream_t stream) {
  for (size_t j = 0; j < D.inputs.size(); ++j) {
    const BnActLaunch& L = D.inputs[j];
    if (L.shape.numel == 0) continue;
    const int64_t c0 = D.channel_offset[j];
    const BnActForwardBuffers<scalar_t, acc_t> in{b.x[j],
                                                  nullptr,
                                                  b.weight + c0,
                                                  b.bias + c0,
                                                  b.save_mean + c0,
                                                  b.save_invstd + c0,
                                                  reduce ? b.var + c0 : nullptr,
                                                  b.y + D.output_offset[j],
                                                  D.output_ld,
                                                  b.mask != nullptr ? b.mask + D.mask_word_offset[j] : nullptr,
                                                  b.workspace,
                                                  b.running_mean.offset(c0),
                                                  b.running_var.offset(c0),
                                                  b.momentum};
    bn_act_forward_launch(L, in, reduce, eps, act, negative_slope, stream);
  }
}

template <typename scalar_t, typename acc_t>
struct DenseBackwardBuffers {
  const scalar_t* grad_out;  // dense (N, C, S) in D's layout
  const scalar_t* const* x;  // x[j]: input j, dense (N, C_j, S)
  const uint32_t* mask;      // the forward's mask (all segments), or nullptr without a mask
  const acc_t* mean;         // [C] save_mean
  const acc_t* invstd;       // [C] save_invstd
  const acc_t* weight;       // [C]
  scalar_t* const* grad_input;  // grad_input[j]: dense like x[j], or nullptr: not requested
  acc_t* sum_dz;             // [C] (grad_bias in acc_t), or nullptr: parameter gradients not requested and the
  acc_t* sum_dz_xhat;        // [C] (grad_weight)       sums needed by no input (then both are nullptr)
  acc_t* workspace;          // dense_backward_workspace_elems(D, sum_dz != nullptr), uninitialised
};

// Per input: the bn_act backward sequence with grad_out read as a channel slice. want_params: the weight / bias
// gradients are wanted (the sums of every input are then computed). Requires a non-empty grad_out.
template <typename scalar_t, typename acc_t>
void dense_backward_launch(const DenseLaunch& D, const DenseBackwardBuffers<scalar_t, acc_t>& b, bool training,
                           bool want_params, int act, acc_t negative_slope, cudaStream_t stream) {
  for (size_t j = 0; j < D.inputs.size(); ++j) {
    const BnActLaunch& L = D.inputs[j];
    if (L.shape.numel == 0) continue;
    const bool want_input = b.grad_input[j] != nullptr;
    const bool need_sums = want_params || (training && want_input);
    if (!need_sums && !want_input) continue;
    const int64_t c0 = D.channel_offset[j];
    const BnActBackwardBuffers<scalar_t, acc_t> in{b.grad_out + D.output_offset[j],
                                                   D.output_ld,
                                                   b.x[j],
                                                   b.mask != nullptr ? b.mask + D.mask_word_offset[j] : nullptr,
                                                   b.mean + c0,
                                                   b.invstd + c0,
                                                   b.weight + c0,
                                                   b.grad_input[j],
                                                   nullptr,
                                                   need_sums ? b.sum_dz + c0 : nullptr,
                                                   need_sums ? b.sum_dz_xhat + c0 : nullptr,
                                                   b.workspace};
    bn_act_backward_launch(L, in, training, act, negative_slope, stream);
  }
}

}  // namespace gpu
}  // namespace fusedres
