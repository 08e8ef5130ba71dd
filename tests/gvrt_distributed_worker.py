"""Two CPU processes (gloo) training with GVRT under DDP, FSDP2 and hand-sharded gradients.

Run by tests/test_gvrt.py: ``python tests/gvrt_distributed_worker.py OUT_DIR``. Each rank also
trains the same model on the whole batch in a single process (the reference) and writes both
runs' per-step statistics to ``OUT_DIR/rank{r}.json``.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from deepseek_rs.training.gvrt import GVRT, global_grad_norm
from torch import nn

WORLD = 2
STEPS = 24
SPIKE_STEP = 14


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)
    return (x * 300.0 if step == SPIKE_STEP else x), y


def train(net: nn.Module, opt: GVRT, rank: int, shard: bool):
    records = []
    for step in range(STEPS):
        x, y = batch(step)
        if shard:  # each rank its half of the batch; the gradient average is the full batch's
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        last = opt.last
        records.append([last.grad_norm, last.clip_threshold, last.lr_factor])
    return records


def full_params(net: nn.Module):
    return [
        (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().flatten().tolist()
        for p in net.parameters()
    ]


def run(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out = {}
    kwargs = dict(warmup_steps=5)

    # reference: one process, the whole batch
    ref = model()
    out["reference"] = train(
        ref, GVRT(torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9), **kwargs), 0, False
    )
    out["reference_params"] = full_params(ref)
    ref_adam = model()
    out["reference_adam"] = train(
        ref_adam, GVRT(torch.optim.AdamW(ref_adam.parameters(), lr=1e-2), **kwargs), 0, False
    )
    out["reference_adam_params"] = full_params(ref_adam)

    # DDP: gradients all-reduced before step(); GVRT needs no process group
    ddp = nn.parallel.DistributedDataParallel(model())
    out["ddp"] = train(
        ddp, GVRT(torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9), **kwargs), rank, True
    )
    out["ddp_params"] = full_params(ddp.module)

    # FSDP2: DTensor gradient shards, reduced over the mesh by the norm itself
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    fsdp = model()
    for layer in fsdp:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(fsdp, mesh=mesh)
    out["fsdp2"] = train(fsdp, GVRT(torch.optim.AdamW(fsdp.parameters(), lr=1e-2), **kwargs), rank, True)
    out["fsdp2_params"] = full_params(fsdp)

    # hand-sharded plain gradients (FSDP1 / ZeRO): each rank holds every other gradient
    grads = [torch.randn(5, 3, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    mine = grads[rank::WORLD]
    for p in (2.0, 1.0, float("inf")):
        out[f"sharded_norm_{p}"] = global_grad_norm(mine, p, process_group=dist.group.WORLD).item()
        out[f"full_norm_{p}"] = global_grad_norm(grads, p).item()

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = sys.argv[1]
    mp.spawn(run, args=(os.path.join(out_dir, "init"), out_dir), nprocs=WORLD)
