"""Click-log data for the DLRM app: one in-memory layout, several readers."""

from .avazu import read_avazu
from .criteo import read_criteo_tsv
from .dataset import ClickData, DataError
from .synthetic import SyntheticConfig, make_synthetic

__all__ = ["ClickData", "DataError", "SyntheticConfig", "make_synthetic", "read_avazu", "read_criteo_tsv"]
