"""Datasets selectable from config/dataset/. Each is a small config object whose `load(device)`
returns a FederatedData with the whole train and test sets as tensors on `device`."""
import gzip
import os
import logging
import shutil
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from src.data.device_data import DeviceDataset, FederatedData
from src.errors import UserError

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# dataset.augment, batched on the device: random crop with 4-pixel padding and/or horizontal flip.
AUGMENT_MODES = ("none", "flip", "crop", "crop_flip")


class Dataset(ABC):
    num_classes: int
    in_shape: tuple[int, ...]
    flip_invariant: bool  # whether a horizontal flip keeps the label (refuses flip TTA otherwise)

    def __init__(self, val_fraction: float = 0.0):
        """`val_fraction` of the training set (stratified by class, seeded by the run) is held out as
        the validation split before the partition: best-round selection and early stopping use it."""
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = val_fraction

    @abstractmethod
    def load(self, device: torch.device) -> FederatedData: ...


def _normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> float32 normalised per channel."""
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - m) / s


class TorchvisionImages(Dataset):
    """Image datasets read by torchvision from `root` (downloaded there if `download` is true)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self, root: str = "data", download: bool = True, augment: bool | str = False,
                 val_fraction: float = 0.0):
        super().__init__(val_fraction)
        self.root = Path(root)
        self.download = download
        self.augment = self._augment_mode(augment)

    def _augment_mode(self, augment: bool | str) -> str:
        """`augment` as one of AUGMENT_MODES; true is the dataset's usual recipe (crop, and flip
        where a mirror image keeps its label), false is none."""
        if isinstance(augment, bool):
            return ("crop_flip" if self.flip_invariant else "crop") if augment else "none"
        if augment not in AUGMENT_MODES:
            raise ValueError(f"augment={augment!r}: use one of {', '.join(AUGMENT_MODES)} (or true/false)")
        if "flip" in augment and not self.flip_invariant:
            raise ValueError(f"augment={augment}: {type(self).__name__} is not flip-invariant (a mirrored "
                             "image can change its label): use augment=crop or none")
        return augment

    @abstractmethod
    def _torchvision_split(self, train: bool, download: bool):
        """The torchvision dataset object for one split."""

    def _open(self, train: bool):
        try:
            return self._torchvision_split(train, self.download)
        except Exception as e:
            raise UserError(
                f"{type(self).__name__} could not be read from {self.root.resolve()} ({e}). "
                f"Put the files there in torchvision's layout, or set dataset.download=true on a "
                f"machine with internet (dataset.root={self.root})."
            ) from None

    def _tensors(self, split) -> tuple[torch.Tensor, torch.Tensor]:
        data = torch.as_tensor(np.asarray(split.data))
        if data.dim() == 3:  # (N, H, W) grey images
            data = data.unsqueeze(1)
        elif data.shape[-1] in (1, 3):  # (N, H, W, C) as CIFAR stores them
            data = data.permute(0, 3, 1, 2)
        return _normalise(data, self.mean, self.std), torch.as_tensor(np.asarray(split.targets), dtype=torch.long)

    def _check_root(self) -> None:
        """A root that is (or lies under) a file cannot hold the dataset: say so, rather than blame
        the dataset's files."""
        root = self.root.resolve()
        existing = next(p for p in (root, *root.parents) if p.exists())
        if not existing.is_dir():
            raise UserError(f"dataset.root={self.root}: {existing} is a file, not a directory. Point dataset.root "
                            "at a directory (it is created if missing), e.g. dataset.root=data.")

    def load(self, device: torch.device) -> FederatedData:
        self._check_root()
        (x_tr, y_tr), (x_te, y_te) = self._tensors(self._open(True)), self._tensors(self._open(False))
        pad = ((0.0 - torch.tensor(self.mean)) / torch.tensor(self.std))
        crop = 4 if self.augment in ("crop", "crop_flip") else 0
        train = DeviceDataset(x_tr, y_tr, self.num_classes, crop, self.augment in ("flip", "crop_flip"), pad)
        test = DeviceDataset(x_te, y_te, self.num_classes)
        return FederatedData(train.to(device), test.to(device), tuple(x_tr.shape[1:]), self.flip_invariant)


class MNIST(TorchvisionImages):
    num_classes, in_shape, flip_invariant = 10, (1, 28, 28), False
    mean, std = (0.1307,), (0.3081,)

    def _torchvision_split(self, train, download):
        from torchvision.datasets import MNIST as TV
        return TV(str(self.root), train=train, download=download)


