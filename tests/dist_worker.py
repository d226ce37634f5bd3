"""Runs train_gpt.main() (plain or under torchrun) and saves each rank's final weights and GPTQ Hessians, for the
equivalence test."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402

result = train_gpt.main()
rank = int(os.environ.get("RANK", "0"))
out = os.environ["LOG_DIR"]
torch.save({k: v.cpu() for k, v in result["model"].state_dict().items()}, os.path.join(out, f"weights_rank{rank}.pt"))
torch.save({k: v.cpu() for k, v in result.get("hessians", {}).items()}, os.path.join(out, f"hessians_rank{rank}.pt"))
