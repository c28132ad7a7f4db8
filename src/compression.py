"""Update compression (config/compression/): a client sends the server a compressed update, with
error feedback where the kind is biased, and the bytes each update would take are counted;
`compression=none` changes nothing (and counts nothing).

Every kind compresses Delta = w_i - G tensor by tensor (each trainable tensor flattened on its own: a
QSGD bucket, a sign scale and a top-k budget per tensor), G the global model the round started from
and w_i what the client trained; the server receives G + C(Delta). Buffers (BatchNorm statistics) and
the update's payloads (update.extra: SCAFFOLD's control change) are sent as they are. With error
feedback (Stich et al., "Sparsified SGD with Memory", NeurIPS 2018; Karimireddy et al., "Error
Feedback Fixes SignSGD", ICML 2019) the client compresses p = Delta + e_i and keeps e_i <- p - C(p),
what it did not send, for its next round, in the client state store under RESIDUAL: it persists
across the client's rounds, lives where client.state_store says, is saved in resume.pt and is
forgotten with the rest of a dropped (non-finite) client's round. A FedSeq superclient's residual is
its sender's (the chain's last client). n is a tensor's number of entries, k = ceil(fraction * n):
- top_k: the k entries of p of largest magnitude; error feedback on by default.
- random_k: k entries drawn uniformly without replacement from a generator of (seed, round, client)
  (stream COMPRESSION_INDICES), scaled by n / k so that E[C(x)] = x (`unbiased=false`: unscaled, a
  contraction that error feedback can use; the scaled one is not and refuses it).
- qsgd (Alistarh et al., NeurIPS 2017): entry j becomes ||x||_2 sign(x_j) l_j / s, l_j the stochastic
  rounding of s |x_j| / ||x||_2 to one of the integers 0..s (E = x), noise from stream QSGD_ROUNDING.
  `bits` = b is everything an entry takes, its sign included, so s = 2^(b-1) - 1: b = 2 is ternary
  (s = 1), b = 8 has s = 127 (sign and level in one int8).
- sign (Karimireddy et al. 2019, EF-SignSGD): ||p||_1 / n * sign(p), with sign(0) = +1 (one bit has
  no zero); error feedback on by default.

Bytes, counted per update from shapes alone (no host sync) and reported per round in metrics.jsonl,
summed over the run in results.json: bytes_up, what the round's updates would take on the wire, per
compressed tensor top_k 4k (float32 values) + 4k (int32 indices), random_k 4k (values only: the server
can run the generator of (seed, round, client) for the indices), qsgd ceil(b n / 8) + 4 (the float32
norm), sign ceil(n / 8) + 4 (the scale), and buffers and payloads at their dtype's size;
bytes_up_uncompressed, the same update as FedAvg sends it (32-bit floats); bytes_down, what the
server's broadcast (send_data: the global model, SCAFFOLD's control) takes, once per update. An update
is a chain's (a FedSeq superclient's counts once); a client that drops out before training sends and
receives nothing, one dropped as non-finite is counted (it was sent).

The broadcast (`broadcast.bits`, off by default) can be compressed too, the way Caldas et al.
("Expanding the Reach of Federated Learning by Reducing Client Resource Requirements", 2018) compress
the server-to-client model: with partial participation a client selected now missed the broadcasts
of the rounds it sat out, so what is sent is the model itself, not a delta. Each trainable tensor of G
is quantized stochastically to `bits` bits (QSGD's rounding with the max-norm as scale: unbiased, one
draw per round from stream BROADCAST_ROUNDING, the same model for every client of the round); the
client trains from that Q(G), and its update counts from where it started: the first client-side
transform turns w_i into G + (w_i - Q(G)), so the attack, the uplink compression and DP's clip all
see the client's own change. bytes_down then counts ceil(b n / 8) + 4 per tensor. With
compression=none the uplink is sent as it is and counted at float32."""
import math
from fractions import Fraction
from typing import Optional

import torch

from src.client.client import ClientUpdate
from src.hooks import RoundHook
from src.transforms import UpdateTransform
from src.utils.seeding import BROADCAST_ROUNDING, COMPRESSION_INDICES, QSGD_ROUNDING, torch_generator

RESIDUAL = "compression_residual"  # the client state store's entry for the error-feedback residual
INDEX_BYTES = VALUE_BYTES = 4  # int32 indices, float32 values and scales


