"""The app's typed configuration and its strict YAML loader.

A run is described by one YAML file (``configs/<dataset>/<method>.yaml``). A file may
name ``base:`` files (one, or a list; relative to itself), merged in order, whose values
it then overrides key by key: ``configs/criteo/adamar.yaml`` is the dataset's
``_base.yaml`` plus ``configs/methods/adamar.yaml``, so a method is written once. Every
key is checked against these dataclasses at load: an unknown or mistyped key fails
with the file and the dotted key path (and the nearest known key), before any rank
starts training. Hyperparameters of our optimizers are validated by building their
rule config, so ``alpha: -1`` fails here and not in the middle of a backward.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import re

import yaml

from ...epochs import MEDAConfig
from .data.synthetic import SyntheticConfig
from .decay_units import per_step_kwargs
from .optimizer_names import OURS as _OUR_OPTIMIZERS
from .optimizer_names import STOCK, our_optimizer, renamed_method_hint


class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-3`` (no dot) is a *string*; a learning rate
    written that way would reach the optimizer as text. Resolve it as a float (YAML 1.2)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


class ConfigError(ValueError):
    """A config that cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class DataConfig:
    """Where the click log comes from.

    ``kind``: ``parquet`` (a directory made by ``python -m torchrec_adaptive.apps.dlrm.data.convert``:
    ``train`` and ``test`` name its split directories; any size, streamed), ``criteo_npy``
    (TorchRec's ``day_*_{dense,sparse,labels}.npy``: ``train``/``test`` a day prefix or a
    directory of days; streamed), and, converted to Parquet once into ``cache_dir`` by the
    same converter: ``synthetic`` (built in, no download), ``criteo_tsv`` (Kaggle ``train.txt``
    or 1TB ``day_*``, ``.gz`` too), ``avazu`` (``train.csv``), ``tabular`` (CSV or Parquet
    described by ``schema``). For those, without a ``test`` file the last ``test_fraction``
    of ``train`` is held out (never trained on: unlike upstream dlrm_main's Kaggle mode,
    evaluation never sees training rows). ``shuffle_rows``: the per-rank shuffle buffer;
    ``prefetch``: batches read ahead by the input thread (see ``data/stream.py``).
    """

    kind: str = "synthetic"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)  # METHODS.md's long-tail teacher
    train: Optional[str] = None
    test: Optional[str] = None
    test_fraction: float = 0.1
    vocab_size: int = 100_000
    max_rows: Optional[int] = None
    schema: Optional[str] = None
    npy_ids: str = "raw"  # criteo_npy: "raw" hashed IDs (hashed like the TSV reader) or "contiguous"
    cache_dir: Optional[str] = None  # converted raw logs / synthetic set; None: <run dir>/../.data_cache
    shuffle_rows: int = 262_144
    prefetch: int = 4


@dataclass(frozen=True)
class MLETModel:
    inner_dim: int = 64
    v_init_std: float = 0.25


@dataclass(frozen=True)
class ModelConfig:
    """TorchRec's ``DLRM`` (dot interaction) or ``DLRM_DCN`` (cross network)."""

    arch: str = "dlrm"
    embedding_dim: int = 16
    dense_arch: list[int] = field(default_factory=lambda: [64, 16])
    over_arch: list[int] = field(default_factory=lambda: [256, 128, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 16
    init_std: Optional[float] = None  # None: TorchRec's U(-1/sqrt(n), 1/sqrt(n)); else U(-a, a) with a = std*sqrt(3)
    mlet: Optional[MLETModel] = None


@dataclass(frozen=True)
class SparseOptimizerConfig:
    """The embedding tables' optimizer, applied in backward.

    ``name``: ours (``adam``, ``adamar``, ``rowwise_adagrad``: the fused torchrec_adaptive
    kernel) or stock (``stock_rowwise_adagrad``: FBGEMM's fused row-wise Adagrad;
    ``stock_adam``: FBGEMM's fused Adam, CUDA only); ``optimizer_names.py``. The method
    configs use the same words (``configs/*/stock_rowwise_adagrad.yaml`` trains FBGEMM's). ``kwargs`` go to
    ``apply_optimizer_in_backward`` unchanged (FAL: ``fal_tau`` ..., table multiplier:
    ``lr_multiplier``; see docs/rules.md).
    """

    name: str = "adam"
    kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-3})


