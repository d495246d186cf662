"""A multi-rank torch.distributed.checkpoint, made and resumed on CPU, for the multi-node tests.

    python tests/dcp_ranks.py save DIR WORLD   # WORLD gloo ranks train one step, dcp.save DIR;
                                               # prints the next step's loss (rank 0)
    python tests/dcp_ranks.py load DIR         # one process, a fresh model and optimizer:
                                               # dcp.load DIR, print the next step's loss

Every rank holds the same small model (seeded), so DCP spreads the replicated tensors over
the ranks' ``__<rank>_0.distcp`` files and rank 0 writes ``.metadata`` last, as a data-parallel
job does. Equal losses mean the restored checkpoint resumes training exactly.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save


def trainer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01)


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 16, generator=g)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    opt.step()
    return float(loss.item())


def _rank(rank: int, world: int, out: str, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, opt = trainer()
    for s in range(3):
        step(model, opt, s)
    msd, osd = get_state_dict(model, opt)
    dcp_save({"model": msd, "optim": osd}, checkpoint_id=out)
    dist.barrier()
    if rank == 0:
        print(json.dumps({"next_loss": step(model, opt, 100)}))
    dist.destroy_process_group()


def save(out: str, world: int) -> None:
    import socket

    from torch.multiprocessing.spawn import spawn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn(  # type: ignore[no-untyped-call]
        _rank, args=(world, out, port), nprocs=world, join=True
    )


def load(path: str) -> None:
    model, opt = trainer()
    msd, osd = get_state_dict(model, opt)
    dcp_load({"model": msd, "optim": osd}, checkpoint_id=path)  # loads in place
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    print(json.dumps({"next_loss": step(model, opt, 100)}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    if sys.argv[1] == "save":
        save(sys.argv[2], int(sys.argv[3]))
    else:
        load(sys.argv[2])
