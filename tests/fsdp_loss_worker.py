"""Started by tests/test_model.py under torchrun (2 ranks, gloo on CPU).

Transformer.forward reads lm_head.weight, where FSDP2 has gathered the sharded parameter, and hands it to
the fused loss. Each rank runs its own packed stream; FSDP2 averages the gradients over ranks. They must
equal the average of the per-rank gradients of an unsharded copy of the model, computed on every rank.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra.job import end_job  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402

CASES = {  # name: (tie_embeddings, FSDP2 compute dtype, relative tolerance)
    "untied fp32": (False, torch.float32, 1e-5),
    "tied fp32": (True, torch.float32, 1e-5),
    "untied bf16 compute, fp32 reduce": (False, torch.bfloat16, 3e-2),
}


def packed_stream(rank, vocab_size):
    g = torch.Generator().manual_seed(100 + rank)
    lengths = [int(n) for n in torch.randint(3, 20, (4,), generator=g)]
    tokens = torch.randint(0, vocab_size, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    weights = torch.where(torch.rand(len(tokens), generator=g) < 0.3, 0.0, 1.0)
    return tokens, positions, cu_seqlens, torch.roll(tokens, -1), weights


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    for name, (tie, dtype, tol) in CASES.items():
        torch.manual_seed(0)
        reference = Transformer(ModelConfig.from_name("tiny", tie_embeddings=tie))
        sharded = copy.deepcopy(reference)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in sharded.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(sharded, mesh=mesh, mp_policy=policy)  # the root holds embed_tokens, norm, lm_head

        tokens, positions, cu, targets, weights = packed_stream(rank, reference.config.vocab_size)
        loss = sharded(tokens, positions, cu, targets=targets, target_weights=weights)[0]
        loss.backward()

        for r in range(world):  # the same average on one process
            tokens, positions, cu, targets, weights = packed_stream(r, reference.config.vocab_size)
            (reference(tokens, positions, cu, targets=targets, target_weights=weights)[0] / world).backward()

        sharded_params = dict(sharded.named_parameters())
        for pname, p in reference.named_parameters():
            got = sharded_params[pname].grad.full_tensor()
            err = ((got - p.grad).norm() / p.grad.norm()).item()
            assert err < tol, f"{name}: {pname} gradient off by {err:.2e} (relative)"
        print(f"rank {rank}: {name}: fsdp2 gradients match", flush=True)


if __name__ == "__main__":
    main()
    end_job()
