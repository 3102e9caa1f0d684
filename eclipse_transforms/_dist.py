"""torch.distributed, when a multi-process job (torchrun) has set it up: which rank this process is."""

from __future__ import annotations

__all__ = ["ranks"]


def ranks() -> tuple[int, int] | None:
    """``(rank, world_size)`` of torch.distributed's default process group in a job of two or more processes;
    ``None`` otherwise (one process, or no process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None
