"""What the benchmark scripts share."""
import time

import torch


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
