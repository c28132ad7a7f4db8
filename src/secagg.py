"""Secure aggregation (the `secagg:` settings): Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS 2017, Sec. 4 (the semi-honest protocol), simulated in one
process with the cryptographic arithmetic done for real.

What each client sends is computed from its own update and its own secrets only; the server side
(`unmask`) receives masked vectors y_u and Shamir shares, never an update x_u.
- Field: updates live in Z_m, m = 2^32 (int64 tensors reduced with & (m - 1)). x_u is the update
  w_u - G (every floating-point entry, trainable or buffer), each coordinate clipped to
  [-clip, clip] and rounded to the grid 2^-scale_bits, as a two's complement residue. The sum over
  the survivors decodes exactly while n * (clip * 2^scale_bits + 1) < 2^31 (checked at start).
  Rounding to nearest: each coordinate of the mean is within 2^-(scale_bits + 1) of the plain mean
  (7.6e-6 at scale_bits=16), clipped coordinates aside (counted: secagg_clipped).
- Key agreement: Diffie-Hellman in Z_p*, p = 2^127 - 1 (a Mersenne prime, generator 3): the
  arithmetic is real, the group is toy-sized (deployments use X25519). Client u draws sk_u and b_u
  (seeding stream SECAGG_KEYS, per seed, round and client) and publishes pk_u = 3^sk_u mod p;
  s_uv = pk_v^sk_u = pk_u^sk_v mod p seeds the pair's PRG.
- Masks: y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) (mod m), over every
  client v that took part in the key exchange, so the pairwise masks cancel in the sum. The PRG is
  torch's Philox/MT generator seeded from the secret (uniform on Z_m).
- Dropout recovery: u splits sk_u and b_u into t-of-n Shamir shares over Z_p (polynomial
  coefficients from stream SECAGG_SHARES, share x-coordinates client id + 1) and gives one of each
  to every other client. Survivors reveal, for a client whose masked input never arrived, its sk_u
  share (the server recomputes s_uv with the survivors' public keys and removes u's pairwise
  masks), and for a client whose input arrived, its b_u share (the server removes its self-mask);
  never both for the same client.
- Dropouts (stream SECAGG_DROPOUT, per seed, round, phase and client): `dropout_upload` is the
  probability that a client drops after masking, before its y_u reaches the server (its update
  is lost, its pairwise masks are recovered); `dropout_unmask` that one whose y_u arrived drops
  before revealing its shares. Clients that system.dropout leaves out never join the round.
  Fewer than t clients at either point: the round aborts, the global model stays as it was
  (a warning, secagg_aborted: 1).
The server divides the unmasked sum by the number of clients whose input it holds: FedAvg with
uniform weights, so sample weighting is refused (algo=fairavg). Each round's secrets are a pure
function of (seed, round, client): nothing to checkpoint, resume is bit for bit.

With central DP (dp.enabled, src/privacy.py) the two compose the way DP-FedAvg is deployed: clients
clip before masking, each appends its unclipped bit b_i as one more coordinate (adaptive clipping's
count is summed securely too), and the server adds DP's Gaussian noise to the unmasked sum and
divides by the fixed m, DP's estimator: the server learns the sum of the clipped updates, never one
of them, and what it releases is noised. The noise is the one DP alone would draw, so the result
differs from DP without secagg only by the quantization."""
import logging
from typing import NamedTuple, Optional

import numpy as np
import torch

from src.client.client import ClientUpdate
from src.errors import ConfigError
from src.hooks import RoundHook
from src.server.robust import Mean
from src.utils.seeding import SECAGG_DROPOUT, SECAGG_KEYS, SECAGG_SHARES, derive_seed, numpy_rng

log = logging.getLogger(__name__)

MODULUS_BITS = 32  # the field of the masked vectors, Z_{2^32}
MASK = (1 << MODULUS_BITS) - 1
PRIME = (1 << 127) - 1  # Shamir shares and Diffie-Hellman
GENERATOR = 3


# ---- Shamir secret sharing over Z_PRIME ----------------------------------------------------------
def share(secret: int, t: int, xs: list[int], coefficients: list[int], prime: int = PRIME) -> dict[int, int]:
    """Shares f(x) for x in `xs` of f(x) = secret + c_1 x + ... + c_{t-1} x^{t-1} mod prime."""
    assert len(coefficients) == t - 1 and 0 not in xs
    poly = [secret, *coefficients]
    shares = {}
    for x in xs:
        y = 0
        for c in reversed(poly):  # Horner
            y = (y * x + c) % prime
        shares[x] = y
    return shares


