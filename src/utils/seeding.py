"""Randomness as a pure function of (seed, purpose, round, client): order-independent and resumable."""
import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


def numpy_rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def torch_generator(device: torch.device, *keys: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*keys))


# Purposes, so that streams for different uses never coincide.
PARTITION, SELECTION, CLIENT_DATA, INIT = range(4)
VALIDATION, CLIENT_TEST, FINETUNE = 4, 5, 6  # held-out splits (src/data/holdout.py), fine-tuning evaluation
MALICIOUS, ATTACK_NOISE = 7, 8  # src/attacks.py: who the attackers are, Gaussian attack noise
DROPOUT, SPEED = 9, 10  # src/system.py: which selected clients fail to report, client speeds
DP_NOISE, DP_CLIP_NOISE = 11, 12  # src/privacy.py: noise on the sum of clipped updates, on the unclipped count
COMPRESSION_INDICES, QSGD_ROUNDING = 13, 14  # src/compression.py: random-k's entries, QSGD's rounding
SECAGG_KEYS, SECAGG_DROPOUT, SECAGG_SHARES = 15, 16, 17  # src/secagg.py: client secrets, dropouts, shares
LOCAL_DP_NOISE = 18  # src/local_dp.py: DP-SGD's noise on each client's steps
BROADCAST_ROUNDING = 19  # src/compression.py: the quantized broadcast's rounding


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
