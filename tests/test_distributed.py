"""DDP and FSDP2 (per-layer fully_shard) on CPU with gloo, 2 processes on 127.0.0.1: the trained
parameters match a single-process run on the whole batch."""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nnfast

WORLD = 2
STEPS = 3

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo"
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        nnfast.FusedMLP(6, [16, 16], 8, activation="gelu"),
        nnfast.FusedDense(8, 4, activation="swiglu"),
    )


def _data() -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1))


def _train(model: torch.nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(STEPS):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _worker(rank: int, port: int, mode: str, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # collectives give up after a minute instead of hanging the test run
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        model = _model()
        shard = _data().chunk(WORLD)[rank]
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
            _train(wrapped, shard)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model[0].layers:  # per layer, as large models are sharded
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            _train(model, shard)
            state = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, out_path)
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown (thread pools, atexit handlers): a rank that
    # finished must not be able to hang at exit while the other waits for it.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_matches_single_process(mode, tmp_path):
    out = str(tmp_path / "state.pt")
    ctx = mp.start_processes(
        _worker, args=(_free_port(), mode, out), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{mode}: the {WORLD} processes did not finish within 180 s")
    got = torch.load(out)
    single = _model()
    _train(single, _data())
    want = single.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