def reconstruct(shares: dict[int, int], prime: int = PRIME) -> int:
    """f(0) from shares {x: f(x)} (Lagrange interpolation at 0): the secret, given at least t shares."""
    secret = 0
    for xj, yj in shares.items():
        num = den = 1
        for xm in shares:
            if xm != xj:
                num = num * xm % prime
                den = den * (xm - xj) % prime
        secret = (secret + yj * num * pow(den, -1, prime)) % prime
    return secret


# ---- the field Z_{2^32} ---------------------------------------------------------------------------
def quantize(x: torch.Tensor, clip: float, scale_bits: int) -> tuple[torch.Tensor, int]:
    """x (float, any shape) clipped to [-clip, clip] and rounded to multiples of 2^-scale_bits, as
    residues mod 2^32 (int64); and how many coordinates were clipped."""
    clipped = int((x.abs() > clip).sum())
    q = torch.round(x.double().clamp(-clip, clip) * (1 << scale_bits)).to(torch.int64)
    return q & MASK, clipped


def dequantize(z: torch.Tensor, scale_bits: int) -> torch.Tensor:
    """A residue mod 2^32 read as a signed integer in [-2^31, 2^31), times 2^-scale_bits (float64)."""
    signed = torch.where(z >= 1 << (MODULUS_BITS - 1), z - (1 << MODULUS_BITS), z)
    return signed.double() / (1 << scale_bits)


def prg(secret: int, size: int, device: torch.device) -> torch.Tensor:
    """`size` uniform residues mod 2^32 expanded from `secret` (any non-negative int)."""
    words = [(secret >> (32 * k)) & MASK for k in range(4)]
    gen = torch.Generator(device=device).manual_seed(derive_seed(*words))
    return torch.randint(0, 1 << MODULUS_BITS, (size,), generator=gen, device=device, dtype=torch.int64)


def _field_int(rng: np.random.Generator, below: int) -> int:
    return int.from_bytes(rng.bytes(16), "little") % below


# ---- the protocol -----------------------------------------------------------------------------------
class ClientKeys(NamedTuple):
    sk: int  # Diffie-Hellman secret key
    pk: int
    b: int  # self-mask seed


def client_keys(seed: int, round_idx: int, client: int) -> ClientKeys:
    rng = numpy_rng(seed, SECAGG_KEYS, round_idx, client)
    sk = _field_int(rng, PRIME - 2) + 1
    return ClientKeys(sk, pow(GENERATOR, sk, PRIME), _field_int(rng, PRIME))


def agree(sk: int, other_pk: int) -> int:
    return pow(other_pk, sk, PRIME)


class Outcome(NamedTuple):
    total: Optional[torch.Tensor]  # the unmasked sum mod 2^32 of the inputs received (None: aborted)
    received: dict[int, torch.Tensor]  # what the server was sent: the masked vectors, by client
    lost_upload: list[int]  # dropped after masking, before their masked vector arrived
    lost_unmask: list[int]  # sent their masked vector, dropped before revealing shares
    reason: str = ""  # why the round aborted


def secure_sum(inputs: dict[int, torch.Tensor], seed: int, round_idx: int, t: int,
               lost_upload: frozenset = frozenset(), lost_unmask: frozenset = frozenset()) -> Outcome:
    """One run of the protocol over the clients' quantized inputs (residues mod 2^32, one flat
    int64 tensor each, by client id); `lost_upload` and `lost_unmask` drop out at those points."""
    ids = sorted(inputs)
    n = len(ids)
    some = next(iter(inputs.values()))
    size, device = some.numel(), some.device
    if n < t:
        return Outcome(None, {}, [], [], f"{n} clients joined the round, fewer than the threshold t={t}")
    # AdvertiseKeys: every client publishes pk_u
    keys = {u: client_keys(seed, round_idx, u) for u in ids}
    public = {u: keys[u].pk for u in ids}
    # ShareKeys: u's shares of sk_u and b_u, the one for v held by v (x-coordinate v + 1)
    xs = [v + 1 for v in ids]
    held: dict[int, dict[int, tuple[int, int]]] = {v: {} for v in ids}  # v -> u -> (share of sk_u, of b_u)
    for u in ids:
        rng = numpy_rng(seed, SECAGG_SHARES, round_idx, u)
        sk_shares = share(keys[u].sk, t, xs, [_field_int(rng, PRIME) for _ in range(t - 1)])
        b_shares = share(keys[u].b, t, xs, [_field_int(rng, PRIME) for _ in range(t - 1)])
        for v in ids:
            held[v][u] = (sk_shares[v + 1], b_shares[v + 1])
    # MaskedInputCollection: each client masks its own input with its own secrets
    sent = [u for u in ids if u not in lost_upload]
    received = {u: masked_input(u, inputs[u], keys[u], public) for u in sent}
    lost_up = [u for u in ids if u in lost_upload]
    if len(received) < t:
        return Outcome(None, received, lost_up, [], f"{len(received)} masked inputs arrived, fewer than t={t}")
    # Unmasking: the survivors reveal b-shares of the clients whose input arrived, sk-shares of the others
    survivors = [v for v in sent if v not in lost_unmask]
    lost_un = [u for u in sent if u in lost_unmask]
    if len(survivors) < t:
        return Outcome(None, received, lost_up, lost_un, f"{len(survivors)} clients were left to unmask, fewer "
                                                         f"than t={t}")
    revealed = {u: {v + 1: held[v][u][0 if u in lost_upload else 1] for v in survivors[:t]} for u in ids}
    return Outcome(unmask(received, revealed, public, lost_up, size, device), received, lost_up, lost_un)


