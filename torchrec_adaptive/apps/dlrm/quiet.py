"""A quiet console for the app: TorchRec's advice that does not apply to our use, filtered by message.

What came from how we call TorchRec is fixed at its source instead (the planner builds its
``Topology`` through ``TopologyFactory`` and reserves storage with
``FixedPercentageStorageReservation``, ``distributed/planner.py``). What remains is advice
about choices we make on purpose, repeated per table or per rank:

- ``Sharding Type is data_parallel, caching params will be ignored`` (torchrec.distributed.utils):
  once per replicated table and rank; our planner replicates small tables by design.
- ``Sharding spec not found for <table>`` (root logger, the planner's plan validation): a
  data_parallel table has no sharding spec, by TorchRec's own design.
- ``is_fx_tracing will return true for both ...`` (torch.fx): an API note for tracer authors.
- ``broadcast_buffers is deprecated`` (FutureWarning): TorchRec's own DDP wrapper passes it.
- torchmetrics' ``non-tuple sequence for multidimensional indexing`` (UserWarning): inside
  its gather.

Each filter matches one message and one logger or warning category; everything else,
errors included, still shows.
"""

from __future__ import annotations

import logging
import warnings

_LOG_FILTERS = {
    "torchrec.distributed.utils": ("Sharding Type is data_parallel, caching params will be ignored",),
    "": ("Sharding spec not found for ",),  # TorchRec logs this on the root logger
    "torch.fx._symbolic_trace": ("is_fx_tracing will return true",),
}
_WARNINGS = (
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    (UserWarning, r"Using a non-tuple sequence for multidimensional indexing is deprecated"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and str(record.msg).startswith(self.prefixes))


def quiet_console() -> None:
    """Installs the filters (idempotent)."""
    for name, prefixes in _LOG_FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