def nbytes(obj) -> int:
    """The bytes the tensors in `obj` (nested dicts, lists and tuples) take at their dtypes' sizes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


class NoCompression:
    """compression=none: updates are sent as trained, and nothing is counted."""

    def check(self, cfg) -> list[str]:
        return []

    def install(self, algo) -> None:
        pass

    def totals(self, history: list[dict]) -> dict:
        return {}


class Compressor(UpdateTransform):
    """What every kind shares: the delta, the residual, the bytes. A kind defines compress()."""

    name = "compression"
    stream: Optional[int] = None  # the seeding stream of a randomized kind
    broadcast: Optional["Broadcast"] = None  # the compressed broadcast, when broadcast.bits is set

    def __init__(self, error_feedback: bool = False):
        self.error_feedback = error_feedback

    def check(self, cfg) -> list[str]:
        """Problems with the run's other settings, found at start-up (src/config.py)."""
        return []

    def install(self, algo) -> None:
        """Called once by FedBase, after its attack: an attacker's update is compressed like any other."""
        # `center`, the CenterServer (an UpdateTransform's `server` is its server-side method)
        self.seed, self.center, self.params = algo.cfg.seed, algo.server, list(algo.setup.param_names)
        self.round = lambda: algo.round  # the round being trained, from 0
        self.meter = BytesMeter()
        algo.hooks.insert(0, self.meter)  # before the recorder writes the round's metrics
        algo.transforms.append(self)

    def compress(self, x: torch.Tensor, gen: Optional[torch.Generator]) -> tuple[torch.Tensor, int]:
        """C(x) of a flat tensor, and the bytes it takes."""
        raise NotImplementedError

    def client(self, update: ClientUpdate, client_id: int, store) -> ClientUpdate:
        g = self.center.global_state  # the round's start: unchanged until the round is aggregated
        residual = store.get(client_id).get(RESIDUAL, {}) if self.error_feedback else {}
        device = g[self.params[0]].device
        gen = None if self.stream is None else torch_generator(device, self.seed, self.stream, self.round(), client_id)
        sent, kept, size = {}, {}, 0
        for k in self.params:  # a fixed order: a randomized kind's draws are a function of (seed, round, client)
            p = update.state[k] - g[k]
            if k in residual:
                p += residual[k]
            c, n = self.compress(p.flatten(), gen)
            c = c.view_as(p)
            sent[k], size = g[k] + c, size + n
            if self.error_feedback:
                kept[k] = p - c
        if self.error_feedback:
            store.update(client_id, {RESIDUAL: kept})
        as_is = nbytes({k: v for k, v in update.state.items() if k not in sent}) + nbytes(update.extra)
        down = nbytes(self.center.send_data()) if self.broadcast is None else self.broadcast.nbytes()
        self.meter.add(up=size + as_is, up_uncompressed=nbytes(update.state) + nbytes(update.extra), down=down)
        return update._replace(state={**update.state, **sent})

    def totals(self, history: list[dict]) -> dict:
        """The run's sums of the per-round counts, for results.json."""
        return {key: sum(m.get(key, 0) for m in history) for key in BytesMeter.KEYS}


def budget(fraction: float, n: int) -> int:
    """k = ceil(fraction * n), at least 1, with the fraction read as the decimal it was written as
    (0.01 * 300 is 3.0000000000000004 in floating point: 3 entries, not 4)."""
    return max(1, min(n, math.ceil(Fraction(repr(fraction)) * n)))


def check_fraction(fraction: float) -> None:
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction is the share of each tensor's entries sent, in (0, 1], got {fraction}")


class TopK(Compressor):
    name = "top_k"

    def __init__(self, fraction: float = 0.01, error_feedback: bool = True):
        super().__init__(error_feedback)
        check_fraction(fraction)
        self.fraction = fraction

    def compress(self, x, gen):
        k = budget(self.fraction, x.numel())
        idx = x.abs().topk(k, sorted=False).indices
        return torch.zeros_like(x).index_copy_(0, idx, x[idx]), (VALUE_BYTES + INDEX_BYTES) * k


class RandomK(Compressor):
    name = "random_k"
    stream = COMPRESSION_INDICES

    def __init__(self, fraction: float = 0.01, unbiased: bool = True, error_feedback: bool = False):
        super().__init__(error_feedback)
        check_fraction(fraction)
        self.fraction, self.unbiased = fraction, unbiased

    def check(self, cfg) -> list[str]:
        if self.unbiased and self.error_feedback:
            return ["compression.error_feedback: random_k with unbiased=true scales what it keeps by n / k, so the "
                    "part it does not send is larger than the update and error feedback's residual grows round after "
                    "round: set compression.unbiased=false (unscaled, a contraction) or compression.error_feedback=false"]
        return []

    def compress(self, x, gen):
        n = x.numel()
        k = budget(self.fraction, n)
        idx = torch.randperm(n, generator=gen, device=x.device)[:k]
        values = x[idx] * (n / k) if self.unbiased else x[idx]
        return torch.zeros_like(x).index_copy_(0, idx, values), VALUE_BYTES * k


class Identity(Compressor):
    """compression=none beside a compressed broadcast: the update is sent as it is, and counted."""

    name = "none"

    def compress(self, x, gen):
        return x, VALUE_BYTES * x.numel()