def masked_input(u: int, x: torch.Tensor, keys: ClientKeys, public: dict[int, int]) -> torch.Tensor:
    """Client u's y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv) mod 2^32."""
    y = x + prg(keys.b, x.numel(), x.device)
    for v, pk in public.items():
        if v != u:
            mask = prg(agree(keys.sk, pk), x.numel(), x.device)
            y = y + mask if u < v else y - mask
    return y & MASK


def unmask(received: dict[int, torch.Tensor], revealed: dict[int, dict[int, int]], public: dict[int, int],
           lost_upload: list[int], size: int, device: torch.device) -> torch.Tensor:
    """The server: the sum of the received masked vectors, less the self-masks of their senders and
    the pairwise masks they share with the clients whose input was lost, all rebuilt from t shares."""
    total = torch.stack(list(received.values())).sum(0)
    for u in received:
        total -= prg(reconstruct(revealed[u]), size, device)
    for u in lost_upload:
        sk = reconstruct(revealed[u])
        for v in received:  # v's y_v holds +PRG(s_vu) if v < u, -PRG(s_vu) if v > u
            mask = prg(agree(sk, public[v]), size, device)
            total = total - mask if v < u else total + mask
    return total & MASK


# ---- in the framework -------------------------------------------------------------------------------
class SecureAggregation(RoundHook):
    """The server's intercept (CenterServer.intercept): the round's updates become quantized deltas,
    go through secure_sum, and come back as one update, G + the unmasked mean delta; also the
    round hook that records secagg_* metrics."""

    def __init__(self, seed: int, threshold: Optional[int], scale_bits: int, clip: float,
                 dropout_upload: float, dropout_unmask: float):
        self.seed, self.threshold, self.scale_bits, self.clip = seed, threshold, scale_bits, clip
        self.dropout = (dropout_upload, dropout_unmask)
        self.stats: dict = {}
        self.dp = None  # central DP, when install finds it

    def t(self, n: int) -> int:
        """The Shamir threshold for a round that n clients join: secagg.threshold or a majority."""
        return self.threshold if self.threshold is not None else n // 2 + 1

    def install(self, algo) -> None:
        server = algo.server
        problems = []
        if server.weighting != "uniform":
            problems.append("secagg: the server only learns the sum of the updates, so it averages them uniformly; "
                            f"algo.server.weighting={server.weighting!r} weighs by samples: use algo=fairavg (or "
                            "algo.server.weighting=uniform)")
        if server.needs_all_updates or server.summed_extras or not isinstance(server.aggregator, Mean):
            problems.append(f"secagg: {type(server).__name__} with aggregator {type(server.aggregator).__name__} "
                            "needs more than the sum of the client models, which is all secure aggregation reveals: "
                            "use aggregator=mean with FedAvg-style servers (algo=fairavg, fedadam, ...)")
        if server.intercept is not None:
            problems.append("secagg: another component (attack=alie) already reads the round's individual updates "
                            "at the server: secure aggregation hides them, use another attack or secagg.enabled=false")
        if not algo.clients_are_devices:
            problems.append(f"secagg: {type(algo).__name__} does not send one update per client: use a FedAvg-style "
                            "algorithm")
        if problems:
            raise ConfigError(problems)
        self.server, self.round, self.num_clients = server, lambda: algo.round, len(algo.clients)
        self.dp = algo.dp  # central DP, installed before: its noise goes on the secure sum
        if self.dp is not None:
            self.dp.secure = True
        server.intercept = self.aggregate
        algo.hooks.insert(0, self)  # before the recorder writes the round's metrics

    def aggregate(self, updates: list[ClientUpdate]) -> list[ClientUpdate]:
        if not updates:
            return updates
        g = self.server.global_state
        floats = [k for k, v in g.items() if v.is_floating_point()]
        round_idx = self.round()
        deltas = torch.stack([torch.cat([(u.state[k] - g[k]).flatten() for k in floats]) for u in updates])
        if self.dp is not None:  # each client's unclipped bit b_i, summed with its update
            bits = torch.stack([self.dp.unclipped(u.sender) for u in updates]).to(deltas.dtype)
            deltas = torch.cat([deltas, bits.view(-1, 1)], dim=1)
        quantized, clipped = quantize(deltas, self.clip, self.scale_bits)
        ids = [u.sender for u in updates]
        lost = [self.lost(phase, round_idx, ids) for phase in (0, 1)]
        t = self.t(len(ids))
        outcome = secure_sum(dict(zip(ids, quantized)), self.seed, round_idx, t, *lost)
        self.stats = {"secagg_clients": len(ids), "secagg_threshold": t, "secagg_lost_upload": len(outcome.lost_upload),
                      "secagg_lost_unmask": len(outcome.lost_unmask), "secagg_clipped": clipped,
                      "secagg_aborted": int(outcome.total is None)}
        if outcome.total is None:
            log.warning("round %d: secure aggregation aborted (%s): the global model stays as it is",
                        round_idx + 1, outcome.reason)
            return []
        total = dequantize(outcome.total, self.scale_bits)
        # the plain mean over the inputs received, or with DP the sum over the fixed m, noise to come
        divisor = len(outcome.received) if self.dp is None else self.dp.m
        scaled, offset = {}, 0
        for k in floats:
            n = g[k].numel()
            scaled[k] = (total[offset:offset + n] / divisor).view_as(g[k]).to(g[k].dtype)
            offset += n
        state = dict(updates[-1].state)  # integer buffers: the last update's, as WeightedMean takes
        if self.dp is None:
            state.update({k: g[k] + scaled[k] for k in floats})
        else:
            state.update(self.dp.release(scaled, float(total[-1]), len(outcome.received), g))
        return [updates[-1]._replace(state=state, sender=None)]

    def lost(self, phase: int, round_idx: int, ids: list[int]) -> frozenset:
        """The clients that drop out at `phase` (0: before upload, 1: before unmasking)."""
        p = self.dropout[phase]
        if not p:
            return frozenset()
        draws = numpy_rng(self.seed, SECAGG_DROPOUT, round_idx, phase).random(self.num_clients)
        return frozenset(u for u in ids if draws[u] < p)

    def on_round_start(self) -> None:
        self.stats = {}

    def on_round_end(self, metrics: dict) -> None:
        metrics.update(self.stats)


