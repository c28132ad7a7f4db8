"""Splitting a labelled dataset among clients: IID, Dirichlet label skew (Hsu et al. 2019,
"Measuring the Effects of Non-Identical Data Distribution"), and FedSeq's alpha=0 convention
(every client holds a shard of a single class). All seeded and reproducible."""
import numpy as np


def client_sizes(n: int, num_clients: int, size_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Client dataset sizes summing to n: equal when size_sigma == 0, else proportional to
    lognormal(0, size_sigma) draws; every client gets at least one sample."""
    if num_clients > n:
        raise ValueError(f"{num_clients} clients cannot share {n} samples")
    if size_sigma == 0:
        weights = np.ones(num_clients)
    else:
        weights = rng.lognormal(0.0, size_sigma, num_clients)
    extra = n - num_clients
    sizes = 1 + np.floor(weights / weights.sum() * extra).astype(np.int64)
    short = n - sizes.sum()  # hand out the rounding remainder to the largest fractional parts
    frac = weights / weights.sum() * extra - np.floor(weights / weights.sum() * extra)
    sizes[np.argsort(-frac, kind="stable")[:short]] += 1
    return sizes


def iid(labels: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(len(labels))
    return np.split(order, np.cumsum(sizes)[:-1])


def dirichlet(labels: np.ndarray, sizes: np.ndarray, alpha: float, rng: np.random.Generator,
              num_classes: int) -> list[np.ndarray]:
    """Hsu et al.: client k draws class proportions q_k ~ Dir(alpha * p), p the class prior, then
    its sizes[k] samples by class from q_k; classes that run out are dropped and q_k renormalised."""
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    left = np.array([len(p) for p in pools])
    used = np.zeros(num_classes, dtype=np.int64)
    prior = left / left.sum()
    clients = []
    for need in sizes:
        q = rng.dirichlet(alpha * prior) if alpha > 0 else prior
        take = np.zeros(num_classes, dtype=np.int64)
        while need > 0:
            room = left - take
            p = q * (room > 0)
            p = p / p.sum() if p.sum() > 0 else (room > 0) / (room > 0).sum()
            draw = np.minimum(rng.multinomial(need, p), room)
            take += draw
            need -= draw.sum()
        clients.append(np.concatenate([pools[c][used[c]:used[c] + take[c]] for c in range(num_classes)]))
        used += take
        left -= take
    return clients


def single_class_shards(labels: np.ndarray, sizes: np.ndarray, num_classes: int,
                        rng: np.random.Generator) -> list[np.ndarray]:
    """FedSeq's alpha=0: client k gets class k mod C; each class's samples (sorted by label, in a
    seeded order) are cut among its clients in proportion to their sizes."""
    num_clients = len(sizes)
    if num_clients < num_classes:
        raise ValueError(f"single-class shards need at least one client per class: "
                         f"{num_clients} clients < {num_classes} classes")
    clients: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * num_clients
    for c in range(num_classes):
        members = np.arange(c, num_clients, num_classes)
        pool = rng.permutation(np.flatnonzero(labels == c))
        if len(pool) < len(members):
            raise ValueError(f"class {c} has {len(pool)} samples for {len(members)} single-class clients: "
                             "use fewer clients or alpha > 0")
        # every client gets at least one sample, the rest in proportion to its size
        share = np.floor(np.cumsum(sizes[members]) / sizes[members].sum() * (len(pool) - len(members)))
        cut = share.astype(np.int64) + np.arange(1, len(members) + 1)
        for k, part in zip(members, np.split(pool, cut[:-1])):
            clients[k] = part
    return clients


def class_histogram(labels: np.ndarray, clients: list[np.ndarray], num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in clients])


class IID:
    """Uniformly random split; `size_sigma` > 0 gives lognormal client sizes."""

    def __init__(self, size_sigma: float = 0.0):
        if size_sigma < 0:
            raise ValueError(f"size_sigma must be >= 0, got {size_sigma}")
        self.size_sigma = size_sigma

    def split(self, labels: np.ndarray, num_clients: int, num_classes: int,
              rng: np.random.Generator) -> list[np.ndarray]:
        return iid(labels, client_sizes(len(labels), num_clients, self.size_sigma, rng), rng)


class Dirichlet(IID):
    """Label skew Dir(alpha); alpha = 0 means FedSeq's single-class shards."""

    def __init__(self, alpha: float = 0.5, size_sigma: float = 0.0):
        super().__init__(size_sigma)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = single-class shards), got {alpha}")
        self.alpha = alpha

    def split(self, labels, num_clients, num_classes, rng):
        sizes = client_sizes(len(labels), num_clients, self.size_sigma, rng)
        if self.alpha == 0:
            return single_class_shards(labels, sizes, num_classes, rng)
        return dirichlet(labels, sizes, self.alpha, rng, num_classes)
