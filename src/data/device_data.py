"""Whole datasets as tensors on the training device; a client is an index tensor into them."""
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F


@dataclass
class DeviceDataset:
    """Normalised inputs `x` (N, ...) and integer labels `y` (N,), both on one device."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    crop_padding: int = 0  # random-crop padding in pixels; 0 disables the crop
    hflip: bool = False  # random horizontal flip during training
    pad_value: Optional[torch.Tensor] = None  # per-channel value of a black pixel after normalisation

    def __len__(self) -> int:
        return self.y.shape[0]

    def to(self, device: torch.device) -> "DeviceDataset":
        pad = None if self.pad_value is None else self.pad_value.to(device)
        return DeviceDataset(self.x.to(device), self.y.to(device), self.num_classes, self.crop_padding, self.hflip, pad)

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Batched random crop (with `crop_padding`) and horizontal flip, drawn from `gen`."""
        if self.crop_padding:
            x = random_crop(x, self.crop_padding, self.pad_value, gen)
        if self.hflip:
            flip = torch.rand(x.shape[0], device=x.device, generator=gen) < 0.5
            x = torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
        return x

    def batches(self, indices: torch.Tensor, batch_size: int, num_steps: int, gen: torch.Generator,
                augment: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`num_steps` batches from `indices`, reshuffled at every pass over them (the last batch
        of a pass may be smaller); all indexing stays on the device, no host sync."""
        n = indices.shape[0]
        steps_done = 0
        while steps_done < num_steps:
            order = indices[torch.randperm(n, device=indices.device, generator=gen)]
            for batch_idx in order.split(batch_size):
                if steps_done == num_steps:
                    return
                x = self.x[batch_idx]
                if augment:
                    x = self.augment(x, gen)
                yield x, self.y[batch_idx]
                steps_done += 1


def random_crop(x: torch.Tensor, padding: int, pad_value: Optional[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    """Pad each image by `padding` pixels and cut a random window of the original size, batched."""
    b, c, h, w = x.shape
    if pad_value is None:
        padded = F.pad(x, (padding,) * 4)
    else:  # pad with the normalised value of a black pixel, as padding the raw image would
        padded = pad_value.view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding:padding + h, padding:padding + w] = x
    top = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=gen)
    left = torch.randint(0, 2 * padding + 1, (b,), device=x.device, generator=gen)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


@dataclass
class FederatedData:
    """What a dataset gives the controller: train and test sets, and for naturally federated
    datasets (Synthetic) the clients' index arrays into `train`."""

    train: DeviceDataset
    test: DeviceDataset
    in_shape: tuple[int, ...]
    flip_invariant: bool
    natural_clients: Optional[list[torch.Tensor]] = None
