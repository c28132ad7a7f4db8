"""algo=fedmedian: FedAvg's server under the coordinate-wise median (Yin et al., "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, Option I; the aggregator
src/server/robust.py's CoordinateMedian, aggregator=median), weighting uniform as the paper. It is
algo=fedavg aggregator=median algo.server.weighting=uniform under a name of its own."""
from src.server.fedavg import FedAvgServer
from src.server.robust import CoordinateMedian


class MedianServer(FedAvgServer):
    own_aggregator = CoordinateMedian  # the one aggregator it runs under (Aggregator.check refuses another)

    def __init__(self):
        super().__init__("uniform")
        self.aggregator = self.own_aggregator()
