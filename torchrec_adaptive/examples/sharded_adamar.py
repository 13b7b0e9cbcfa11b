"""AdamAR on a sharded EmbeddingBagCollection, 2 CPU ranks over gloo.

    torchrun --nproc_per_node 2 -m torchrec_adaptive.examples.sharded_adamar

The whole integration is two lines: ``apply_optimizer_in_backward`` names our
optimizer for the tables, and ``DistributedModelParallel`` gets our sharders. The
dense head is a plain module that DMP wraps in DDP; it uses torch's Adam.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.optimizers import in_backward_optimizer_filter

import torchrec_adaptive
from torchrec_adaptive import sharders

VOCABS = [2_000, 500, 10_000, 300]  # one feature per table
DIM = 16


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t{i}", num_embeddings=n, embedding_dim=DIM, feature_names=[f"f{i}"])
                    for i, n in enumerate(VOCABS)],
            device=torch.device("cpu"),
        )
        self.head = nn.Sequential(nn.Linear(DIM * len(VOCABS), 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(self.ebc(kjt).values()).squeeze(1)


def zipf_batch(batch: int, gen: torch.Generator) -> tuple[KeyedJaggedTensor, torch.Tensor]:
    """IDs with a heavy head and a long tail; the label depends on the IDs (learnable)."""
    values, lengths, signal = [], [], torch.zeros(batch)
    for n in VOCABS:
        ln = torch.randint(1, 4, (batch,), generator=gen)
        ids = (n * torch.rand(int(ln.sum()), generator=gen).pow(4)).long().clamp(max=n - 1)
        bag = torch.repeat_interleave(torch.arange(batch), ln)
        signal.index_add_(0, bag, ((ids % 7) == 0).float())
        values.append(ids)
        lengths.append(ln)
    kjt = KeyedJaggedTensor(keys=[f"f{i}" for i in range(len(VOCABS))], values=torch.cat(values),
                            lengths=torch.cat(lengths))
    return kjt, (signal > 0).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--alpha", type=float, default=1e-3)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Model()
    apply_optimizer_in_backward(torchrec_adaptive.AdamAR, model.ebc.parameters(), {"lr": 1e-2, "alpha": args.alpha})
    model = DistributedModelParallel(model, device=torch.device("cpu"), sharders=sharders())
    if rank == 0:
        # DMP's plan shows what TorchRec's planner chose ("fused"); the sharded EBC runs
        # the AdamAR tables on our kernel, and its module_sharding_plan says "customized_kernel".
        print(model.plan)
    dense_opt = torch.optim.Adam(dict(in_backward_optimizer_filter(model.named_parameters())).values(), lr=1e-2)
    gen = torch.Generator().manual_seed(1 + rank)
    loss_fn = nn.BCEWithLogitsLoss()
    for step in range(1, args.steps + 1):
        kjt, label = zipf_batch(args.batch_size, gen)
        loss = loss_fn(model(kjt), label)
        dense_opt.zero_grad()
        loss.backward()  # embedding rows are updated here, by the fused AdamAR
        dense_opt.step()
        if step % 10 == 0:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:3d}  loss {mean.item() / dist.get_world_size():.4f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
