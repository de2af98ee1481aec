"""2-process gloo training step: fused SyncBatchNormAct2d vs PyTorch's SyncBatchNorm pattern + separate add/ReLU.

Run: ``python benchmarks/bench_sync_bn.py [--model resnet20] [--batch 32] [--size 32] [--rounds 15]``
(``pytest benchmarks/bench_sync_bn.py`` runs a short version and checks the collective counts).

Both models are the same network with the same weights, each wrapped in DistributedDataParallel over a gloo
group of 2 spawned processes (1 torch thread each); one step = forward, cross-entropy, backward, SGD step.

* ``fused``: ``fusedres.nn.convert_sync_batchnorm(model)``: every BatchNorm is a SyncBatchNormAct2d
  (bn_stats -> 1 all_gather -> bn_act_elemt with the residual add and ReLU fused; backward
  bn_act_backward_reduce -> 1 all_reduce -> bn_act_backward_elemt).
* ``pytorch``: PyTorch's nn.SyncBatchNorm cannot run on CPU (its kernels batch_norm_stats,
  batch_norm_gather_stats_with_counts, batch_norm_elemt, batch_norm_backward_reduce and batch_norm_backward_elemt
  are CUDA-only), so the baseline is ``torch/nn/modules/_functions.py``'s SyncBatchNorm autograd Function — the
  same collectives (1 all_gather of [mean, invstd, count] per layer forward, 1 all_reduce of [sum_dy, sum_dy_xmu]
  backward) and the same math — with those five kernels written as eager ATen CPU ops (torch.var_mean; the
  normalisation is F.batch_norm in eval form with the global statistics, ATen's vectorised CPU kernel), followed
  by a separate ``+ residual`` and ``relu``, as a model converted with ``nn.SyncBatchNorm.convert_sync_batchnorm``
  runs them.

Reported: median step time (rank 0, after a barrier) of each, the median of per-round ratios with the rounds
alternating which model goes first (CONVENTIONS.md), and the number of torch.distributed collective calls the
BatchNorm layers make per step (DDP's own gradient all-reduces are the same for both and are not counted).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


import fusedres
from fusedres.nn import SyncBatchNormAct2d, convert_sync_batchnorm


class _PyTorchSyncBN(torch.autograd.Function):
    """torch.nn.modules._functions.SyncBatchNorm with its CUDA-only kernels as eager CPU ops (same collectives)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, momentum, process_group, world_size):
        C = input.shape[1]
        dims = [0, *range(2, input.dim())]
        count = input.numel() // C
        if count > 0:
            var, mean = torch.var_mean(input, dim=dims, correction=0)  # batch_norm_stats
            combined = torch.cat([mean, (var + eps).rsqrt(), input.new_full((1,), count)])
        else:
            combined = input.new_zeros(2 * C + 1)
        rows = [torch.empty_like(combined) for _ in range(world_size)]
        dist.all_gather(rows, combined, process_group)
        mean_all, invstd_all, count_all = torch.stack(rows).split([C, C, 1], dim=1)
        # batch_norm_gather_stats_with_counts
        n = count_all.sum()
        mean = (mean_all * count_all).sum(0) / n
        var = ((invstd_all.pow(-2) - eps + (mean_all - mean).square()) * count_all).sum(0) / n
        invstd = (var + eps).rsqrt()
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
            running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.count = n
        ctx.process_group = process_group
        # batch_norm_elemt: ATen's CPU batch norm in eval form with the global statistics
        return F.batch_norm(input, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (input.dim() - 2)
        dims = [0, *range(2, input.dim())]
        xmu = input - mean.view(shape)
        sum_dy = grad_output.sum(dims)  # batch_norm_backward_reduce
        sum_dy_xmu = (grad_output * xmu).sum(dims)
        grad_weight = sum_dy_xmu * invstd
        grad_bias = sum_dy
        combined = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(combined, group=ctx.process_group)
        sum_dy, sum_dy_xmu = combined.split(input.shape[1])
        # batch_norm_backward_elemt
        w = weight.view(shape) if weight is not None else 1.0
        inv = invstd.view(shape)
        grad_input = (
            (grad_output - (sum_dy / ctx.count).view(shape) - xmu * inv * inv * (sum_dy_xmu / ctx.count).view(shape))
            * inv
            * w
        )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class PyTorchPatternSyncBNAct(SyncBatchNormAct2d):
    """The baseline layer: PyTorch's SyncBatchNorm algorithm, then a separate residual add and activation."""

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
        if self.training:
            self.num_batches_tracked.add_(1)
            pg = self.process_group or dist.group.WORLD
            z = _PyTorchSyncBN.apply(
                input,
                self.weight,
                self.bias,
                self.running_mean,
                self.running_var,
                self.eps,
                factor,
                pg,
                dist.get_world_size(pg),
            )
        else:
            z = F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self._act(z, residual)


def build_models(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    fused = convert_sync_batchnorm(fusedres.models.get_model(name, num_classes=10))
    baseline = copy.deepcopy(fused)
    for m in baseline.modules():
        if isinstance(m, SyncBatchNormAct2d):
            m.__class__ = PyTorchPatternSyncBNAct
    return fused, baseline


def _worker(rank: int, world_size: int, init_file: str, args: argparse.Namespace, results) -> None:
    from _dist_utils import count_collectives

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        models = dict(zip(("fused", "pytorch"), build_models(args.model), strict=True))
        ddp = {k: fusedres.nn.DistributedDataParallel(m) for k, m in models.items()}
        opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in ddp.items()}
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        # One layer alone: BN + residual + ReLU forward and backward on a resnet20 stage-1 sized tensor.
        layers = {"fused": SyncBatchNormAct2d(16), "pytorch": PyTorchPatternSyncBNAct(16)}
        lx = torch.randn(args.batch, 16, args.size, args.size, generator=g, requires_grad=True)
        lr = torch.randn(args.batch, 16, args.size, args.size, generator=g, requires_grad=True)
        lgo = torch.randn(args.batch, 16, args.size, args.size, generator=g)

        def model_step(k: str) -> None:
            opts[k].zero_grad(set_to_none=True)
            F.cross_entropy(ddp[k](x), y).backward()
            opts[k].step()

        def layer_step(k: str) -> None:
            torch.autograd.grad(layers[k](lx, lr), (lx, lr, layers[k].weight, layers[k].bias), lgo)

        def timed(fn, k: str) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            fn(k)
            return time.perf_counter() - t0

        out = {}
        for what, fn in (("step", model_step), ("layer", layer_step)):
            counts = {}
            for k in ("fused", "pytorch"):
                with count_collectives() as c:
                    timed(fn, k)
                c["barrier"] -= 1  # the timing barrier
                counts[k] = {name: n for name, n in c.items() if n}
            for _ in range(args.warmup):
                for k in ("fused", "pytorch"):
                    timed(fn, k)
            times: dict[str, list[float]] = {"fused": [], "pytorch": []}
            for r in range(args.rounds):
                for k in ("fused", "pytorch") if r % 2 == 0 else ("pytorch", "fused"):
                    times[k].append(timed(fn, k))
            out[what] = {"times": times, "counts": counts}
        out["layers"] = sum(isinstance(m, SyncBatchNormAct2d) for m in models["fused"].modules())
        results.put((rank, out))
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(r, 2, init_file, args, results), daemon=True) for r in range(2)]
        try:
            for p in procs:
                p.start()
            out = dict(results.get(timeout=args.timeout) for _ in procs)
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
    return out[0]


