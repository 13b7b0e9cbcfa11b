"""Canaries for every TorchRec / PyTorch private the seam (distributed/_torchrec_compat.py) names,
the installed-version check, and the rule that nothing else names one.

Each canary checks that the private still exists with the fields or signature we use; on
another TorchRec it fails naming the supported version and the seam function to port.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchrec_adaptive as ta
from torchrec_adaptive.distributed import _torchrec_compat as compat

ROOT = Path(__file__).resolve().parents[2]


def _msg(what: str, seam: str) -> str:
    return (f"TorchRec/PyTorch internal changed: {what}. torchrec_adaptive supports {compat.SUPPORTED_TORCHREC_TEXT} "
            f"(installed: torchrec {compat.installed_torchrec_version()}, torch {torch.__version__}); "
            f"port _torchrec_compat.{seam} (docs/torchrec_1_9.md)")


def _assigns(cls: type, attr: str) -> bool:
    """Whether some class in ``cls``'s MRO assigns ``self.<attr>`` in its source."""
    pattern = re.compile(rf"self\.{re.escape(attr)}\s*(:[^=]*)?=[^=]")
    for klass in cls.__mro__:
        try:
            if pattern.search(inspect.getsource(klass)):
                return True
        except (OSError, TypeError):
            continue
    return False


