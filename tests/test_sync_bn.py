"""Synchronised BatchNorm + residual + activation (fusedres.nn.SyncBatchNormAct2d) over gloo processes.

The oracle (docs/design.md section 7): PyTorch's nn.SyncBatchNorm refuses CPU tensors, so every rank also runs a
single-process BatchNormAct2d over the concatenated global batch (all ranks draw the same global batch from
the same seed and take their slice) and compares outputs, input and residual gradients, local and summed
weight/bias gradients, running statistics and the number of collective calls. Each scenario runs in freshly
spawned processes (tests/_dist_utils.py): bounded in time, killed and joined even on failure.
"""

from __future__ import annotations

import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from _dist_utils import DistributedPool, count_collectives
from torch import nn

import fusedres
from fusedres.nn import BatchNormAct2d, SyncBatchNormAct2d, convert_sync_batchnorm

pytestmark = pytest.mark.needs_native

TOL = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    # bfloat16 tensors (parameters float32, as under autocast): the same global statistics merged in another
    # order may round an output or gradient element to the neighbouring bfloat16 value (2**-8 relative).
    torch.bfloat16: {"rtol": 2**-7, "atol": 2**-7},
}
# Whole float64 networks (20 BatchNorms, some over 4 values per channel, which amplifies rounding differences of
# the different summation orders): still 7 orders of magnitude below float32's resolution.
MODEL_TOL = {"rtol": 1e-8, "atol": 1e-9}
THIS = os.path.splitext(os.path.basename(__file__))[0]


def _close(actual, expected, tol: dict, what: str) -> None:
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _fused_norms(model: nn.Module) -> list[tuple[str, str]]:
    """(name, activation) of every fused BatchNorm (single-process or synchronised) of ``model``."""
    return [
        (name, m.activation)
        for name, m in model.named_modules()
        if isinstance(m, (fusedres.nn.BatchNormAct1d, BatchNormAct2d, fusedres.nn.BatchNormAct3d, SyncBatchNormAct2d))
    ]


# --------------------------------------------------------------------------------------------------------------
# Scenarios: run on every rank by run_distributed (module-level so that spawned processes can import them).
# --------------------------------------------------------------------------------------------------------------


def _global_batch(step: int, N: int, C: int, dtype: torch.dtype, channels_last: bool):
    g = torch.Generator().manual_seed(1000 + step)
    shape = (N, C, 3, 4)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 2).to(dtype)  # a mean far from 0
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    go = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, r, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, r, go))
    return x, r, go


