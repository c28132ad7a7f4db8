"""Held-out data carved from the training set, seeded: the validation split (dataset.val_fraction,
stratified by class, taken before the partition so no client trains on it) and each client's own
test split (clients.test_fraction of its samples, so that it follows the client's distribution)."""
import numpy as np


def stratified_holdout(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) index arrays into `labels`: round(fraction * n_c) samples of every class c are
    held out, drawn at random; both sorted, disjoint and covering every index."""
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        held.append(rng.permutation(members)[:int(round(fraction * len(members)))])
    held = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held, assume_unique=True)
    return kept, held


def client_holdout(indices: list[np.ndarray], fraction: float, rng: np.random.Generator
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Each client's indices split into (train, test): round(fraction * n) of its samples, drawn at
    random, are its test data; a client keeps at least one training sample."""
    train, test = [], []
    for idx in indices:
        held = np.zeros(len(idx), dtype=bool)
        held[rng.permutation(len(idx))[:min(int(round(fraction * len(idx))), len(idx) - 1)]] = True
        test.append(idx[held])
        train.append(idx[~held])  # in the partition's order
    return train, test