def _params(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


# ------------------------------------------------------------------ optimizer attributes
def test_canary_optimizer_in_backward_attributes() -> None:
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    p = nn.Parameter(torch.zeros(4, 2))
    apply_optimizer_in_backward(torch.optim.SGD, [p], {"lr": 0.1})
    for attr in ("_optimizer_classes", "_optimizer_kwargs", "_in_backward_optimizers"):
        assert isinstance(getattr(p, attr, None), list), _msg(f"parameter attribute {attr} (a list) is gone",
                                                              "optimizer_class_of / in_backward_optimizers")
    assert compat.optimizer_class_of(p) is torch.optim.SGD, _msg("_optimizer_classes[0]", "optimizer_class_of")
    assert compat.optimizer_kwargs_of(p) == {"lr": 0.1}, _msg("_optimizer_kwargs[0]", "optimizer_kwargs_of")
    assert isinstance(compat.in_backward_optimizers(p)[0], torch.optim.SGD), _msg("_in_backward_optimizers",
                                                                                  "in_backward_optimizers")


def test_canary_optimizer_kwargs_swap_still_needed() -> None:
    """TorchRec still reads ``_optimizer_kwargs`` and still refuses our classes without an
    "optimizer" key: the swap in present_optimizer_kwargs is needed (and works)."""
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
    from torchrec.distributed.utils import optimizer_type_to_emb_opt_type

    source = inspect.getsource(ShardedEmbeddingBagCollection.create_grouped_sharding_infos)
    assert '"_optimizer_kwargs"' in source and '"optimizer" not in' in source, _msg(
        "create_grouped_sharding_infos no longer reads _optimizer_kwargs / the 'optimizer' key; the swap may go",
        "present_optimizer_kwargs")
    with pytest.raises(ValueError, match="Cannot cast"):
        optimizer_type_to_emb_opt_type(ta.AdamAR)
    p = nn.Parameter(torch.zeros(2))
    mine = {"lr": 0.5}
    p._optimizer_kwargs = [mine]  # type: ignore[attr-defined]
    with compat.present_optimizer_kwargs([(p, "torchrec_adaptive.AdamAR")]):
        assert p._optimizer_kwargs == [{"optimizer": "torchrec_adaptive.AdamAR"}]  # type: ignore[attr-defined]
    assert p._optimizer_kwargs[0] is mine and mine == {"lr": 0.5}  # type: ignore[attr-defined]


def test_public_route_customized_kernel_fused_params() -> None:
    """The CUSTOMIZED_KERNEL route (torchrec PR #2887) hands our rule to the table's fused params."""
    from torchrec.distributed.utils import add_params_from_parameter_sharding

    from torchrec_adaptive.distributed.embeddingbag import AdaptiveParameterSharding
    from torchrec_adaptive.distributed.kernel import ADAPTIVE_OPTIONS_KEY, ADAPTIVE_RULE_KEY
    from torchrec_adaptive.kernels.inputs import KernelOptions

    rule, options = ta.AdamARConfig(lr=0.01), KernelOptions()
    ps = AdaptiveParameterSharding(sharding_type="table_wise", compute_kernel=compat.CUSTOMIZED, ranks=[0],
                                   rule=rule, kernel_options=options)
    out = add_params_from_parameter_sharding({}, ps)
    assert out.get(ADAPTIVE_RULE_KEY) is rule and out.get(ADAPTIVE_OPTIONS_KEY) is options, _msg(
        "add_params_from_parameter_sharding no longer adds get_additional_fused_params() for customized_kernel",
        "(embeddingbag.AdaptiveParameterSharding)")


# ----------------------------------------------------------------------- sharding internals
@pytest.mark.parametrize("name", ["tw_sharding.TwPooledEmbeddingSharding", "cw_sharding.CwPooledEmbeddingSharding",
                                  "rw_sharding.RwPooledEmbeddingSharding", "twrw_sharding.TwRwPooledEmbeddingSharding",
                                  "dp_sharding.DpPooledEmbeddingSharding"])
def test_canary_sharding_lookup_fields(name: str) -> None:
    import importlib

    module, cls_name = name.split(".")
    cls = getattr(importlib.import_module(f"torchrec.distributed.sharding.{module}"), cls_name)
    fields = ["_env", "_device"]
    if cls_name == "TwRwPooledEmbeddingSharding":
        fields += ["_grouped_embedding_configs_per_rank", "_rank", "_pg"]
    elif cls_name != "DpPooledEmbeddingSharding":
        fields += ["_grouped_embedding_configs", "_pg"]
    else:
        fields += ["_grouped_embedding_configs"]
    for field in fields:
        assert _assigns(cls, field), _msg(f"{cls_name} no longer sets {field}", "lookup_args")
    assert "GroupedPooledEmbeddingsLookup" in inspect.getsource(cls.create_lookup), _msg(
        f"{cls_name}.create_lookup no longer builds GroupedPooledEmbeddingsLookup", "lookup_args")


def test_canary_grouped_lookup_create_embedding_kernel() -> None:
    from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup

    fn = getattr(GroupedPooledEmbeddingsLookup, "_create_embedding_kernel", None)
    assert fn is not None and _params(fn) == ["self", "config", "device", "pg", "sharding_type", "env"], _msg(
        "GroupedPooledEmbeddingsLookup._create_embedding_kernel(config, device, pg, sharding_type, env)",
        "GroupedLookupHooks")
    assert "_create_embedding_kernel" in inspect.getsource(GroupedPooledEmbeddingsLookup.__init__), _msg(
        "GroupedPooledEmbeddingsLookup.__init__ no longer builds kernels through _create_embedding_kernel",
        "GroupedLookupHooks")


def test_canary_sharded_ebc_hooks() -> None:
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection as S

    for field in ("_lookups", "_embedding_shardings"):
        assert _assigns(S, field), _msg(f"ShardedEmbeddingBagCollection no longer sets {field}",
                                        "sharded_lookups / ShardedEBCHooks")
    assert _params(S._create_lookups) == ["self"] and "self._create_lookups()" in inspect.getsource(S.__init__), \
        _msg("ShardedEmbeddingBagCollection._create_lookups() (called by __init__)", "ShardedEBCHooks._create_lookups")
    assert "self._embedding_shardings" in inspect.getsource(S.init_data_parallel), _msg(
        "init_data_parallel no longer iterates _embedding_shardings", "ShardedEBCHooks.init_data_parallel_skipping")
    fn = S._initialize_torch_state
    assert _params(fn) == ["self", "skip_registering"], _msg("_initialize_torch_state(skip_registering)",
                                                             "ShardedEBCHooks._initialize_torch_state")
    assert "CUSTOMIZED_KERNEL" in inspect.getsource(fn) and "self.module_sharding_plan" in inspect.getsource(fn), \
        _msg("_initialize_torch_state no longer skips CUSTOMIZED_KERNEL tables via module_sharding_plan; "
             "the plan swap may go", "ShardedEBCHooks._initialize_torch_state")


def test_canary_ddp_ignore() -> None:
    from torch.nn.parallel import DistributedDataParallel

    fn = getattr(DistributedDataParallel, "_set_params_and_buffers_to_ignore_for_model", None)
    assert fn is not None and _params(fn) == ["module", "params_and_buffers_to_ignore"], _msg(
        "DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)", "ddp_ignore")


# ------------------------------------------------------------------------------- planner
def test_canary_planner_privates() -> None:
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.planner import shard_estimators

    fn = getattr(shard_estimators, "_calculate_optimizer_sizes", None)
    assert fn is not None and _params(fn) == ["tensor_sizes", "optimizer_class", "sharding_tensor_shape"], _msg(
        "planner.shard_estimators._calculate_optimizer_sizes(tensor_sizes, optimizer_class, shape)",
        "torchrec_optimizer_bytes")
    # an optimizer class TorchRec does not know is costed as one weight-sized state
    assert compat.torchrec_optimizer_bytes(1000, ta.AdamAR, torch.Size([10, 25])) == 1000, _msg(
        "the storage estimator's size for an unknown optimizer class", "torchrec_optimizer_bytes")
    assert compat.GUARDED_COMPUTE_KERNELS and all(isinstance(k, EmbeddingComputeKernel)
                                                  for k in compat.GUARDED_COMPUTE_KERNELS), _msg(
        "planner.enumerators.GUARDED_COMPUTE_KERNELS (a set of EmbeddingComputeKernel)", "GUARDED_COMPUTE_KERNELS")


# ------------------------------------------------------------------------- ShardedTensor
def test_canary_sharded_tensor_process_group() -> None:
    from torchrec.distributed.types import ShardedTensor

    assert _assigns(ShardedTensor, "_process_group"), _msg("ShardedTensor._process_group", "process_group_of")


# ---------------------------------------------------------------- autograd (kernels/batched.py)
def test_canary_autograd_queue_callback() -> None:
    engine = getattr(torch.autograd.Variable, "_execution_engine", None)
    assert engine is not None and callable(getattr(engine, "queue_callback", None)), _msg(
        "torch.autograd.Variable._execution_engine.queue_callback (kernels/batched.py)", "(kernels/batched.py)")


# ------------------------------------------------------------------------- version check
def test_version_check_accepts_the_supported_range() -> None:
    assert compat.check_torchrec_version() == compat.installed_torchrec_version()
    for v in ("1.8.0", "1.8.3", "1.8.0+cpu"):
        assert compat.check_torchrec_version(v) == v


@pytest.mark.parametrize("version", ["1.9.2", "1.9.0a0", "1.7.0", "2.0.0"])
def test_version_check_refuses_others(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(compat.SKIP_VERSION_CHECK_ENV, raising=False)
    with pytest.raises(compat.UnsupportedTorchRecVersion, match=rf"supports torchrec >=1\.8\.0,<1\.9\.0, but "
                                                                rf"torchrec {re.escape(version)} is installed"):
        compat.check_torchrec_version(version)
    monkeypatch.setenv(compat.SKIP_VERSION_CHECK_ENV, "1")
    assert compat.check_torchrec_version(version) == version


def test_import_checks_the_installed_version() -> None:
    """``import torchrec_adaptive.distributed`` fails clearly on another TorchRec (simulated)."""
    code = ("import importlib.metadata as m; real = m.version; "
            "m.version = lambda name: '1.9.2' if name == 'torchrec' else real(name); "
            "import torchrec_adaptive.distributed")
    env = {k: v for k, v in os.environ.items() if k != compat.SKIP_VERSION_CHECK_ENV}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode != 0
    assert "UnsupportedTorchRecVersion" in r.stderr and "torchrec 1.9.2 is installed" in r.stderr, r.stderr[-2000:]


# ------------------------------------------------------------------- the seam is the only one
# Private TorchRec/PyTorch names this package uses; outside the seam none may appear.
_PRIVATE = re.compile(
    r"from (torch|torchrec|fbgemm_gpu)[\w.]* import _\w+|(torch|torchrec|fbgemm_gpu)(\.\w+)*\._(?!_)\w+"
    r"|\._(optimizer_classes|optimizer_kwargs|in_backward_optimizers|lookups|embedding_shardings|process_group"
    r"|grouped_embedding_configs\w*|set_params_and_buffers_to_ignore_for_model|sharded_module_order_overwrite"
    r"|calculate_optimizer_sizes|weight_init_mins|weight_init_maxs|feature_table_map|param_per_table"
    r"|create_embedding_kernel|create_lookups|initialize_torch_state|get_preferred_device|version)\b")
# Uses outside distributed/ with a reason: kernels/ must import without TorchRec.
_ALLOWED = {("torchrec_adaptive/kernels/batched.py", "torch.autograd.Variable._execution_engine"),
            ("torchrec_adaptive/apps/dlrm/quiet.py", "torch.fx._symbolic_trace"),
            ("torchrec_adaptive/kernels/sharpness.py", "._version")}


def test_no_private_outside_the_seam() -> None:
    found = []
    for path in sorted([*ROOT.glob("torchrec_adaptive/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "torchrec_adaptive/distributed/_torchrec_compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for m in _PRIVATE.finditer(code):
                if (rel, m.group(0)) not in _ALLOWED and "``" not in line:
                    found.append(f"{rel}:{n}: {m.group(0)}")
    assert not found, "TorchRec/PyTorch privates outside distributed/_torchrec_compat.py:\n" + "\n".join(found)


# ------------------------------------------------------------------- declared dependencies
def test_pyproject_declares_the_supported_range_and_the_pins_satisfy_it() -> None:
    """pyproject.toml's ranges say what the import check says, and this repo's pins
    (requirements/constraints.txt, what bootstrap installs) lie inside them."""
    import importlib.metadata
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    torchrec = [r for r in reqs if r.name == "torchrec"]
    lo, hi = compat.SUPPORTED_TORCHREC
    probes = ["1.7.9", lo, "1.8.5", hi, "1.9.2", "2.0.0"]
    inside = [Version(lo) <= Version(v) < Version(hi) for v in probes]
    assert torchrec and all([r.specifier.contains(v) for v in probes] == inside for r in torchrec), (
        f"pyproject.toml's torchrec range {[str(r) for r in torchrec]} differs from the import check's "
        f"{compat.SUPPORTED_TORCHREC_TEXT}")
    for name in ("torch", "torchrec", "torchmetrics", "fbgemm-gpu", "fbgemm-gpu-cpu"):
        try:
            have = Version(importlib.metadata.version(name)).base_version
        except importlib.metadata.PackageNotFoundError:
            continue  # the other FBGEMM flavor
        for r in (r for r in reqs if r.name == name):
            assert r.specifier.contains(have, prereleases=True), f"installed {name} {have} is outside {r}"
