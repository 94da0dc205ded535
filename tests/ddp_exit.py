"""A torchrun worker for tests/test_ddp.py: a run that ends while a gloo worker thread is still
releasing the last collective's tensor, late on purpose (the tensor's __del__ takes 0.4 s, the GIL
released all the while), so that the exit's race is lost every time instead of now and then.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_exit.py --ending=done

--ending=done: the run ends as a stage does (common.teardown_ddp, then cli.run_main's exit), rank 0
working --alone seconds longer than the others, and each rank prints when it reached the teardown
and when it left it. --ending=error: every rank stops with a UserError (a non-finite loss does that),
which skips the teardown.
"""
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cli  # noqa: E402
import common  # noqa: E402


class SlowToFree(torch.Tensor):
    def __del__(self):
        for _ in range(200):
            time.sleep(0.002)


@dataclasses.dataclass
class Config:
    ending: str = "done"  # done: the teardown, as a stage ends; error: a UserError on every rank
    alone: float = 0.0  # seconds rank 0 works alone before its teardown (as after training)


def main(cfg):
    rank, _, _ = common.setup_ddp("cpu")
    DDP(torch.nn.Linear(2, 2))  # as every stage does: the process group then outlives its destruction
    dist.all_reduce(torch.zeros(1).as_subclass(SlowToFree), async_op=True)  # no handle kept: the worker frees it
    time.sleep(0.2)  # the all-reduce is done, its worker thread inside __del__
    if cfg.ending == "error":
        raise cli.UserError(f"rank {rank} stopped on purpose")
    if rank == 0:
        time.sleep(cfg.alone)
    print(f"rank {rank} reached the teardown at {time.time():.6f}", flush=True)
    common.teardown_ddp()
    print(f"rank {rank} left at {time.time():.6f}", flush=True)


if __name__ == "__main__":
    cli.run_main(main, Config)
