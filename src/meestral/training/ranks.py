"""Head training over several processes (torchrun): this process's place among them, and the
frozen backbone sharded over them with FSDP2 (see head_training's docstring for why and how)."""

from __future__ import annotations

import os

import torch


class Ranks:
    """This process's place among torchrun's processes (one process: rank 0 of 1, no group)."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        self.on = self.world > 1
        if self.on:
            if device.startswith("cuda"):
                self.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.on:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def any(self, flag: bool) -> bool:
        return any(self.gather(bool(flag)))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def close(self, wait: bool):
        """Leave the group; with `wait`, not before every rank is done (rank 0 may still be writing).
        After a failure there is no waiting: the other ranks may be stuck in a collective, and
        torchrun stops them once this process exits."""
        if self.on:
            import torch.distributed as dist

            if wait:
                dist.barrier()
            dist.destroy_process_group()


def load_device(spec: str, shard: bool, device: str) -> str:
    """Where this rank builds the backbone before any sharding.

    Sharded runs load into host memory (the point of FSDP is a backbone larger than one GPU),
    except `random:` backbones: their weights come from the generator of the device they are built
    on (CPU and CUDA draw different numbers from one seed), so they are built where a one-process
    run would build them, or the sharded run would train heads on a different backbone."""
    if not shard or str(spec).startswith("random:"):
        return device
    return "cpu"


def peak_memory_gib(device) -> tuple[float, str]:
    """(peak memory of this process so far in GiB, what was measured): on a GPU the caching
    allocator's peak of allocated tensors; on the CPU the peak resident set of the process (which
    includes the libraries, so only differences between runs mean much)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30, "cuda_max_allocated"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host_max_rss"  # KiB on Linux


def shard_backbone(backbone, device: str):
    """FSDP2 over the frozen backbone: every block its own shard group, then the rest of the model.
    Parameters move to `device` (fully_shard puts each rank's shard on its mesh's device)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (int(os.environ["WORLD_SIZE"]),))
    for block in backbone.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(backbone.model, mesh=mesh)
