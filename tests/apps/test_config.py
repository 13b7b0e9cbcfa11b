"""The app's YAML configs: every shipped file loads, and bad ones fail with the file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchrec_adaptive.apps.dlrm.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name != "methods" and p.name != "schema.yaml")
METHODS = {"adam", "stock_rowwise_adagrad", "stock_adam", "adamar", "fal", "sparse_optimizer", "meda", "helen", "mlet"}


def test_every_method_has_a_config_per_dataset():
    for dataset in ("synthetic", "criteo", "avazu", "tabular"):
        have = {p.stem for p in (ROOT / "configs" / dataset).glob("*.yaml")} - {"_base", "schema"}
        assert have == METHODS, dataset


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_shipped_config_loads(path):
    cfg = load_config(path)
    if path.stem != "_base":
        assert cfg.name == path.stem
    assert cfg.data.kind in ("synthetic", "criteo_tsv", "avazu", "tabular")


def test_methods_differ_where_they_should():
    c = {m: load_config(ROOT / "configs" / "synthetic" / f"{m}.yaml") for m in METHODS}
    assert c["adamar"].sparse_optimizer.name == "adamar" and c["adamar"].sparse_optimizer.kwargs["alpha_per_epoch"] > 0
    assert "fal_tau" in c["fal"].sparse_optimizer.kwargs
    assert c["sparse_optimizer"].sparse_optimizer.kwargs["lr_multiplier"] != 1.0
    assert c["meda"].meda is not None and c["adam"].meda is None
    assert c["helen"].helen is not None and c["mlet"].model.mlet is not None
    assert c["stock_rowwise_adagrad"].sparse_optimizer.name == "stock_rowwise_adagrad"
    assert c["stock_adam"].sparse_optimizer.name == "stock_adam"  # FBGEMM's fused Adam: the baseline on CUDA
    # the method file overrides the dataset base, the base keeps the rest
    assert c["adamar"].train == c["adam"].train and c["adamar"].data == c["adam"].data
    assert load_config(ROOT / "configs" / "criteo" / "mlet.yaml").model.mlet.inner_dim == 128


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text,pattern",
    [
        ("trian: {epochs: 2}\n", r"unknown key 'trian' \(did you mean 'train'\?\)"),
        ("train: {epoch: 2}\n", r"unknown key 'train.epoch' \(did you mean 'epochs'\?\)"),
        ("train: {epochs: two}\n", r"'train.epochs' must be an integer"),
        ("model: {dense_arch: [64, 8]}\n", r"dense_arch must end in model.embedding_dim \(16\)"),
        ("sparse_optimizer: {name: adamar, kwargs: {lr: 1.0e-3, alpha: -1}}\n", r"sparse_optimizer.kwargs: .*alpha"),
        ("sparse_optimizer: {name: adamar, kwargs: {lr: 1.0e-3, alpah: 1}}\n", r"unknown argument\(s\) \['alpah'\]"),
        ("sparse_optimizer: {name: lamb}\n", r"sparse_optimizer.name must be one of"),
        ("data: {kind: criteo_tsv}\n", r"data.train \(a file\) is required"),
        ("meda: {reinit: some}\n", r"meda: reinit must be one of"),
        ("meda: {reinit: tail}\n", r"meda: reinit='tail' needs a tail_threshold"),
        ("data: {synthetic: {click_rate: 2}}\n", r"data.synthetic: click_rate must be in \(0, 1\)"),
        ("data: {synthetic: {zipff: 2}}\n", r"unknown key 'data.synthetic.zipff' \(did you mean 'zipf'\?\)"),
        ("helen: {rho: 0.1}\ntrain: {pipeline: sparse_dist}\n", r"helen runs two passes"),
        ("model: {mlet: {inner_dim: 32}}\ntrain: {pipeline: sparse_dist}\n", r"mlet: TrainPipelineSparseDist cannot"),
        ("sparse_optimizer: {name: stock_rowwise_adagrad, kwargs: {lr: 0.1}}\nhelen: {}\n", r"helen needs a torchrec_adaptive"),
        ("train: {freq_buckets: [10, 1]}\n", r"freq_buckets must be increasing"),
        # one name per optimizer: a run named like ours must not train FBGEMM's
        ("name: rowwise_adagrad\nsparse_optimizer: {name: stock_rowwise_adagrad, kwargs: {lr: 0.1}}\n",
         r"the run is named 'rowwise_adagrad', our optimizer's name, but trains sparse_optimizer 'stock_rowwise_adagrad'"),
        ("- a\n- b\n", r"top level must be a mapping"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, pattern):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=pattern) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_base_chain_overrides_and_cycles(tmp_path):
    _write(tmp_path, "name: b\ntrain: {epochs: 3, batch_size: 64}\n", "b.yaml")
    _write(tmp_path, "name: m\nsparse_optimizer: {name: adamar, kwargs: {lr: 0.01, alpha: 0.1}}\n", "m.yaml")
    p = _write(tmp_path, "base: [b.yaml, m.yaml]\ntrain: {epochs: 5}\n")
    cfg = load_config(p, ["train.batch_size=32", "sparse_optimizer.kwargs.alpha=0.001"])
    assert (cfg.name, cfg.train.epochs, cfg.train.batch_size) == ("m", 5, 32)
    assert cfg.sparse_optimizer.kwargs == {"lr": 0.01, "alpha": 0.001}
    _write(tmp_path, "base: y.yaml\n", "x.yaml")
    _write(tmp_path, "base: x.yaml\n", "y.yaml")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(p, ["train.epochs"])
    with pytest.raises(ConfigError, match="unknown key 'train.nope'"):
        load_config(p, ["train.nope=1"])


def test_exponents_without_a_dot_are_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-3`` as a string; the loader must not pass text to an optimizer."""
    p = _write(tmp_path, "sparse_optimizer: {name: adamar, kwargs: {lr: 1e-3, alpha: 3e-2}}\n"
                         "dense_optimizer: {lr: 2e-4}\n")
    cfg = load_config(p, ["sparse_optimizer.kwargs.fal_tau=1e1"])
    assert cfg.sparse_optimizer.kwargs == {"lr": 1e-3, "alpha": 3e-2, "fal_tau": 10.0}
    assert cfg.dense_optimizer.lr == 2e-4
    assert load_config(p, ["name=1e5x"]).name == "1e5x"


def test_renamed_method_config_says_where_it_went():
    """The stock row-wise Adagrad method was rowwise_adagrad.yaml, while sparse_optimizer rowwise_adagrad is ours."""
    with pytest.raises(ConfigError, match=r"now 'stock_rowwise_adagrad': use stock_rowwise_adagrad.yaml") as e:
        load_config(ROOT / "configs" / "synthetic" / "rowwise_adagrad.yaml")
    assert "our RowWiseAdagrad" in str(e.value)


def test_config_and_optimizer_modules_do_not_import_each_other():
    import ast

    app = ROOT / "torchrec_adaptive" / "apps" / "dlrm"
    imported = {name: {n.module for n in ast.walk(ast.parse((app / f"{name}.py").read_text()))
                       if isinstance(n, ast.ImportFrom) and n.module} for name in ("config", "optim")}
    assert "optim" not in imported["config"], "config.py imports optim.py (an import circle with optim -> config)"