def install(algo, enabled: bool, **settings) -> Optional[SecureAggregation]:
    """Called by FedBase once its server, hooks and attack exist; secagg.enabled=false adds nothing."""
    if not enabled:
        return None
    secagg = SecureAggregation(algo.cfg.seed, **settings)
    secagg.install(algo)
    return secagg


def config_problems(cfg) -> list[str]:
    """Start-up checks of secagg.* against the run's other settings (src/config.py)."""
    s, c = cfg.secagg, cfg.clients
    if not s.enabled:
        return []
    n = c.num_per_round if c.num_per_round is not None else max(1, round(c.per_round * c.total))
    problems = []
    if n < 2:
        problems.append(f"secagg: {n} client per round has nothing to hide its update among: raise clients.per_round "
                        "(or clients.num_per_round) to at least 2")
    if s.threshold is not None and s.threshold > n:
        problems.append(f"secagg.threshold: t={s.threshold} shares are needed to unmask, but a round has {n} clients: "
                        f"set secagg.threshold <= {n} (or null: a majority)")
    peak = n * (s.clip * (1 << s.scale_bits) + 1)
    if peak >= 1 << (MODULUS_BITS - 1):
        problems.append(f"secagg.clip / secagg.scale_bits: {n} updates of coordinates up to clip={s.clip} at scale "
                        f"2^{s.scale_bits} sum to up to {peak:.3g}, past the 2^31 that Z_(2^32) holds signed: lower "
                        "secagg.scale_bits or secagg.clip")
    return problems
