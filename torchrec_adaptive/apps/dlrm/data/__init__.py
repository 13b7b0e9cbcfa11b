"""Click-log data for the DLRM app: readers of raw logs (chunks), the Parquet training format,
its converter, and the streaming, rank-sharded input."""

from .format import Chunk, DataError, DatasetMeta
from .synthetic import SyntheticConfig, write_synthetic

__all__ = ["Chunk", "DataError", "DatasetMeta", "SyntheticConfig", "write_synthetic"]