def scenario_layer(rank: int, world_size: int, cases: list[dict]) -> list[dict]:
    """SyncBatchNormAct2d on this rank's slice vs BatchNormAct2d on the global batch, several steps per case."""
    counts_seen = []
    for case in cases:
        dtype = case["dtype"]
        tol = TOL[dtype]
        C = 5
        kw = {
            "activation": case["activation"],
            "momentum": case.get("momentum", 0.1),
            "affine": case.get("affine", True),
        }
        param_dtype = case.get("param_dtype", dtype)
        ref = BatchNormAct2d(C, **kw).to(param_dtype)
        if kw["affine"]:
            with torch.no_grad():
                g = torch.Generator().manual_seed(7)
                ref.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
                ref.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        sync = SyncBatchNormAct2d(C, **kw).to(param_dtype)
        sync.load_state_dict(ref.state_dict())
        for step, sizes in enumerate(case["sizes"]):
            lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
            x, r, go = _global_batch(step, sum(sizes), C, dtype, case["channels_last"])
            res = case["residual"]
            # Oracle: the global batch in one process; and the local parameter gradients (grad_out zero outside
            # this rank's slice), which is what PyTorch's SyncBatchNorm returns before DDP reduces them.
            local_ref = copy.deepcopy(ref)
            xr = x.clone().requires_grad_()
            rr = r.clone().requires_grad_() if res else None
            out_ref = ref(xr, rr)
            out_ref.backward(go)
            go_local = torch.zeros_like(go)
            go_local[lo:hi] = go[lo:hi]
            local_ref(x.clone().requires_grad_(), r if res else None).backward(go_local)

            xl = x[lo:hi].clone().requires_grad_()
            rl = r[lo:hi].clone().requires_grad_() if res else None
            sync.zero_grad(set_to_none=True)
            with count_collectives() as counts:
                out = sync(xl, rl)
                out.backward(go[lo:hi])
            counts_seen.append(dict(counts))
            assert dict(counts) == {"all_gather": 1, "all_reduce": 1}, f"collectives per fwd+bwd: {dict(counts)}"

            where = f"case {case}, step {step}, rank {rank}"
            _close(out, out_ref[lo:hi], tol, f"output, {where}")
            if case["channels_last"] and hi > lo:
                assert out.is_contiguous(memory_format=torch.channels_last), where
            _close(xl.grad, xr.grad[lo:hi], tol, f"grad input, {where}")
            if res:
                _close(rl.grad, rr.grad[lo:hi], tol, f"grad res, {where}")
            if kw["affine"]:
                for name in ("weight", "bias"):
                    got = getattr(sync, name).grad
                    _close(got, getattr(local_ref, name).grad, tol, f"local grad {name}, {where}")
                    total = got.clone()
                    dist.all_reduce(total)
                    _close(total, getattr(ref, name).grad, tol, f"summed grad {name}, {where}")
            ref.zero_grad(set_to_none=True)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                _close(getattr(sync, name), getattr(ref, name), tol, f"{name}, {where}")
        # Eval mode uses the (identical) running statistics, no collective.
        sync.eval()
        ref.eval()
        x, r, _ = _global_batch(99, 4, C, dtype, case["channels_last"])
        with count_collectives() as counts:
            out = sync(x, r if case["residual"] else None)
        assert not counts, f"eval mode made collective calls: {dict(counts)}"
        torch.testing.assert_close(out, ref(x, r if case["residual"] else None), **tol)
        # Double backward is refused (after a first backward that took part in the collectives as usual).
        sync = copy.deepcopy(sync).train()
        xl = _global_batch(0, 4, C, dtype, False)[0].requires_grad_()
        (gx,) = torch.autograd.grad(sync(xl).sum(), xl, create_graph=True)
        with pytest.raises(RuntimeError, match="does not support double backward"):
            gx.sum().backward()
    return counts_seen


