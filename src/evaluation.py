"""Evaluation as FL papers report it: the pooled test set, the validation split, every client's own
held-out data (per-client accuracy and its fairness statistics) and, optionally, each client's
accuracy after a few local fine-tuning steps from the global model (FL-bench's before/after).

Per-client evaluation is one pass over all clients' held-out samples with the global model; the
per-client sums come from index_add_ over each sample's owner, so its cost is that of evaluating
the same number of pooled samples, whatever the number of clients."""
import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from src.client.client import TrainSetup
from src.data.device_data import DeviceDataset
from src.engine.base import Engine
from src.utils.seeding import FINETUNE, torch_generator


def predict_log_probs(model: torch.nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Log of the predicted class probabilities; with tta=hflip, of the mean of the softmax
    outputs for x and x mirrored along its width."""
    log_probs = F.log_softmax(model(x).float(), dim=1)
    if tta == "hflip":
        flipped = F.log_softmax(model(x.flip(-1)).float(), dim=1)
        log_probs = torch.logsumexp(torch.stack([log_probs, flipped]), dim=0) - math.log(2.0)
    return log_probs


@torch.no_grad()
def pooled_scores(model: torch.nn.Module, data: DeviceDataset, batch_size: int, tta: str,
                  engine: Optional[Engine] = None) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on all of `data`, with one host sync. With a
    distributed `engine`, each process scores its share of the batches and every batch's sums are
    then added in batch order, as one process adds them: the same figures for any number of processes."""
    model.eval()
    count = -(-len(data) // batch_size)
    rows = torch.zeros(count, 2, device=data.y.device)  # per batch: summed cross-entropy, correct predictions
    for b in engine.batches(count) if engine is not None else range(count):
        x, y = data.x[b * batch_size:(b + 1) * batch_size], data.y[b * batch_size:(b + 1) * batch_size]
        log_probs = predict_log_probs(model, x, tta)
        rows[b, 0] = F.nll_loss(log_probs, y, reduction="sum")
        rows[b, 1] = (log_probs.argmax(1) == y).sum()
    if engine is not None:
        rows = engine.combine(rows)
    loss_sum = torch.zeros((), device=data.y.device)
    correct = torch.zeros((), device=data.y.device)
    for loss_b, correct_b in rows:
        loss_sum += loss_b
        correct += correct_b
    loss, acc = (torch.stack([loss_sum, correct]) / len(data)).tolist()
    return loss, acc


@torch.no_grad()
def grouped_scores(model: torch.nn.Module, data: DeviceDataset, owners: torch.Tensor, num_groups: int,
                   batch_size: int, tta: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (client): summed cross-entropy, correct predictions and sample count of `model` on
    `data`, sample i belonging to group owners[i]; one pass, one host sync."""
    model.eval()
    device = data.y.device
    loss_sum = torch.zeros(num_groups, device=device)
    correct = torch.zeros(num_groups, device=device)
    for x, y, own in zip(data.x.split(batch_size), data.y.split(batch_size), owners.split(batch_size)):
        log_probs = predict_log_probs(model, x, tta)
        loss_sum.index_add_(0, own, F.nll_loss(log_probs, y, reduction="none"))
        correct.index_add_(0, own, (log_probs.argmax(1) == y).float())
    counts = torch.bincount(owners, minlength=num_groups).float()
    loss_sum, correct, counts = torch.stack([loss_sum, correct, counts]).cpu().numpy()
    return loss_sum, correct, counts


def fairness(accuracies: np.ndarray, prefix: str) -> dict:
    """Mean, std, min, 10th percentile, mean of the worst 10 % of clients and Jain's index
    ((sum a)^2 / (n sum a^2): 1 when every client scores the same, 1/n when one client has it all)
    of per-client accuracies."""
    a = np.asarray(accuracies, dtype=np.float64)
    worst = np.sort(a)[:max(1, math.ceil(0.1 * len(a)))]
    squares = float(np.sum(a ** 2))
    return {f"{prefix}_mean": float(a.mean()), f"{prefix}_std": float(a.std()), f"{prefix}_min": float(a.min()),
            f"{prefix}_p10": float(np.percentile(a, 10)), f"{prefix}_worst10": float(worst.mean()),
            f"{prefix}_jain": float(a.sum() ** 2 / (len(a) * squares)) if squares > 0 else None}


class ClientEvaluation:
    """The global model on every client's own held-out samples (clients.test_fraction), and with
    `finetune_steps` > 0 each client's model after that many local steps from the global one."""

    def __init__(self, setup: TrainSetup, train: list[torch.Tensor], test: list[torch.Tensor], batch_size: int,
                 tta: str, finetune_steps: int = 0):
        self.setup, self.train, self.test = setup, train, test
        self.batch_size, self.tta, self.finetune_steps = batch_size, tta, finetune_steps
        device = test[0].device
        # clients without held-out samples (too small to spare one) are left out of the statistics
        self.evaluated = [k for k, idx in enumerate(test) if len(idx)]
        indices = torch.cat([test[k] for k in self.evaluated])
        # gathered once: every evaluation then reads contiguous batches, as the pooled test set does
        self.held_out = DeviceDataset(setup.data.x[indices], setup.data.y[indices], setup.data.num_classes)
        self.owners = torch.cat([torch.full((len(test[k]),), j, dtype=torch.long, device=device)
                                 for j, k in enumerate(self.evaluated)])

    def __call__(self, state: dict[str, torch.Tensor], round_idx: int) -> tuple[dict, dict]:
        """(round metrics, the per-client table) for the model `state` after round `round_idx`."""
        s = self.setup
        s.load(state)
        loss, correct, count = grouped_scores(s.model, self.held_out, self.owners, len(self.evaluated),
                                              self.batch_size, self.tta)
        accuracy = correct / count
        metrics = fairness(accuracy, "client_acc")
        table = {"clients": self.evaluated, "samples": count.astype(int).tolist(), "accuracy": accuracy.tolist(),
                 "loss": (loss / count).tolist()}
        if self.finetune_steps:
            tuned = self.finetuned_accuracy(state, round_idx)
            metrics.update(fairness(tuned, "finetuned_acc"))
            table["finetuned_accuracy"] = tuned.tolist()
        return metrics, table

    def finetuned_accuracy(self, state: dict[str, torch.Tensor], round_idx: int) -> np.ndarray:
        """Each evaluated client: load `state`, take finetune_steps steps of the run's optimizer (fresh
        state, no schedule) on the client's training data, score its held-out data. Batches come
        from a (seed, round, client) generator of their own and the global RNG is restored
        afterwards, so training, the global model and the client store are untouched."""
        s = self.setup
        device = self.owners.device
        correct = torch.zeros(len(self.evaluated), device=device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for j, k in enumerate(self.evaluated):
                s.load(state)
                s.model.train()
                optimizer = s.optimizer(s.model.parameters())
                gen = torch_generator(device, s.seed, FINETUNE, round_idx, k)
                for x, y in s.data.batches(self.train[k], s.batch_size, self.finetune_steps, gen):
                    with s.autocast():
                        loss = s.loss_fn(s.model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                s.model.eval()
                with torch.no_grad():
                    idx = self.test[k]
                    for batch in idx.split(self.batch_size):
                        log_probs = predict_log_probs(s.model, s.data.x[batch], self.tta)
                        correct[j] += (log_probs.argmax(1) == s.data.y[batch]).sum()
        s.load(state)
        counts = np.array([len(self.test[k]) for k in self.evaluated], dtype=np.float64)
        return correct.cpu().numpy() / counts