@dataclass(frozen=True)
class DenseOptimizerConfig:
    name: str = "adam"  # adam | adamw | sgd | adagrad (torch.optim)
    lr: float = 1e-3
    weight_decay: float = 0.0


@dataclass(frozen=True)
class HelenOptions:
    rho: float = 0.01
    xi: float = 0.5


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    batch_size: int = 1024  # per rank
    eval_batch_size: int = 8192  # per rank
    shuffle: bool = True
    seed: int = 0
    pipeline: str = "auto"  # "auto" (sparse_dist on CUDA, else plain) | "plain" | "sparse_dist" (TorchRec's TrainPipelineSparseDist)
    freq_buckets: list[int] = field(default_factory=lambda: [1, 10, 100, 1000])
    diagnostics: bool = True
    checkpoint: bool = True
    max_steps_per_epoch: Optional[int] = None  # smoke tests and benchmarks


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sparse_optimizer: SparseOptimizerConfig = field(default_factory=SparseOptimizerConfig)
    dense_optimizer: DenseOptimizerConfig = field(default_factory=DenseOptimizerConfig)
    meda: Optional[MEDAConfig] = None  # one config for every table
    helen: Optional[HelenOptions] = None
    train: TrainConfig = field(default_factory=TrainConfig)


DATA_KINDS = ("synthetic", "parquet", "criteo_tsv", "criteo_npy", "avazu", "tabular")
ARCHS = ("dlrm", "dlrm_dcn")
OURS = tuple(_OUR_OPTIMIZERS)
DENSE = ("adam", "adamw", "sgd", "adagrad")
PIPELINES = ("auto", "plain", "sparse_dist")


# --- strict dict -> dataclass -------------------------------------------------------------

def _unknown(key: str, where: str, known: list[str], src: str) -> ConfigError:
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return ConfigError(f"{src}: unknown key {where + key!r}{hint}; known keys here: {sorted(known)}")