def scenario_resnet18(rank: int, world_size: int, per_rank: int, fused: bool) -> int:
    """convert_sync_batchnorm on resnet18 with torchvision's weights: fusedres's fused resnet18 (every fusion
    kept) or torchvision's own (plain BatchNorms become identity SyncBatchNormAct2d); global-batch match."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    if fused:
        fused_model = fusedres.models.resnet18(num_classes=10)
        fused_model.load_state_dict(model.state_dict())
        model = fused_model
    model = model.double()
    fused_before = _fused_norms(model)
    ref = copy.deepcopy(model)
    sync = convert_sync_batchnorm(model)
    converted = [(name, m.activation) for name, m in sync.named_modules() if isinstance(m, SyncBatchNormAct2d)]
    if fused:
        assert converted == fused_before and len(converted) == 20
    else:
        names = [name for name, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]
        assert converted == [(name, "identity") for name in names] and len(names) == 20
    assert not any(type(m) in (nn.BatchNorm2d, BatchNormAct2d) for m in sync.modules())
    residual_calls = []
    for m in sync.modules():
        if isinstance(m, SyncBatchNormAct2d):
            m.register_forward_pre_hook(lambda mod, args: residual_calls.append(len(args) > 1 and args[1] is not None))

    g = torch.Generator().manual_seed(3)
    N = per_rank * world_size
    x = torch.randn(N, 3, 16, 16, generator=g, dtype=torch.float64)
    target = torch.randint(0, 10, (N,), generator=g)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    out_ref = ref(x)
    F.cross_entropy(out_ref, target, reduction="sum").backward()
    with count_collectives() as counts:
        out = sync(x[lo:hi])
        F.cross_entropy(out, target[lo:hi], reduction="sum").backward()
    n_layers = len(converted)
    assert dict(counts) == {"all_gather": n_layers, "all_reduce": n_layers}, dict(counts)
    # fused: each of the 8 BasicBlocks' last BN adds the shortcut.
    assert sum(residual_calls) == (8 if fused else 0), f"{sum(residual_calls)} SyncBN calls with a residual"
    tol = MODEL_TOL
    torch.testing.assert_close(out, out_ref[lo:hi].detach(), **tol)
    # The losses are sums, so the ranks' parameter gradients add up to the global batch's.
    for (name, p), p_ref in zip(sync.named_parameters(), ref.parameters(), strict=True):
        grad = p.grad.clone()
        dist.all_reduce(grad)
        _close(grad, p_ref.grad, tol, f"grad of {name}")
    for name, b in ref.named_buffers():
        _close(sync.get_buffer(name), b, tol, name)
    return n_layers


def scenario_ddp(rank: int, world_size: int, per_rank: int, steps: int) -> None:
    """DDP + convert_sync_batchnorm training of resnet20 equals single-process training on the global batch."""
    # torch's DDP refuses every nn.SyncBatchNorm in a CPU module; ours only those that would run PyTorch's kernel.
    with pytest.raises(ValueError, match="only work with GPU modules"):
        fusedres.nn.DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4)))
    with pytest.raises(ValueError, match="expected input tensor to be on GPU"):  # fused=False is PyTorch's
        SyncBatchNormAct2d(4, fused=False)(torch.randn(2, 4, 3, 3))
    torch.manual_seed(0)
    base = fusedres.models.get_model("resnet20", num_classes=10).double()
    ref = copy.deepcopy(base)
    model = fusedres.nn.DistributedDataParallel(convert_sync_batchnorm(copy.deepcopy(base)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    for step in range(steps):
        g = torch.Generator().manual_seed(50 + step)
        x = torch.randn(per_rank * world_size, 3, 8, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 10, (per_rank * world_size,), generator=g)
        opt_ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()  # mean over the global batch
        opt_ref.step()
        opt.zero_grad()
        F.cross_entropy(model(x[lo:hi]), y[lo:hi]).backward()  # mean over the local batch; DDP averages
        opt.step()
    tol = MODEL_TOL
    got = dict(model.module.state_dict())
    for name, value in ref.state_dict().items():
        _close(got[name], value, tol, f"{name} after {steps} steps")


def scenario_fail_on_rank0(rank: int, world_size: int) -> None:
    """Rank 0 fails while the others wait in a collective that will never complete."""
    if rank == 0:
        raise ValueError("rank 0 fails on purpose")
    dist.barrier()


# --------------------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------------------


def _cases(sizes: list[list[int]]) -> list[dict]:
    f64, f32 = torch.float64, torch.float32
    return [
        {"dtype": f64, "channels_last": False, "activation": "relu", "residual": True, "sizes": sizes},
        {
            "dtype": f64,
            "channels_last": True,
            "activation": "leaky_relu",
            "residual": False,
            "sizes": sizes,
            "momentum": None,
        },
        {
            "dtype": f64,
            "channels_last": False,
            "activation": "identity",
            "residual": True,
            "sizes": sizes,
            "affine": False,
        },
        {"dtype": f32, "channels_last": True, "activation": "relu", "residual": True, "sizes": sizes},
        {"dtype": f32, "channels_last": False, "activation": "leaky_relu", "residual": True, "sizes": sizes},
        {
            "dtype": torch.bfloat16,
            "param_dtype": f32,
            "channels_last": False,
            "activation": "relu",
            "residual": True,
            "sizes": sizes,
        },
    ]


@pytest.fixture(scope="module")
def pool2(tmp_path_factory):
    pool = DistributedPool(2, tmp_path_factory.mktemp("gloo2"))
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def pool3(tmp_path_factory):
    pool = DistributedPool(3, tmp_path_factory.mktemp("gloo3"))
    yield pool
    pool.close()


def test_two_ranks_match_global_batch(pool2):
    counts = pool2.run(f"{THIS}:scenario_layer", cases=_cases([[3, 3], [2, 4]]))
    assert all(c == {"all_gather": 1, "all_reduce": 1} for per_rank in counts for c in per_rank)


def test_three_ranks_uneven_and_empty_batches(pool3):
    # Uneven local batches, a rank with one sample, then a rank with an empty batch (count 0 in the merge).
    pool3.run(f"{THIS}:scenario_layer", cases=_cases([[3, 1, 2], [2, 0, 3], [0, 4, 1]]))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torchvision"])
def test_convert_resnet18_keeps_fusions(pool2, fused):
    # 20 BatchNorms in resnet18 (stem, 2 per BasicBlock, 3 downsamples), all synchronised.
    assert pool2.run(f"{THIS}:scenario_resnet18", per_rank=2, fused=fused) == [20, 20]


def test_ddp_training_matches_single_process(pool2):
    pool2.run(f"{THIS}:scenario_ddp", per_rank=3, steps=3)


def test_failing_rank_ends_the_group_at_once(pool2):
    # Last of the pool2 tests: it kills the pool's processes.
    procs = list(pool2.procs)
    assert procs and all(p.is_alive() for p in procs)
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 0 fails on purpose"):
        pool2.run(f"{THIS}:scenario_fail_on_rank0")
    # Not the collective timeout: the blocked rank is killed as soon as rank 0's failure arrives.
    assert time.monotonic() - start < 30
    assert all(p.exitcode is not None for p in procs) and not pool2.procs


# --------------------------------------------------------------------------------------------------------------
# Single process (no process group): the module is BatchNormAct2d; the converter.
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [True, False])
def test_without_process_group_equals_batchnormact(fused):
    assert not dist.is_initialized()
    torch.manual_seed(0)
    ref = BatchNormAct2d(6, activation="leaky_relu", negative_slope=0.2)
    sync = SyncBatchNormAct2d(6, activation="leaky_relu", negative_slope=0.2, fused=fused)
    sync.load_state_dict(ref.state_dict())
    assert sync.state_dict().keys() == ref.state_dict().keys()
    for train in (True, False):
        ref.train(train)
        sync.train(train)
        x = torch.randn(4, 6, 5, 5, dtype=torch.float32) * 2 + 1
        r = torch.randn_like(x)
        torch.testing.assert_close(sync(x, r), ref(x, r), rtol=1e-5, atol=1e-5)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(sync.get_buffer(name), buf)


def test_convert_sync_batchnorm_preserves_state():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3, momentum=None),
        nn.Sequential(nn.BatchNorm1d(4, affine=False)),
        BatchNormAct2d(4, track_running_stats=False).double(),
    )
    model[1].weight.requires_grad_(False)
    model[2].eval()
    with torch.no_grad():
        model[1].running_mean.add_(1.5)
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    keys = list(model.state_dict().keys())
    out = convert_sync_batchnorm(model, process_group=None)
    assert out is model
    assert [type(m) for m in model] == [
        nn.Conv2d,
        SyncBatchNormAct2d,
        SyncBatchNormAct2d,
        nn.Sequential,
        SyncBatchNormAct2d,
    ]
    assert isinstance(model[1], nn.SyncBatchNorm)
    assert (model[1].activation, model[2].activation, model[3][0].activation, model[4].activation) == (
        "identity",
        "leaky_relu",
        "identity",
        "relu",
    )
    assert model[2].negative_slope == 0.3 and model[2].momentum is None and not model[2].training
    assert model[1].training and not model[1].weight.requires_grad
    assert model[3][0].weight is None and model[4].running_mean is None and model[4].weight.dtype == torch.float64
    assert list(model.state_dict().keys()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    single = convert_sync_batchnorm(BatchNormAct2d(3, activation="identity"))
    assert isinstance(single, SyncBatchNormAct2d) and single.activation == "identity"
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        convert_sync_batchnorm("model")


def test_errors():
    with pytest.raises(ValueError, match="activation must be one of"):
        SyncBatchNormAct2d(4, activation="gelu")
    with pytest.raises(ValueError, match="expected 2D to 5D input"):
        SyncBatchNormAct2d(4)(torch.randn(2, 4, 1, 1, 1, 1))
