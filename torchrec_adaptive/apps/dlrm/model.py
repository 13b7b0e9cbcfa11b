"""TorchRec's DLRM / DLRM_DCN over the data's fields, sharded by DistributedModelParallel.

One table per categorical field (name ``t_<field>``, feature ``<field>``), all of the
configured dimension (DLRM's interaction needs one dimension). MLET swaps the
``EmbeddingBagCollection`` for :class:`torchrec_adaptive.mlet.MLETEmbeddingBagCollection`
(TorchRec's DLRM only calls ``embedding_bag_configs()`` and ``forward`` on it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import ModelConfig, RunConfig
from .optim import apply_sparse_optimizer


def table_configs(field_names: Sequence[str], vocab_sizes: Sequence[int], cfg: ModelConfig) -> list[Any]:
    from torchrec import EmbeddingBagConfig

    out = []
    for f, n in zip(field_names, vocab_sizes):
        kw: dict[str, Any] = {}
        if cfg.init_std is not None:
            a = cfg.init_std * math.sqrt(3.0)
            kw = {"weight_init_min": -a, "weight_init_max": a}
        out.append(EmbeddingBagConfig(name=f"t_{f}", num_embeddings=int(n), embedding_dim=cfg.embedding_dim,
                                      feature_names=[f], **kw))
    return out


def build_model(cfg: RunConfig, field_names: Sequence[str], vocab_sizes: Sequence[int], num_dense: int,
                device: torch.device, steps_per_epoch: int = 0) -> tuple[nn.Module, nn.Module]:
    """(DLRMTrain module, the embedding module whose parameters the sparse optimizer owns), unsharded.

    Tables are created on ``meta`` and materialized by DMP on each rank's shard only.
    ``steps_per_epoch`` turns AdamAR's ``alpha_per_epoch`` into its ``alpha`` (decay_units.per_step_kwargs).
    """
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

    from ...mlet import MLETConfig, MLETEmbeddingBagCollection

    m = cfg.model
    tables = table_configs(field_names, vocab_sizes, m)
    if m.mlet is not None:
        emb: nn.Module = MLETEmbeddingBagCollection(tables, MLETConfig(inner_dim=m.mlet.inner_dim,
                                                                       v_init_std=m.mlet.v_init_std),
                                                    device=torch.device("meta"))
        apply_sparse_optimizer(emb.inner, cfg.sparse_optimizer, steps_per_epoch)  # W_t are tables; V_t stay dense
    else:
        emb = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
        apply_sparse_optimizer(emb, cfg.sparse_optimizer, steps_per_epoch)
    common = dict(embedding_bag_collection=emb, dense_in_features=num_dense, dense_arch_layer_sizes=list(m.dense_arch),
                  over_arch_layer_sizes=list(m.over_arch), dense_device=device)
    if m.arch == "dlrm_dcn":
        net = DLRM_DCN(dcn_num_layers=m.dcn_num_layers, dcn_low_rank_dim=m.dcn_low_rank_dim, **common)
    else:
        net = DLRM(**common)
    return DLRMTrain(net), emb


def shard(model: nn.Module, cfg: RunConfig, device: torch.device) -> Any:
    """DistributedModelParallel with our sharders and a plan from our planner helper."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.types import ShardingEnv

    from ...distributed import plan, sharders

    pg = dist.group.WORLD
    sharding_plan = plan(model, pg, compute_device=device.type, batch_size=cfg.train.batch_size)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=device,
                                    plan=sharding_plan, sharders=sharders())