def _coerce(value: Any, tp: Any, where: str, src: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, src)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {where!r} must be a mapping, got {value!r}")
        return _build(tp, value, where + ".", src)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{src}: {where!r} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{src}: {where!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{src}: {where!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: {where!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{src}: {where!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{src}: {where!r} must be a string, got {value!r}")
        return value
    return value


def _build(cls: Any, raw: dict[str, Any], where: str, src: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in known:
            raise _unknown(str(key), where, known, src)
    values = {k: _coerce(v, hints[k], where + k, src) for k, v in raw.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the dataclass's own checks (MEDAConfig, SyntheticConfig)
        raise ConfigError(f"{src}: {where.rstrip('.') or 'config'}: {e}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v  # optimizer kwargs are replaced whole: a method's kwargs are its own
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        raise ConfigError(f"{path}: 'base' files form a cycle: {[str(p) for p in seen + (path,)]}")
    try:
        raw = _yaml(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}{renamed_method_hint(path.stem)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    bases = raw.pop("base", None) or []
    merged: dict[str, Any] = {}
    for b in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, _read_yaml((path.parent / str(b)).resolve(), seen + (path,)))
    return _merge(merged, raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``key.sub=value`` strings (values parsed as YAML) on top of a raw config."""
    out = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, text = item.split("=", 1)
        node = out
        parts = dotted.split(".")
        for p in parts[:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = _yaml(text)
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Reads, merges ``base`` files, applies overrides, and validates a run config."""
    path = Path(path).resolve()
    raw = apply_overrides(_read_yaml(path), overrides or [])
    cfg = _build(RunConfig, raw, "", str(path))
    validate(cfg, str(path))
    return cfg


def validate(cfg: RunConfig, src: str = "config") -> None:
    """Checks what the types cannot: names, ranges, and our optimizers' hyperparameters."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{src}: {msg}")

    d, m, t, so = cfg.data, cfg.model, cfg.train, cfg.sparse_optimizer
    need(d.kind in DATA_KINDS, f"data.kind must be one of {DATA_KINDS}, got {d.kind!r}")
    need(d.kind == "synthetic" or d.train is not None, f"data.train (a file) is required for data.kind {d.kind!r}")
    need(d.kind != "tabular" or d.schema is not None, "data.schema (a YAML file) is required for data.kind 'tabular'")
    need(0.0 < d.test_fraction < 1.0, f"data.test_fraction must be in (0, 1), got {d.test_fraction}")
    need(d.vocab_size >= 2, f"data.vocab_size must be >= 2, got {d.vocab_size}")
    need(d.npy_ids in ("raw", "contiguous"), f"data.npy_ids must be 'raw' or 'contiguous', got {d.npy_ids!r}")
    need(d.kind not in ("parquet", "criteo_npy") or d.test is not None,
         f"data.test is required for data.kind {d.kind!r} (a converted data set has its test split; "
         f"the converter's --test-fraction holds one out)")
    need(d.shuffle_rows >= 1 and d.prefetch >= 1, "data.shuffle_rows and data.prefetch must be >= 1")
    need(m.arch in ARCHS, f"model.arch must be one of {ARCHS}, got {m.arch!r}")
    need(m.embedding_dim >= 1, f"model.embedding_dim must be >= 1, got {m.embedding_dim}")
    need(bool(m.dense_arch) and m.dense_arch[-1] == m.embedding_dim,
         f"model.dense_arch must end in model.embedding_dim ({m.embedding_dim}): DLRM interacts it with the "
         f"embeddings; got {m.dense_arch}")
    need(bool(m.over_arch) and m.over_arch[-1] == 1, f"model.over_arch must end in 1 (one logit), got {m.over_arch}")
    need(m.init_std is None or m.init_std > 0, f"model.init_std must be > 0, got {m.init_std}")
    if m.mlet is not None:
        need(m.mlet.inner_dim >= m.embedding_dim,
             f"model.mlet.inner_dim ({m.mlet.inner_dim}) must be >= model.embedding_dim ({m.embedding_dim})")
        need(t.pipeline != "sparse_dist", "mlet: TrainPipelineSparseDist cannot trace its factorized tables "
             "(torch.fx TraceError): train.pipeline must be 'plain' (or 'auto')")
    need(so.name in OURS + STOCK, f"sparse_optimizer.name must be one of {OURS + STOCK}, got {so.name!r}")
    need("lr" in so.kwargs, "sparse_optimizer.kwargs must set lr")
    need(not (cfg.name in OURS and so.name in STOCK),
         f"the run is named {cfg.name!r}, our optimizer's name, but trains sparse_optimizer {so.name!r} (FBGEMM's "
         f"stock one); name it {so.name!r} (the method config of FBGEMM's row-wise Adagrad is now "
         f"stock_rowwise_adagrad.yaml) or use sparse_optimizer.name {cfg.name!r}")
    if so.name in OURS:
        try:
            our_optimizer(so.name).rule_config(**per_step_kwargs(so, 1))  # alpha_per_epoch checked as 1 step/epoch
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{src}: sparse_optimizer.kwargs: {e}") from None
    dn = cfg.dense_optimizer
    need(dn.name in DENSE, f"dense_optimizer.name must be one of {DENSE}, got {dn.name!r}")
    need(dn.lr > 0, f"dense_optimizer.lr must be > 0, got {dn.lr}")
    need(t.epochs >= 1 and t.batch_size >= 1 and t.eval_batch_size >= 1,
         "train.epochs, train.batch_size and train.eval_batch_size must be >= 1")
    need(t.pipeline in PIPELINES, f"train.pipeline must be one of {PIPELINES}, got {t.pipeline!r}")
    need(list(t.freq_buckets) == sorted(set(t.freq_buckets)) and all(b >= 1 for b in t.freq_buckets),
         f"train.freq_buckets must be increasing counts >= 1, got {t.freq_buckets}")
    if cfg.meda is not None:
        need(so.name in OURS or cfg.meda.reinit != "tail",
             "meda with reinit 'tail' needs row counts, which only torchrec_adaptive optimizers keep")
    if cfg.helen is not None:
        need(so.name in OURS, "helen needs a torchrec_adaptive sparse optimizer (its kernel perturbs the rows)")
        need(t.pipeline != "sparse_dist", "helen runs two passes per step: train.pipeline must be 'plain' (or 'auto')")
        need(cfg.helen.rho >= 0 and 0 <= cfg.helen.xi <= 1, f"helen: rho >= 0 and xi in [0, 1], got {cfg.helen}")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain dict (for the metrics log and the checkpoint's record of what ran)."""
    return dataclasses.asdict(cfg)