class CIFAR10(TorchvisionImages):
    num_classes, in_shape, flip_invariant = 10, (3, 32, 32), True
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str = "data", download: bool = True, augment: bool | str = True,
                 val_fraction: float = 0.0):
        super().__init__(root, download, augment, val_fraction)

    def _torchvision_split(self, train, download):
        from torchvision.datasets import CIFAR10 as TV
        return TV(str(self.root), train=train, download=download)


class CIFAR100(CIFAR10):
    num_classes = 100
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

    def _torchvision_split(self, train, download):
        from torchvision.datasets import CIFAR100 as TV
        return TV(str(self.root), train=train, download=download)


class FashionMNIST(TorchvisionImages):
    """Fashion-MNIST, found in this order: `root`/FashionMNIST/raw; the Debian package
    dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, gunzipped into `root`);
    torchvision's download."""

    num_classes, in_shape, flip_invariant = 10, (1, 28, 28), True
    mean, std = (0.2860,), (0.3530,)
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    debian_dir = DEBIAN_FASHION_MNIST

    def _torchvision_split(self, train, download):
        from torchvision.datasets import FashionMNIST as TV
        return TV(str(self.root), train=train, download=download)

    def _raw_dir(self) -> Path:
        return self.root / "FashionMNIST" / "raw"

    def _have_raw(self) -> bool:
        return all((self._raw_dir() / f).is_file() for f in self.files)

    def _copy_from_debian(self) -> bool:
        # The package's .gz files differ byte-wise from torchvision's mirror (checksums fail),
        # so unpack them ourselves; torchvision then reads the raw IDX files without downloading.
        if not all((self.debian_dir / f"{f}.gz").is_file() for f in self.files):
            return False
        self._raw_dir().mkdir(parents=True, exist_ok=True)
        for f in self.files:
            tmp = self._raw_dir() / f".{f}.{os.getpid()}.tmp"   # runs of a sweep may unpack at once
            try:
                with gzip.open(self.debian_dir / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(self._raw_dir() / f)
        log.info("Fashion-MNIST unpacked from %s into %s", self.debian_dir, self._raw_dir())
        return True

    def _open(self, train: bool):
        try:
            found = self._have_raw() or self._copy_from_debian()
            if found:
                return self._torchvision_split(train, download=False)
        except Exception as e:
            raise UserError(
                f"Fashion-MNIST files in {self._raw_dir().resolve()} or {self.debian_dir} could not be read "
                f"({type(e).__name__}: {e}): delete the files in {self._raw_dir().resolve()} to unpack or "
                "download them again, or reinstall the Debian package dataset-fashion-mnist.") from None
        if self.download:
            try:
                return self._torchvision_split(train, download=True)
            except Exception as e:
                reason = f"the download failed: {e}"
        else:
            reason = "dataset.download=false"
        raise UserError(
            "Fashion-MNIST not found. Tried, in order: (1) the IDX files in "
            f"{self._raw_dir().resolve()} (set dataset.root to where they are); (2) the Debian package at "
            f"{self.debian_dir} (install it with `apt-get install dataset-fashion-mnist`); (3) torchvision's "
            f"download into dataset.root ({reason})."
        )


class RandomImages(Dataset):
    """Gaussian noise images with uniform random labels: no files, for benchmarks and smoke tests
    of models and speed (nothing to learn)."""

    flip_invariant = True

    def __init__(self, shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10, train_size: int = 2500,
                 test_size: int = 500, seed: int = 0, val_fraction: float = 0.0):
        super().__init__(val_fraction)
        if num_classes < 2 or train_size < 1 or test_size < 1 or any(s < 1 for s in shape):
            raise ValueError("need num_classes >= 2, train_size >= 1, test_size >= 1 and positive shape, got "
                             f"{num_classes}, {train_size}, {test_size}, {tuple(shape)}")
        self.in_shape, self.num_classes = tuple(shape), num_classes
        self.train_size, self.test_size, self.seed = train_size, test_size, seed

    def load(self, device: torch.device) -> FederatedData:
        g = torch.Generator().manual_seed(self.seed)
        n = self.train_size + self.test_size
        x = torch.randn(n, *self.in_shape, generator=g)
        y = torch.randint(0, self.num_classes, (n,), generator=g)
        train = DeviceDataset(x[:self.train_size], y[:self.train_size], self.num_classes)
        test = DeviceDataset(x[self.train_size:], y[self.train_size:], self.num_classes)
        return FederatedData(train.to(device), test.to(device), self.in_shape, self.flip_invariant)
