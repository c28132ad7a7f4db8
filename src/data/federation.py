"""The federation's data: which training samples each client holds, which it keeps as its own test
data (clients.test_fraction) and which form the validation split (dataset.val_fraction). The
validation split is taken first, so no client ever holds it; the clients' test data come out of
their own samples. All of it is a function of the seed."""
import csv
import io
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig

from src.data.device_data import FederatedData
from src.data.holdout import client_holdout, stratified_holdout
from src.data.partition import class_histogram
from src.errors import ConfigError
from src.utils.seeding import CLIENT_TEST, PARTITION, VALIDATION, numpy_rng

log = logging.getLogger(__name__)


@dataclass
class Federation:
    train: list[np.ndarray]  # each client's training samples (indices into the training set)
    test: Optional[list[np.ndarray]]  # each client's own held-out samples, with clients.test_fraction
    val: Optional[np.ndarray]  # the validation split, with dataset.val_fraction


def split_federation(data: FederatedData, spec, cfg: DictConfig) -> Federation:
    labels = data.train.y.cpu().numpy()
    val_fraction = getattr(spec, "val_fraction", 0.0)
    pool, held = (stratified_holdout(labels, val_fraction, numpy_rng(cfg.seed, VALIDATION))
                  if val_fraction else (None, None))
    if data.natural_clients is not None:
        parts = [idx.cpu().numpy() for idx in data.natural_clients]
        if held is not None:
            parts = [p[~np.isin(p, held)] for p in parts]
        log.info("%s is naturally federated: %d clients, partition settings unused", type(spec).__name__, len(parts))
    else:
        try:
            parts = instantiate(cfg.partition).split(labels if pool is None else labels[pool], cfg.clients.total,
                                                     spec.num_classes, numpy_rng(cfg.seed, PARTITION))
        except ValueError as e:
            raise ConfigError([f"partition: {e}"]) from None
        if pool is not None:
            parts = [pool[p] for p in parts]
    test = None
    if cfg.clients.test_fraction:
        parts, test = client_holdout(parts, cfg.clients.test_fraction, numpy_rng(cfg.seed, CLIENT_TEST))
    return Federation(parts, test, held)


def histogram_csv(labels: np.ndarray, clients: list[np.ndarray], num_classes: int) -> str:
    """The samples of each class each client holds, as CSV (client_class_histogram.csv)."""
    text = io.StringIO()
    w = csv.writer(text)
    w.writerow(["client"] + [f"class_{c}" for c in range(num_classes)])
    w.writerows([i] + row for i, row in enumerate(class_histogram(labels, clients, num_classes).tolist()))
    return text.getvalue()
