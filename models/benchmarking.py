"""Helpers shared by bench/ and `ltk bench`: which devices to benchmark and how to wait for them."""
import os

import torch


def bench_devices() -> list[str]:
    """CPU always; CUDA where visible. LTK_BENCH_DEVICES=cpu (or cuda) restricts the list."""
    wanted = os.environ.get("LTK_BENCH_DEVICES")
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d for d in found if not wanted or d in wanted.split(",")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
