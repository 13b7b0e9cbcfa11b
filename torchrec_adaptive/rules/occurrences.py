"""Occurrence counts for unsharded tables: what the fused kernel sees and a dense gradient hides.

The fused kernel reads c_r from the lookups themselves (duplicates in a batch
counted, METHODS.md). An unsharded ``nn.EmbeddingBag`` -- the tables of TorchRec's
unsharded ``EmbeddingBagCollection`` -- hands its optimizer a *dense* gradient,
from which only "row r got some gradient" can be read: FAL's multiplier and every
count would then differ between the unsharded and the sharded model trained with
the same ``apply_optimizer_in_backward`` config. So the unsharded optimizer needs
the IDs of the step, and this module records them; the user does nothing extra.

How (every piece is a public torch hook):

1. An :class:`~torchrec_adaptive.rules.optimizers.AdaptiveRowOptimizer` calls
   :func:`track` for each table it updates. A parameter does not know its module
   and ``apply_optimizer_in_backward`` hands the optimizer parameters only, so the
   parameter goes on a (weak) *pending* list and one process-wide forward hook
   (``torch.nn.modules.module.register_module_forward_hook``) is installed.
2. That hook ignores every module but ``nn.EmbeddingBag``; when an
   ``nn.EmbeddingBag``'s ``weight`` is pending, it records that call and installs
   a forward hook on that module alone. Once nothing is pending the global hook
   removes itself. Tables built on the meta device (TorchRec's way to shard without
   materializing) are not tracked; a materialized table that is sharded instead is
   never called, so its entry stays pending until its parameter is freed (meanwhile
   every module call runs through torch's hook path and one ``isinstance`` check).
3. The per-module hook attaches the call's IDs to the *gradient* of its output
   (``Tensor.register_hook``): IDs count only for forwards that are trained on.
   Evaluation (``torch.no_grad``, or an output never backpropagated) counts nothing.
4. ``step()`` calls :func:`take`: the unique rows and their occurrences since the
   previous step. Autograd runs the output's gradient hooks before the lookup's
   backward, hence before ``apply_optimizer_in_backward``'s step hook.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from torch.utils.weak import WeakIdKeyDictionary

_pending: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> True, module not found yet
_ids: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> [ID tensors] since the last take()
_bound: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> its module's RemovableHandle
_global_hook: RemovableHandle | None = None


def track(weight: Tensor) -> None:
    """Count the occurrences of ``weight``'s rows from the lookups of the ``nn.EmbeddingBag`` holding it."""
    global _global_hook
    if weight in _bound or weight in _pending:
        return
    _pending[weight] = True
    if _global_hook is None:
        _global_hook = nn.modules.module.register_module_forward_hook(_discover, with_kwargs=True)


def take(weight: Tensor) -> tuple[Tensor, Tensor] | None:
    """Sorted unique rows and their occurrence counts (int64) recorded since the last call,
    or None when no lookup of ``weight`` was seen (the parameter is not an ``nn.EmbeddingBag``'s)."""
    if weight not in _bound:
        return None
    chunks = _ids.pop(weight, [])
    ids = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long, device=weight.device)
    rows, counts = torch.unique(ids, sorted=True, return_counts=True)
    return rows, counts


def discard(weight: Tensor) -> None:
    """Forget the IDs recorded for ``weight`` (its gradient was dropped without a step)."""
    _ids.pop(weight, None)


def _lookup_ids(module: nn.EmbeddingBag, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """The IDs this call looked up, as ``nn.EmbeddingBag`` does (``padding_idx`` entries excluded)."""
    ids = kwargs["input"] if "input" in kwargs else args[0]
    ids = ids.reshape(-1).long()
    if module.padding_idx is not None:
        ids = ids[ids != module.padding_idx]
    return ids


def _record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    """Per-module forward hook: the IDs count when the output's gradient arrives."""
    if not isinstance(output, Tensor) or not output.requires_grad:
        return  # no_grad or frozen weights: nothing will be trained on this call
    weight = module.weight
    if weight not in _bound:
        return  # the module's weight was replaced by a parameter no optimizer of ours holds
    ids = _lookup_ids(module, args, kwargs)  # type: ignore[arg-type]

    def on_grad(_: Tensor) -> None:
        _ids.setdefault(weight, []).append(ids)

    output.register_hook(on_grad)


def _discover(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    """Global forward hook: binds a pending weight to the ``nn.EmbeddingBag`` that looks it up."""
    global _global_hook
    if isinstance(module, nn.EmbeddingBag) and module.weight in _pending:
        weight = module.weight
        del _pending[weight]
        _bound[weight] = module.register_forward_hook(_record, with_kwargs=True)
        _record(module, args, kwargs, output)  # this call ran before the module's own hook existed
    if not _pending and _global_hook is not None:
        _global_hook.remove()
        _global_hook = None
