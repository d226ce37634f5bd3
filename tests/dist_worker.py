"""Runs train_gpt.main() (plain or under torchrun) and saves each rank's final weights and GPTQ Hessians, for the
equivalence tests. With CALIB_ONLY=1 it only runs GPTQ calibration on a freshly initialized model (no training)."""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402

if os.environ.get("COMPILE") == "1":  # one compiled graph on 1 and 2 ranks: DDP's split at its gradient buckets changes
    import torch._dynamo  # the fusion and so the rounding (measured: 1.5e-8 in fp32, 7e-5 in bf16 after 12 steps)
    torch._dynamo.config.optimize_ddp = False

out, rank = os.environ["LOG_DIR"], int(os.environ.get("RANK", "0"))
if os.environ.get("CALIB_ONLY") == "1":
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    hp = train_gpt.parse_hparams()
    torch.manual_seed(0)
    model = train_gpt.GPT(hp)
    loader = train_gpt.DistributedTokenLoader(train_gpt.shard_files(hp, "train"), rank, world, torch.device("cpu"))
    hessians, _, _ = train_gpt.collect_hessians(hp, train_gpt.Context(rank, world), model, loader, None)
    if world > 1:
        dist.destroy_process_group()
else:
    result = train_gpt.main()
    torch.save({k: v.cpu() for k, v in result["model"].state_dict().items()}, os.path.join(out, f"weights_rank{rank}.pt"))
    hessians = result.get("hessians", {})
torch.save({k: v.cpu() for k, v in hessians.items()}, os.path.join(out, f"hessians_rank{rank}.pt"))
