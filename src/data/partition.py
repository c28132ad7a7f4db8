"""Splitting a labelled dataset among clients. All seeded and reproducible.

Label skew, alpha the concentration of a symmetric Dirichlet over the clients or the classes:
- `Dirichlet` (partition=dirichlet, the default): each class is divided among the clients with
  proportions ~ Dir(alpha * 1), as in FedSeq's and NIID-Bench's code (the peers' alpha).
- `DirichletPerClient` (partition=dirichlet_per_client, pfl-research's): each client's class mix
  ~ Dir(alpha * 1), its size given separately.
- `HsuDirichlet` (partition=hsu): Hsu et al. 2019, "Measuring the Effects of Non-Identical Data
  Distribution": a client's class mix ~ Dir(alpha * p), p the class prior, so with 10 balanced
  classes each class has concentration alpha/10. This framework's `dirichlet` before issue 11.
- alpha = 0 in all three: FedSeq's single-class shards (client k holds class k mod C).
- `Pathological` (partition=pathological): McMahan et al. 2017's shards, k classes per client.
Quantity skew (client sizes), for iid, dirichlet_per_client, hsu and the alpha=0 shards: equal,
lognormal(0, size_sigma) or Dir(size_beta) proportions (NIID-Bench's quantity skew)."""
from typing import Optional

import numpy as np

# Draws of a Dirichlet split before giving up on min_size (a draw costs microseconds per class);
# also the swap tries per client of spread_classes.
MAX_DRAWS = 1000


def apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total` in proportion to `weights`: floors, then the remainder to the
    largest fractional parts (first one first among equals)."""
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    frac = share - np.floor(share)
    counts[np.argsort(-frac, kind="stable")[:total - counts.sum()]] += 1
    return counts


def client_sizes(n: int, num_clients: int, size_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Client dataset sizes summing to n: equal when size_sigma == 0, else proportional to
    lognormal(0, size_sigma) draws; every client gets at least one sample."""
    if num_clients > n:
        raise ValueError(f"{num_clients} clients cannot share {n} samples")
    weights = np.ones(num_clients) if size_sigma == 0 else rng.lognormal(0.0, size_sigma, num_clients)
    return 1 + apportion(weights, n - num_clients)


def check_room(n: int, num_clients: int, min_size: int) -> None:
    if num_clients * min_size > n:
        raise ValueError(f"{num_clients} clients of at least min_size={min_size} samples need "
                         f"{num_clients * min_size}, the data has {n}: lower partition.min_size or use fewer clients")


def dirichlet_sizes(n: int, num_clients: int, beta: float, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """NIID-Bench's quantity skew: client sizes in proportion to Dir(beta * 1), redrawn until every
    client has at least min_size samples."""
    check_room(n, num_clients, min_size)
    for _ in range(MAX_DRAWS):
        sizes = apportion(rng.dirichlet(np.full(num_clients, beta)), n)
        if sizes.min() >= min_size:
            return sizes
    raise ValueError(f"{MAX_DRAWS} draws of Dir(size_beta={beta}) client sizes all left a client below "
                     f"min_size={min_size} samples: raise partition.size_beta, lower partition.min_size or use "
                     "fewer clients")


def iid(labels: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(len(labels))
    return np.split(order, np.cumsum(sizes)[:-1])


def by_client_mix(labels: np.ndarray, sizes: np.ndarray, concentration: np.ndarray, rng: np.random.Generator,
                  num_classes: int) -> list[np.ndarray]:
    """Client k draws class proportions q_k ~ Dir(concentration), then its sizes[k] samples by class
    from q_k, without replacement; classes that run out are dropped and q_k renormalised."""
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    left = np.array([len(p) for p in pools])
    used = np.zeros(num_classes, dtype=np.int64)
    clients = []
    for need in sizes:  # sequential: each client draws from what the earlier ones left
        q = rng.dirichlet(concentration)
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


def class_shares(counts: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> Optional[np.ndarray]:
    """One draw of by_class_shares: take[c, k], the class-c samples of client k; None when a class
    finds every open client at proportion 0 (tiny alpha)."""
    n = counts.sum()
    take = np.zeros((len(counts), num_clients), dtype=np.int64)
    held = np.zeros(num_clients, dtype=np.int64)
    for c, count in enumerate(counts):
        p = rng.dirichlet(np.full(num_clients, alpha)) * (held < n / num_clients)
        if p.sum() == 0:
            return None
        # NIID-Bench's cut points, the last one at the end of the class
        cuts = np.append((np.cumsum(p / p.sum()) * count).astype(np.int64)[:-1], count)
        take[c] = np.diff(cuts, prepend=0)
        held += take[c]
    return take


def by_class_shares(labels: np.ndarray, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator,
                    num_classes: int) -> list[np.ndarray]:
    """NIID-Bench's `noniid-labeldir` (utils.partition_data), also FedSeq's: each class c is cut among
    the clients with proportions ~ Dir(alpha * 1); a client already holding n / num_clients samples
    gets no share of the classes that follow (NIID-Bench's balance rule); the whole draw is repeated
    until every client holds at least min_size samples (NIID-Bench: 10), at most MAX_DRAWS times."""
    n = len(labels)
    check_room(n, num_clients, min_size)
    counts = np.bincount(labels, minlength=num_classes)
    for _ in range(MAX_DRAWS):
        take = class_shares(counts, num_clients, alpha, rng)
        if take is not None and take.sum(axis=0).min() >= min_size:
            break
    else:
        raise ValueError(f"{MAX_DRAWS} draws of the per-class Dir(alpha={alpha}) split all left a client below "
                         f"min_size={min_size} samples ({num_clients} clients, {n} samples): lower "
                         "partition.min_size, raise partition.alpha or use fewer clients")
    owner = np.empty(n, dtype=np.int64)
    for c in range(num_classes):
        owner[rng.permutation(np.flatnonzero(labels == c))] = np.repeat(np.arange(num_clients), take[c])
    return np.split(np.argsort(owner, kind="stable"), np.cumsum(take.sum(axis=0))[:-1])


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


def spread_classes(deal: np.ndarray, shard_class: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """deal[i]: client i's shards. A client holding two shards of one class swaps one of them with a
    random shard of a random client, kept when the swap gives it more distinct classes and the other
    client no fewer; at most MAX_DRAWS tries per client. Duplicates can remain where a class has more
    shards than there are clients, and rarely when shards_per_client is close to the number of classes."""
    num_clients, k = deal.shape

    def distinct(i):
        return len(np.unique(shard_class[deal[i]]))

    ordered = np.sort(shard_class[deal], axis=1)
    for i in np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(axis=1)):
        for _ in range(MAX_DRAWS):
            have = distinct(i)
            if have == k:
                break
            first = np.unique(shard_class[deal[i]], return_index=True)[1]
            slot = np.setdiff1d(np.arange(k), first)[0]  # a shard whose class came earlier
            j, other = rng.integers(num_clients), rng.integers(k)
            if j == i:
                continue
            before_j = distinct(j)
            deal[i, slot], deal[j, other] = deal[j, other], deal[i, slot]
            if not (distinct(i) > have and distinct(j) >= before_j):
                deal[i, slot], deal[j, other] = deal[j, other], deal[i, slot]
    return deal


def class_histogram(labels: np.ndarray, clients: list[np.ndarray], num_classes: int) -> np.ndarray:
    return np.stack([np.bincount(labels[idx], minlength=num_classes) for idx in clients])


class IID:
    """Uniformly random split. Client sizes: equal; lognormal(0, size_sigma) when size_sigma > 0;
    Dir(size_beta) proportions when size_beta is set, redrawn until every client has at least
    min_size samples (NIID-Bench's quantity skew; min_size is used only by that draw)."""

    def __init__(self, size_sigma: float = 0.0, size_beta: Optional[float] = None, min_size: int = 10):
        if size_sigma < 0:
            raise ValueError(f"size_sigma must be >= 0, got {size_sigma}")
        if size_beta is not None and not size_beta > 0:
            raise ValueError(f"size_beta must be > 0 (null: no Dirichlet quantity skew), got {size_beta}")
        if size_sigma > 0 and size_beta is not None:
            raise ValueError(f"size_sigma={size_sigma} (lognormal sizes) and size_beta={size_beta} (Dirichlet sizes) "
                             "are two ways to draw client sizes: set one, the other to 0 / null")
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1 (an empty client cannot train), got {min_size}")
        self.size_sigma, self.size_beta, self.min_size = size_sigma, size_beta, min_size

    def sizes(self, n: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        if self.size_beta is not None:
            return dirichlet_sizes(n, num_clients, self.size_beta, self.min_size, rng)
        return client_sizes(n, num_clients, self.size_sigma, rng)

    def split(self, labels: np.ndarray, num_clients: int, num_classes: int,
              rng: np.random.Generator) -> list[np.ndarray]:
        return iid(labels, self.sizes(len(labels), num_clients, rng), rng)


class HsuDirichlet(IID):
    """Hsu et al.'s label skew: client k's class mix ~ Dir(alpha * p), p the class prior (with C
    balanced classes, concentration alpha / C per class); sizes as IID's. alpha = 0: single-class shards."""

    def __init__(self, alpha: float = 0.5, size_sigma: float = 0.0, size_beta: Optional[float] = None,
                 min_size: int = 10):
        super().__init__(size_sigma, size_beta, min_size)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = single-class shards), got {alpha}")
        self.alpha = alpha

    def concentration(self, counts: np.ndarray) -> np.ndarray:
        return self.alpha * (counts / counts.sum())

    def split(self, labels, num_clients, num_classes, rng):
        sizes = self.sizes(len(labels), num_clients, rng)
        if self.alpha == 0:
            return single_class_shards(labels, sizes, num_classes, rng)
        return by_client_mix(labels, sizes, self.concentration(np.bincount(labels, minlength=num_classes)),
                             rng, num_classes)


class DirichletPerClient(HsuDirichlet):
    """pfl-research's label skew: client k's class mix ~ Dir(alpha * 1); sizes as IID's."""

    def concentration(self, counts: np.ndarray) -> np.ndarray:
        return np.full(len(counts), float(self.alpha))


class Dirichlet(IID):
    """The peers' label skew (NIID-Bench, FedSeq): every class divided among the clients with
    proportions ~ Dir(alpha * 1), redrawn until each client has at least min_size samples (see
    by_class_shares). Client sizes come out of that draw, so size_sigma / size_beta are refused
    unless alpha = 0 (FedSeq's single-class shards, cut in proportion to those sizes)."""

    def __init__(self, alpha: float = 0.5, min_size: int = 10, size_sigma: float = 0.0,
                 size_beta: Optional[float] = None):
        super().__init__(size_sigma, size_beta, min_size)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = single-class shards), got {alpha}")
        if alpha > 0 and (size_sigma > 0 or size_beta is not None):
            raise ValueError("partition=dirichlet draws client sizes with the per-class split: quantity skew "
                             "(size_sigma, size_beta) combines with partition=dirichlet_per_client, hsu or iid "
                             "(or alpha=0 shards); leave size_sigma=0, size_beta=null here")
        self.alpha = alpha

    def split(self, labels, num_clients, num_classes, rng):
        if self.alpha == 0:
            return single_class_shards(labels, self.sizes(len(labels), num_clients, rng), num_classes, rng)
        return by_class_shares(labels, num_clients, self.alpha, self.min_size, rng, num_classes)


class Pathological:
    """McMahan et al. 2017's shards: the samples sorted by label (ties in a seeded order), cut into
    num_clients * shards_per_client equal shards (sizes within one), shards_per_client random shards per
    client. McMahan's uniform deal can hand a client two shards of one class (about 1 client in 10 with
    2 shards, 100 clients, 10 classes); here such a client swaps one away (spread_classes), so each
    client holds exactly shards_per_client classes when every shard falls within one class (balanced
    classes, shards a divisor of a class) and shards_per_client <= the number of classes. A shard that
    straddles two classes adds one class to its client."""

    def __init__(self, shards_per_client: int = 2):
        if shards_per_client < 1:
            raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
        self.shards_per_client = shards_per_client

    def split(self, labels, num_clients, num_classes, rng):
        num_shards = num_clients * self.shards_per_client
        if num_shards > len(labels):
            raise ValueError(f"{num_clients} clients x shards_per_client={self.shards_per_client} = {num_shards} "
                             f"shards, more than the {len(labels)} samples: lower partition.shards_per_client")
        order = rng.permutation(len(labels))
        order = order[np.argsort(labels[order], kind="stable")]
        bounds = apportion(np.ones(num_shards), len(labels)).cumsum()
        shards = np.split(order, bounds[:-1])
        shard_class = labels[order[bounds - 1]]  # a shard's last sample's class
        deal = spread_classes(rng.permutation(num_shards).reshape(num_clients, -1), shard_class, rng)
        return [np.concatenate([shards[s] for s in row]) for row in deal]