class QSGD(Compressor):
    name = "qsgd"
    stream = QSGD_ROUNDING

    def __init__(self, bits: int = 8, error_feedback: bool = False, norm: str = "l2"):
        super().__init__(error_feedback)
        if not 2 <= bits <= 32:
            raise ValueError(f"bits is what one entry takes, its sign included, in [2, 32] (2: ternary), got {bits}")
        if norm not in ("l2", "max"):
            raise ValueError(f"norm is the scale the levels divide: l2 (QSGD's) or max (the largest magnitude), "
                             f"got {norm!r}")
        self.bits, self.norm = bits, norm
        self.levels = 2 ** (bits - 1) - 1  # s: the level l in 0..s and the sign fit in `bits` bits

    def compress(self, x, gen):
        s = self.levels
        # l2: QSGD's; max spreads the levels over the entries' range (a model's weights, not a sparse delta)
        norm = torch.linalg.vector_norm(x) if self.norm == "l2" else x.abs().max()
        # |x_j| / ||x|| <= 1, but rounding can pass it by an ulp: clamp so that no level exceeds s
        r = (x.abs() / norm.clamp_min(torch.finfo(x.dtype).tiny) * s).clamp_(max=s)
        low = r.floor()
        level = low + (torch.rand(r.shape, generator=gen, device=x.device, dtype=r.dtype) < r - low)
        return x.sign() * level * (norm / s), math.ceil(self.bits * x.numel() / 8) + VALUE_BYTES


class Sign(Compressor):
    name = "sign"

    def __init__(self, error_feedback: bool = True):
        super().__init__(error_feedback)

    def compress(self, x, gen):
        scale = x.abs().mean()  # ||x||_1 / n
        return torch.where(x >= 0, scale, -scale), math.ceil(x.numel() / 8) + VALUE_BYTES


class Broadcast(UpdateTransform):
    """The server's broadcast quantized to `bits` bits per entry (see the module's docstring)."""

    def __init__(self, bits: int):
        self.quantizer = QSGD(bits, norm="max")
        self._sent: Optional[tuple] = None  # (round, the global state quantized, what was quantized)

    def install(self, algo) -> None:
        """Called once by FedBase, after the uplink compression, before DP."""
        self.seed, self.center, self.params = algo.cfg.seed, algo.server, list(algo.setup.param_names)
        self.round = lambda: algo.round
        algo.send_data = self.send
        algo.transforms.insert(0, self)  # first: every later transform sees the update relative to G
        if not isinstance(algo.compression, Compressor):
            algo.compression = Identity()
            algo.compression.install(algo)
        algo.compression.broadcast = self

    def quantized(self) -> dict[str, torch.Tensor]:
        """Q(G) of this round's global model, drawn once per round."""
        g = self.center.global_state
        if self._sent is None or self._sent[0] != self.round() or self._sent[2] is not g:
            gen = torch_generator(g[self.params[0]].device, self.seed, BROADCAST_ROUNDING, self.round())
            q = {k: self.quantizer.compress(g[k].flatten(), gen)[0].view_as(g[k]) for k in self.params}
            self._sent = (self.round(), {**g, **q}, g)
        return self._sent[1]

    def send(self) -> dict:
        return {**self.center.send_data(), "global_state": self.quantized()}

    def nbytes(self) -> int:
        """What one client receives: the quantized tensors, and the rest of send_data as it is."""
        data = self.center.send_data()
        g = data["global_state"]
        quantized = sum(math.ceil(self.quantizer.bits * g[k].numel() / 8) + VALUE_BYTES for k in self.params)
        rest = {**data, "global_state": {k: v for k, v in g.items() if k not in set(self.params)}}
        return quantized + nbytes(rest)

    def client(self, update: ClientUpdate, client_id: int, store) -> ClientUpdate:
        g, q = self.center.global_state, self.quantized()
        return update._replace(state={**update.state, **{k: g[k] + (update.state[k] - q[k]) for k in self.params}})


def install_broadcast(algo, bits: Optional[int]) -> Optional[Broadcast]:
    """The `broadcast:` settings into FedBase `algo` (None with broadcast.bits=null)."""
    if bits is None:
        return None
    broadcast = Broadcast(bits)
    broadcast.install(algo)
    return broadcast


class BytesMeter(RoundHook):
    """The round's byte counts, added to its metrics."""

    KEYS = ("bytes_up", "bytes_up_uncompressed", "bytes_down")

    def __init__(self):
        self.on_round_start()

    def on_round_start(self) -> None:
        self.counts = dict.fromkeys(self.KEYS, 0)

    def add(self, up: int, up_uncompressed: int, down: int) -> None:
        for key, n in zip(self.KEYS, (up, up_uncompressed, down)):
            self.counts[key] += n

    def on_round_end(self, metrics: dict) -> None:
        metrics.update(self.counts)