def report(res: dict, args: argparse.Namespace) -> str:
    lines = [
        f"bench_sync_bn: {args.model}, 2 gloo processes x 1 thread, batch {args.batch}/rank, "
        + f"{args.size}x{args.size}, float32, {res['layers']} BatchNorm layers, torch {torch.__version__}"
    ]
    labels = {
        "step": "training step (DDP fwd + bwd + SGD)",
        "layer": f"one layer, BN + residual + ReLU fwd+bwd, {args.batch}x16x{args.size}x{args.size}",
    }
    for what, label in labels.items():
        t, counts = res[what]["times"], res[what]["counts"]
        ratios = sorted(b / a for a, b in zip(t["fused"], t["pytorch"], strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        fused, pytorch = (statistics.median(t[k]) * 1e3 for k in ("fused", "pytorch"))
        lines += [
            f"  {label}",
            f"    fused   (SyncBatchNormAct2d)                  {fused:8.2f} ms  collectives {counts['fused']}",
            f"    pytorch (SyncBatchNorm pattern + add + relu) {pytorch:8.2f} ms  collectives {counts['pytorch']}",
            f"    pytorch/fused {statistics.median(ratios):.2f}x [IQR {q[0]:.2f}-{q[2]:.2f}] over {len(ratios)} rounds",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=32, help="samples per rank")
    p.add_argument("--size", type=int, default=32, help="image height and width")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--timeout", type=float, default=600)
    return p.parse_args(argv)


def test_bench_sync_bn() -> None:
    """Short run: the fused layers make no more collective calls than PyTorch's pattern (2 per layer)."""
    args = parse_args(["--batch", "4", "--size", "16", "--warmup", "1", "--rounds", "2", "--timeout", "300"])
    res = run(args)
    print(report(res, args))
    n = res["layers"]
    assert res["step"]["counts"]["fused"] == {"all_gather": n, "all_reduce": n}
    assert res["step"]["counts"]["pytorch"] == {"all_gather": n, "all_reduce": n}
    assert res["layer"]["counts"]["fused"] == res["layer"]["counts"]["pytorch"] == {"all_gather": 1, "all_reduce": 1}


if __name__ == "__main__":
    a = parse_args()
    print(report(run(a), a))
