"""Which device a process group's collectives take their tensors on.

NCCL reduces only CUDA tensors (a CPU tensor fails at the call), gloo takes CPU tensors
(and CUDA ones only for some collectives), so code that reduces host-made numbers
(row statistics, ID counts, a loss) builds or moves them to this device first. PyTorch
keeps the same decision private (``distributed_c10d._get_pg_default_device``); this is
the public-API equivalent: the backend's name, and the rank's current GPU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """This rank's current GPU when ``group`` (default: the world) runs NCCL, else the CPU;
    the CPU too when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized() and "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
