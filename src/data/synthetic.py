"""Synthetic(alpha, beta) from Li et al., "Federated Optimization in Heterogeneous Networks"
(FedProx, MLSys 2020), Section 5.1: naturally federated, generated offline."""
import numpy as np
import torch

from src.data.datasets import Dataset
from src.data.device_data import DeviceDataset, FederatedData

DIM, CLASSES = 60, 10


class Synthetic(Dataset):
    """Device k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its model W_k (10x60) and b_k have
    entries ~ N(u_k, 1); its features x ~ N(v_k, Sigma) with v_k[j] ~ N(B_k, 1) and
    Sigma = diag(j^-1.2); labels y = argmax softmax(W_k x + b_k). Device sizes follow a power
    law (lognormal(4, 2) + 50, as in the paper's generator). alpha and beta are used as standard
    deviations, as the paper's code does. `test_fraction` of every device goes to the test set."""

    num_classes, in_shape, flip_invariant = CLASSES, (DIM,), False

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, num_devices: int = 30,
                 test_fraction: float = 0.2, seed: int = 0, max_device_size: int = 0, val_fraction: float = 0.0):
        super().__init__(val_fraction)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if num_devices < 1 or not 0.0 <= test_fraction < 1.0 or max_device_size < 0:
            raise ValueError("need num_devices >= 1, test_fraction in [0, 1) and max_device_size >= 0, got "
                             f"{num_devices}, {test_fraction}, {max_device_size}")
        self.alpha, self.beta, self.num_devices = alpha, beta, num_devices
        self.test_fraction, self.seed, self.max_device_size = test_fraction, seed, max_device_size

    def generate(self) -> list[tuple[np.ndarray, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        sizes = rng.lognormal(4, 2, self.num_devices).astype(np.int64) + 50
        if self.max_device_size:  # optional cap, for short tests; 0 keeps the paper's tail
            sizes = np.minimum(sizes, self.max_device_size)
        u = rng.normal(0, self.alpha, self.num_devices)
        big_b = rng.normal(0, self.beta, self.num_devices)
        std = np.arange(1, DIM + 1, dtype=np.float64) ** -0.6  # sqrt of Sigma's diagonal j^-1.2
        devices = []
        for k in range(self.num_devices):
            w = rng.normal(u[k], 1, (CLASSES, DIM))
            b = rng.normal(u[k], 1, CLASSES)
            v = rng.normal(big_b[k], 1, DIM)
            x = v + rng.standard_normal((sizes[k], DIM)) * std
            y = np.argmax(x @ w.T + b, axis=1)  # softmax is monotone: argmax of the logits
            devices.append((x.astype(np.float32), y.astype(np.int64)))
        return devices

    def load(self, device: torch.device) -> FederatedData:
        xs_tr, ys_tr, xs_te, ys_te, clients = [], [], [], [], []
        offset = 0
        for x, y in self.generate():
            n_test = int(round(self.test_fraction * len(y)))
            n_train = len(y) - n_test
            xs_tr.append(x[:n_train]); ys_tr.append(y[:n_train])
            xs_te.append(x[n_train:]); ys_te.append(y[n_train:])
            clients.append(torch.arange(offset, offset + n_train, device=device))
            offset += n_train
        train = DeviceDataset(torch.from_numpy(np.concatenate(xs_tr)), torch.from_numpy(np.concatenate(ys_tr)), CLASSES)
        test = DeviceDataset(torch.from_numpy(np.concatenate(xs_te)), torch.from_numpy(np.concatenate(ys_te)), CLASSES)
        return FederatedData(train.to(device), test.to(device), self.in_shape, False, clients)
