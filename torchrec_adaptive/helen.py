"""Helen: frequency-wise sharpness-aware minimization for embedding models (seeds/helen_*).

One step, as METHODS.md states it:

1. gradient at w (the fused kernels capture their touched rows' gradients and update nothing);
2. perturb: touched rows by eps_r = rho_r g_r / ||g_r|| with rho_r = rho max(c_r / max_t c, xi)
   (max over all shards of the table, c_r counting this batch), dense parameters by plain
   SAM eps = rho g / ||g|| (one norm over all dense gradients);
3. gradient at w + eps;
4. restore w exactly, then the base update: the kernels' own rule (Adam by default) for the
   embedding rows, ``dense_optimizer`` for the rest.

Two forward/backward passes per step. Embedding tables must run on torchrec_adaptive's
kernel (``DistributedModelParallel`` with ``torchrec_adaptive.sharders()``, or a
``AdaptiveTBE`` directly). Column-wise sharded tables would normalize
g_r per column shard, so they are refused.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .collectives import collective_device


class Helen:
    """Two-pass step wrapper.

    Args:
        model: the model (sharded or not) whose embedding kernels are ours.
        dense_optimizer: the base optimizer of the dense parameters (None: no dense parameters).
        rho: the perturbation radius (paper grid: 0.05, 0.01, 0.005, 0.001).
        xi: the floor of the frequency ratio (paper grid: 0, 0.5).

    Example::

        helen = Helen(model, torch.optim.Adam(dense_params, lr=1e-3), rho=0.01, xi=0.5)
        for batch in loader:
            loss = helen.step(lambda: loss_fn(model(batch.sparse), batch.label))
    """

    def __init__(self, model: nn.Module, dense_optimizer: torch.optim.Optimizer | None, rho: float = 0.05,
                 xi: float = 0.0) -> None:
        if not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be >= 0 and finite, got {rho}")
        if not 0.0 <= xi <= 1.0:
            raise ValueError(f"xi must be in [0, 1], got {xi}")
        self.model, self.dense_optimizer, self.rho, self.xi = model, dense_optimizer, float(rho), float(xi)
        from .distributed.shards import adaptive_kernels

        self.kernels = adaptive_kernels(model)
        if not self.kernels:
            raise ValueError("Helen found no torchrec_adaptive embedding kernel in the model; shard it with "
                             "torchrec_adaptive.sharders() and a torchrec_adaptive optimizer")
        split = [t.name for k in self.kernels for t in k.layout.tables if t.dim != (t.global_dim or t.dim)]
        if split:
            raise ValueError(f"Helen normalizes each row's gradient, which column-wise sharding splits: {split}")
        self.dense_params = [p for g in dense_optimizer.param_groups for p in g["params"]] if dense_optimizer else []
        self._names: list[str] | None = None  # every rank's table names (see _global_table_names)

    def _max_counts(self) -> dict[str, float]:
        """max c_r per table over every kernel and rank, counting this batch: one
        all_reduce(MAX) of a tensor when a process group runs (none in a single process)."""
        local: dict[str, float] = {}
        for k in self.kernels:
            for name, c in k.local_max_counts().items():
                local[name] = max(local.get(name, 0.0), c)
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return local
        names = self._global_table_names(local)
        peaks = torch.tensor([local.get(n, 0.0) for n in names], dtype=torch.float64, device=collective_device())
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
        return dict(zip(names, peaks.tolist()))

    def _global_table_names(self, local: dict[str, float]) -> list[str]:
        """Every rank's table names, in one order on all ranks: gathered once (the kernels,
        hence the names, are fixed for this Helen's life)."""
        if self._names is None:
            gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(local))
            self._names = sorted({n for g in gathered for n in (g or [])})
        return self._names

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """Runs both passes; ``closure`` computes the loss (forward only, no backward).
        Returns the loss at w (the first pass)."""
        for k in self.kernels:
            k.capture_next_backward()
        if self.dense_optimizer is not None:
            self.dense_optimizer.zero_grad()
        loss = closure()
        loss.backward()

        with torch.no_grad():
            peaks = self._max_counts()
            for k in self.kernels:
                k.perturb_captured(self.rho, self.xi, peaks)
            params = [p for p in self.dense_params if p.grad is not None]
            saved = [p.detach().clone() for p in params]
            if params and self.rho > 0:
                grads = [p.grad for p in params]
                # one norm over all dense gradients (PyTorch's public total-norm helper, foreach inside)
                norm = float(torch.nn.utils.get_total_norm(grads))
                if norm > 0:
                    for p, g in zip(params, grads):
                        p.add_(g, alpha=self.rho / norm)
        if self.dense_optimizer is not None:
            self.dense_optimizer.zero_grad()
        try:
            closure().backward()  # the kernels restore their rows, then apply their rule
        finally:
            for k in self.kernels:
                k.restore_perturbation()  # no-op unless the second backward failed
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
        if self.dense_optimizer is not None:
            self.dense_optimizer.step()
        return loss.detach()
