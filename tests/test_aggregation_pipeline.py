"""CenterServer.aggregate as accumulate -> reduce -> server_update: streaming servers copy nothing,
servers that need every update get owned copies, and reduce() is where the sums of several
processes would be combined, before the mean's one division."""
import torch

import src.server.base as base
from src.algo.scaffold import ScaffoldServer
from src.client.client import ClientUpdate
from src.server import FedAvgServer
from src.server.base import CenterServer, Sums


def start(server):
    server.set_global_state({"w": torch.zeros(2), "tracked": torch.tensor(0)})
    server.attach(["w"], num_clients=4)
    return server


def scaffold_updates():
    g = torch.Generator().manual_seed(0)
    return [ClientUpdate({"w": torch.randn(2, generator=g), "tracked": torch.tensor(i)}, n, torch.zeros(()), n,
                         extra={"control_change": {"w": torch.randn(2, generator=g)}}) for i, n in enumerate((1, 2, 5))]


def working_model_updates(values):
    """Every update a view of one buffer, overwritten by the next client, as the engine sends them."""
    live = {"w": torch.zeros(2), "tracked": torch.tensor(0)}
    for i, v in enumerate(values):
        live["w"].copy_(torch.tensor(v))
        live["tracked"].fill_(i)
        yield ClientUpdate(live, i + 1, torch.zeros(()), i + 1, extra={"note": {"w": live["w"]}})


def test_a_streaming_server_copies_no_update(monkeypatch):
    def refuse(value):
        raise AssertionError("a streaming server copied an update")
    monkeypatch.setattr(base, "owned", refuse)
    s = start(FedAvgServer("samples"))
    s.aggregate(working_model_updates([[1.0, 2.0], [4.0, -1.0]]))
    torch.testing.assert_close(s.global_state["w"], torch.tensor([3.0, 0.0]))  # (1*[1, 2] + 2*[4, -1]) / 3


class Keeper(CenterServer):
    needs_all_updates = True

    def server_update(self, mean, sums):
        self.kept = sums


def test_a_server_that_needs_every_update_gets_owned_copies():
    s = start(Keeper("samples"))
    s.aggregate(working_model_updates([[1.0, 2.0], [4.0, -1.0], [0.0, 3.0]]))
    stacked = s.kept.stacked()
    torch.testing.assert_close(stacked["w"], torch.tensor([[1.0, 2.0], [4.0, -1.0], [0.0, 3.0]]))
    assert stacked["tracked"].tolist() == [0, 1, 2]
    assert [u.extra["note"]["w"].tolist() for u in s.kept.updates] == [[1.0, 2.0], [4.0, -1.0], [0.0, 3.0]]
    assert s.kept.weights == [1.0, 2.0, 3.0]


class TwoProcesses(ScaffoldServer):
    """Stands for a torch.distributed engine: reduce() adds the sums another process accumulated."""

    other: Sums

    def reduce(self, sums):
        torch._foreach_add_(sums.mean.acc, self.other.mean.acc)
        sums.mean.total += self.other.mean.total
        sums.mean.last = self.other.mean.last  # integer buffers: the last update's, of the last process
        for key, acc in sums.extras.items():
            torch._foreach_add_(list(acc.values()), list(self.other.extras[key].values()))
        sums.count += self.other.count
        return sums


def test_reduced_sums_give_the_one_process_result_bit_for_bit():
    updates = scaffold_updates()
    one = start(ScaffoldServer(lr=0.5, weighting="samples"))
    one.aggregate(iter(updates))
    two = start(TwoProcesses(lr=0.5, weighting="samples"))
    two.other = Sums(two.global_state, two.param_names, two.summed_extras, keep=False)
    two.accumulate(two.other, updates[2])
    two.aggregate(iter(updates[:2]))
    for part in ("global_state", "control"):
        a, b = one.state_dict()[part], two.state_dict()[part]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
