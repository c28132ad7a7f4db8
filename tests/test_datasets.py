"""Dataset loading, offline: tiny MNIST / Fashion-MNIST files in the real IDX format, tiny CIFAR
files in torchvision's pickle layout, the Fashion-MNIST lookup order (root, Debian package,
download) and its error, the Synthetic(alpha, beta) generator, and DeviceDataset's batches and
augmentation. Nothing here touches the network: an autouse fixture makes every torchvision
download raise."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
import torchvision.datasets.cifar
import torchvision.datasets.mnist
import torchvision.datasets.utils

from src.data.datasets import CIFAR10, CIFAR100, MNIST, FashionMNIST
from src.data.device_data import DeviceDataset, random_crop
from src.data.synthetic import Synthetic
from src.errors import UserError

CPU = torch.device("cpu")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any torchvision download attempt fails at once instead of reaching the network."""
    def offline(*args, **kwargs):
        raise RuntimeError("offline (test): no downloads")
    for module in (torchvision.datasets.utils, torchvision.datasets.mnist, torchvision.datasets.cifar):
        for name in ("download_url", "download_and_extract_archive"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, offline)


# ---------------------------------------------------------------- IDX (MNIST-style) files

def idx_images(images: np.ndarray) -> bytes:
    assert images.dtype == np.uint8 and images.ndim == 3
    return struct.pack(">IIII", 2051, *images.shape) + images.tobytes()


def idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def make_mnist_like(seed: int, n_train: int = 20, n_test: int = 10):
    """Known images and labels; returns {file name: bytes} and the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": (np.arange(n_train) * 3 + seed) % 10,
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(n_test) * 7 + seed) % 10,
    }
    arrays["train_x"][0] = 0  # a black and a white image: the extremes of the normalisation
    arrays["train_x"][1] = 255
    files = dict(zip(IDX_FILES, (idx_images(arrays["train_x"]), idx_labels(arrays["train_y"]),
                                 idx_images(arrays["test_x"]), idx_labels(arrays["test_y"]))))
    return files, arrays


def write_raw(root: Path, name: str, files: dict[str, bytes]) -> Path:
    raw = root / name / "raw"
    raw.mkdir(parents=True)
    for f, data in files.items():
        (raw / f).write_bytes(data)
    return raw


def write_gz(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for f, data in files.items():
        with gzip.open(folder / f"{f}.gz", "wb") as out:
            out.write(data)


def expected_grey(pixels: np.ndarray, mean: float, std: float) -> torch.Tensor:
    return torch.from_numpy(((pixels.astype(np.float64) / 255.0 - mean) / std).astype(np.float32)).unsqueeze(1)


def check_grey(data, arrays, cls):
    mean, std = cls.mean[0], cls.std[0]
    assert data.train.x.shape == (20, 1, 28, 28) and data.train.x.dtype == torch.float32
    assert data.test.x.shape == (10, 1, 28, 28)
    assert data.train.y.dtype == torch.long
    assert data.train.y.tolist() == arrays["train_y"].tolist()
    assert data.test.y.tolist() == arrays["test_y"].tolist()
    torch.testing.assert_close(data.train.x, expected_grey(arrays["train_x"], mean, std))
    torch.testing.assert_close(data.test.x, expected_grey(arrays["test_x"], mean, std))
    # black and white pixels by hand
    assert torch.allclose(data.train.x[0], torch.tensor(-mean / std))
    assert torch.allclose(data.train.x[1], torch.tensor((1 - mean) / std))
    assert data.in_shape == (1, 28, 28)
    assert data.natural_clients is None
    assert data.train.num_classes == data.test.num_classes == 10


def test_mnist_loads_idx_files(tmp_path):
    files, arrays = make_mnist_like(seed=1)
    write_raw(tmp_path, "MNIST", files)
    # download=True (the default): the files are there, so nothing is downloaded (the fixture
    # would make any attempt fail)
    data = MNIST(root=str(tmp_path)).load(CPU)
    check_grey(data, arrays, MNIST)
    assert data.flip_invariant is False
    assert data.train.crop_padding == 0 and data.train.hflip is False  # augment defaults to False
    assert data.test.crop_padding == 0 and data.test.hflip is False


def test_mnist_augment_crops_but_never_flips(tmp_path):
    files, _ = make_mnist_like(seed=2)
    write_raw(tmp_path, "MNIST", files)
    data = MNIST(root=str(tmp_path), download=False, augment=True).load(CPU)
    assert data.train.crop_padding == 4
    assert data.train.hflip is False  # digits are not flip invariant
    torch.testing.assert_close(data.train.pad_value, torch.tensor([-0.1307 / 0.3081]))
    assert data.test.crop_padding == 0 and data.test.hflip is False


def test_mnist_missing_is_user_error(tmp_path):
    with pytest.raises(UserError) as e:
        MNIST(root=str(tmp_path / "nowhere"), download=False).load(CPU)
    msg = str(e.value)
    assert str((tmp_path / "nowhere").resolve()) in msg
    assert "dataset.download=true" in msg


# ---------------------------------------------------------------- Fashion-MNIST lookup order

@pytest.fixture
def debian_dir(tmp_path, monkeypatch):
    """FashionMNIST.debian_dir pointed at an (initially empty) tmp folder, never the real one."""
    d = tmp_path / "debian" / "fashion-mnist"
    d.mkdir(parents=True)
    monkeypatch.setattr(FashionMNIST, "debian_dir", d)
    return d


def test_fashion_mnist_root_files_first(tmp_path, debian_dir):
    root = tmp_path / "root"
    files, arrays = make_mnist_like(seed=3)
    raw = write_raw(root, "FashionMNIST", files)
    other_files, _ = make_mnist_like(seed=4)
    write_gz(debian_dir, other_files)  # different data in the Debian place: must not be used
    data = FashionMNIST(root=str(root), download=False).load(CPU)
    check_grey(data, arrays, FashionMNIST)
    assert data.flip_invariant is True
    for f in IDX_FILES:
        assert (raw / f).read_bytes() == files[f]  # root's files were not overwritten


def test_fashion_mnist_from_debian_package(tmp_path, debian_dir, monkeypatch):
    root = tmp_path / "root"
    files, arrays = make_mnist_like(seed=5)
    write_gz(debian_dir, files)
    data = FashionMNIST(root=str(root), download=False).load(CPU)
    check_grey(data, arrays, FashionMNIST)
    raw = root / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)  # unpacked, no temp files left
    for f in IDX_FILES:
        assert (raw / f).read_bytes() == files[f]
    # once unpacked, root alone is enough
    monkeypatch.setattr(FashionMNIST, "debian_dir", tmp_path / "gone")
    check_grey(FashionMNIST(root=str(root), download=False).load(CPU), arrays, FashionMNIST)


def test_fashion_mnist_augment_crops_and_flips(tmp_path, debian_dir):
    files, _ = make_mnist_like(seed=6)
    write_gz(debian_dir, files)
    data = FashionMNIST(root=str(tmp_path / "root"), download=False, augment=True).load(CPU)
    assert data.train.crop_padding == 4 and data.train.hflip is True
    torch.testing.assert_close(data.train.pad_value, torch.tensor([-0.2860 / 0.3530]))
    assert data.test.crop_padding == 0 and data.test.hflip is False


@pytest.mark.parametrize("augment,crop,flip", [
    ("none", 0, False), ("flip", 0, True), ("crop", 4, False), ("crop_flip", 4, True),
    (True, 4, True), (False, 0, False)])   # true/false: the old spellings, crop + flip and none
def test_fashion_mnist_augment_modes(tmp_path, debian_dir, augment, crop, flip):
    write_gz(debian_dir, make_mnist_like(seed=6)[0])
    data = FashionMNIST(root=str(tmp_path / "root"), download=False, augment=augment).load(CPU)
    assert (data.train.crop_padding, data.train.hflip) == (crop, flip)
    assert data.test.crop_padding == 0 and data.test.hflip is False


def test_flip_only_batches_are_seeded_mirrors_without_crop(tmp_path, debian_dir):
    write_gz(debian_dir, make_mnist_like(seed=6)[0])
    train = FashionMNIST(root=str(tmp_path / "root"), download=False, augment="flip").load(CPU).train
    indices = torch.arange(len(train))
    a, b, c = (collect(train, indices, 8, 6, seed=s) for s in (1, 1, 2))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert any(not torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    images = torch.cat([x for x, _ in a])
    kept = (images[:, None] == train.x[None]).flatten(2).all(2).any(1)
    flipped = (images[:, None] == train.x.flip(-1)[None]).flatten(2).all(2).any(1)
    assert (kept | flipped).all()   # every image is a training image or its mirror: never cropped
    assert (kept & ~flipped).any() and (flipped & ~kept).any()


@pytest.mark.parametrize("augment", ["flip", "crop_flip"])
def test_flips_refused_for_digits(augment):
    with pytest.raises(ValueError, match="MNIST is not flip-invariant.*augment=crop or none"):
        MNIST(augment=augment)


def test_unknown_augment_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"'crop\+flip'.*none, flip, crop, crop_flip"):
        FashionMNIST(augment="crop+flip")


def test_augment_problems_are_config_errors(compose_cfg):
    from src.config import validate
    from src.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg("dataset=mnist", "dataset.augment=flip"))
    assert "MNIST is not flip-invariant" in str(e.value)
    validate(compose_cfg("dataset.augment=flip"))   # Fashion-MNIST: clothes mirror


def check_names_all_three(msg: str, root: Path, debian: Path):
    assert str((root / "FashionMNIST" / "raw").resolve()) in msg
    assert str(debian) in msg
    assert "dataset-fashion-mnist" in msg
    assert "download" in msg


def test_fashion_mnist_nowhere_no_download(tmp_path, debian_dir):
    root = tmp_path / "root"
    write_gz(debian_dir, dict(list(make_mnist_like(seed=7)[0].items())[:3]))  # incomplete: unusable
    with pytest.raises(UserError) as e:
        FashionMNIST(root=str(root), download=False).load(CPU)
    msg = str(e.value)
    check_names_all_three(msg, root, debian_dir)
    assert "dataset.download=false" in msg
    assert not (root / "FashionMNIST" / "raw").exists() or not any((root / "FashionMNIST" / "raw").iterdir())


def test_fashion_mnist_download_fails(tmp_path, debian_dir, monkeypatch):
    calls = []

    def fail(self):
        calls.append(self.root)
        raise RuntimeError("offline")

    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", fail)
    root = tmp_path / "root"
    with pytest.raises(UserError) as e:
        FashionMNIST(root=str(root), download=True).load(CPU)
    msg = str(e.value)
    check_names_all_three(msg, root, debian_dir)
    assert "the download failed: offline" in msg
    assert len(calls) == 1  # the download was tried (and failed), once


# ---------------------------------------------------------------- CIFAR pickles

@pytest.fixture
def no_md5(monkeypatch):
    # torchvision checks the md5 sums of the CIFAR files (in CIFAR10._check_integrity and in
    # _load_meta), which tiny test files cannot match: replace its check_integrity, for the CIFAR
    # module only, by a check that the file exists.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: os.path.isfile(fpath))


def dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def cifar_images(rng, n) -> np.ndarray:
    """uint8 (N, 3072), row-major CHW as the CIFAR files store them; channels differ in range so
    that a channel/axis mix-up shows."""
    imgs = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    imgs[:, 0] //= 4  # red in [0, 64)
    imgs[:, 2] = 128 + imgs[:, 2] // 2  # blue in [128, 256)
    imgs[:, :, 0, :] = 255  # a white top row, to see that rows are rows
    return imgs.reshape(n, 3072)


def write_cifar10(root: Path, seed: int = 0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = cifar_images(rng, 2), [(2 * i) % 10, (2 * i + 1) % 10]
        dump(d / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": y, "data": x,
                                      "filenames": [f"img{i}_{j}.png" for j in range(2)]})
        train_x.append(x)
        train_y += y
    test_x, test_y = cifar_images(rng, 4), [9, 0, 3, 3]
    dump(d / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_y, "data": test_x,
                            "filenames": [f"t{j}.png" for j in range(4)]})
    dump(d / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                              "frog", "horse", "ship", "truck"],
                              "num_cases_per_batch": 2, "num_vis": 3072})
    return np.concatenate(train_x), train_y, test_x, test_y


def write_cifar100(root: Path, seed: int = 0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    train_x, train_y = cifar_images(rng, 6), [0, 99, 42, 7, 56, 99]
    test_x, test_y = cifar_images(rng, 4), [13, 98, 0, 71]
    dump(d / "train", {"filenames": [], "batch_label": "training batch 1 of 1", "fine_labels": train_y,
                       "coarse_labels": [y // 5 for y in train_y], "data": train_x})
    dump(d / "test", {"filenames": [], "batch_label": "testing batch 1 of 1", "fine_labels": test_y,
                      "coarse_labels": [y // 5 for y in test_y], "data": test_x})
    dump(d / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                      "coarse_label_names": [f"s{i}" for i in range(20)]})
    return train_x, train_y, test_x, test_y


def expected_rgb(flat: np.ndarray, mean, std) -> torch.Tensor:
    chw = flat.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0
    m, s = np.array(mean).reshape(1, 3, 1, 1), np.array(std).reshape(1, 3, 1, 1)
    return torch.from_numpy(((chw - m) / s).astype(np.float32))


@pytest.mark.parametrize("cls, writer, n_train, num_classes", [
    (CIFAR10, write_cifar10, 10, 10),
    (CIFAR100, write_cifar100, 6, 100),
])
def test_cifar_loads_pickles(tmp_path, no_md5, cls, writer, n_train, num_classes):
    train_x, train_y, test_x, test_y = writer(tmp_path)
    data = cls(root=str(tmp_path), download=False).load(CPU)
    assert data.train.x.shape == (n_train, 3, 32, 32) and data.train.x.dtype == torch.float32
    assert data.test.x.shape == (4, 3, 32, 32)
    assert data.train.y.dtype == torch.long
    assert data.train.y.tolist() == list(train_y)
    assert data.test.y.tolist() == list(test_y)
    torch.testing.assert_close(data.train.x, expected_rgb(train_x, cls.mean, cls.std))
    torch.testing.assert_close(data.test.x, expected_rgb(test_x, cls.mean, cls.std))
    # the white top row, channel by channel
    white = (1 - torch.tensor(cls.mean)) / torch.tensor(cls.std)
    torch.testing.assert_close(data.train.x[:, :, 0, :], white.view(1, 3, 1).expand(n_train, 3, 32))
    assert data.in_shape == (3, 32, 32) and data.flip_invariant is True
    assert data.train.num_classes == data.test.num_classes == num_classes
    # augment defaults to True for CIFAR: crop with 4 pixels of black padding, and flips
    assert data.train.crop_padding == 4 and data.train.hflip is True
    torch.testing.assert_close(data.train.pad_value, -torch.tensor(cls.mean) / torch.tensor(cls.std))
    assert data.test.crop_padding == 0 and data.test.hflip is False


def test_cifar_without_augment(tmp_path, no_md5):
    write_cifar10(tmp_path)
    data = CIFAR10(root=str(tmp_path), download=False, augment=False).load(CPU)
    assert data.train.crop_padding == 0 and data.train.hflip is False
    assert data.test.crop_padding == 0 and data.test.hflip is False


@pytest.mark.parametrize("cls", [CIFAR10, CIFAR100])
def test_cifar_missing_is_user_error(tmp_path, cls):
    root = tmp_path / "empty"
    with pytest.raises(UserError) as e:
        cls(root=str(root), download=False).load(CPU)
    msg = str(e.value)
    assert cls.__name__ in msg
    assert str(root.resolve()) in msg
    assert "dataset.download=true" in msg  # the fix
    assert f"dataset.root={root}" in msg


def test_cifar_download_failure_is_user_error(tmp_path):
    # download=True, but the (autouse) fixture makes torchvision's download raise
    with pytest.raises(UserError) as e:
        CIFAR10(root=str(tmp_path), download=True).load(CPU)
    assert "offline (test)" in str(e.value)
    assert str(tmp_path.resolve()) in str(e.value)


# ---------------------------------------------------------------- Synthetic(alpha, beta)

def test_synthetic_seeded():
    a = Synthetic(0.5, 0.5, num_devices=8, seed=3).load(CPU)
    b = Synthetic(0.5, 0.5, num_devices=8, seed=3).load(CPU)
    c = Synthetic(0.5, 0.5, num_devices=8, seed=4).load(CPU)
    for split in ("train", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)
    assert all(torch.equal(p, q) for p, q in zip(a.natural_clients, b.natural_clients))
    assert a.train.x.shape != c.train.x.shape or not torch.equal(a.train.x, c.train.x)
    assert not torch.equal(a.test.x[:5], c.test.x[:5])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("test_fraction", [0.2, 0.5, 0.0])
def test_synthetic_clients_and_test_split(seed, test_fraction):
    ds = Synthetic(1.0, 1.0, num_devices=10, test_fraction=test_fraction, seed=seed)
    devices = ds.generate()
    data = ds.load(CPU)
    assert len(data.natural_clients) == 10 == len(devices)
    # disjoint and covering the train set
    allidx = torch.cat(data.natural_clients)
    assert torch.equal(allidx.sort().values, torch.arange(len(data.train)))
    offset_te = 0
    for (x, y), idx in zip(devices, data.natural_clients):
        n = len(y)
        n_test = int(round(test_fraction * n))
        assert len(idx) == n - n_test
        assert abs(n_test - test_fraction * n) <= 0.5
        # the device's own first samples are its training data, the rest its test data
        assert torch.equal(data.train.x[idx], torch.from_numpy(x[: n - n_test]))
        assert torch.equal(data.train.y[idx], torch.from_numpy(y[: n - n_test]))
        assert torch.equal(data.test.x[offset_te:offset_te + n_test], torch.from_numpy(x[n - n_test:]))
        offset_te += n_test
    assert offset_te == len(data.test)
    if test_fraction == 0:
        assert len(data.test) == 0


@pytest.mark.parametrize("seed", [0, 1, 2, 4])  # seed 3 has a 42k-sample device: slower
def test_synthetic_shapes_labels_sizes(seed):
    ds = Synthetic(1.0, 1.0, num_devices=10, seed=seed)
    data = ds.load(CPU)
    assert data.in_shape == (60,) and data.flip_invariant is False
    assert data.train.x.shape[1:] == (60,) and data.test.x.shape[1:] == (60,)
    assert data.train.x.dtype == torch.float32 and data.train.y.dtype == torch.long
    y = torch.cat([data.train.y, data.test.y])
    assert y.min() >= 0 and y.max() < 10
    assert len(y.unique()) >= 2
    assert data.train.num_classes == 10
    sizes = [len(dy) for _, dy in ds.generate()]
    assert min(sizes) >= 50  # lognormal(4, 2) + 50
    # the sizes are the generator's first draws: the integer part of lognormal(4, 2), plus 50
    draws = np.random.default_rng(seed).lognormal(4, 2, 10)
    assert sizes == [int(d) + 50 for d in draws]
    assert len(set(sizes)) > 1 and max(sizes) > 60


def test_synthetic_max_device_size():
    uncapped = [len(y) for _, y in Synthetic(seed=0, num_devices=10).generate()]
    assert max(uncapped) > 100  # seed 0 has devices above the cap
    capped_ds = Synthetic(seed=0, num_devices=10, max_device_size=100)
    capped = [len(y) for _, y in capped_ds.generate()]
    assert capped == [min(n, 100) for n in uncapped]
    data = capped_ds.load(CPU)
    assert max(len(c) for c in data.natural_clients) <= 100
    assert len(data.train) + len(data.test) == sum(capped)


# ---------------------------------------------------------------- DeviceDataset

def toy(n=30, **kw) -> DeviceDataset:
    x = torch.arange(n, dtype=torch.float32).repeat_interleave(2).view(n, 2) * 10
    return DeviceDataset(x, torch.arange(n), 10, **kw)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def collect(ds, indices, batch_size, num_steps, seed, augment=True):
    return list(ds.batches(indices, batch_size, num_steps, gen(seed), augment=augment))


def test_batches_count_and_one_pass_covers_once():
    ds = toy()
    indices = torch.tensor([3, 5, 7, 11, 13, 17, 19, 23, 29, 2])
    one_pass = collect(ds, indices, 3, 4, seed=0)
    assert [len(y) for _, y in one_pass] == [3, 3, 3, 1]
    ys = torch.cat([y for _, y in one_pass])
    assert sorted(ys.tolist()) == sorted(indices.tolist())
    for x, y in one_pass:  # x rows belong to their labels
        assert torch.equal(x[:, 0], y.float() * 10)
    for steps in (0, 1, 5, 9, 13):
        assert len(collect(ds, indices, 3, steps, seed=0)) == steps
    # passes after the first cover everything again, in a new order
    nine = collect(ds, indices, 3, 9, seed=0)
    second = torch.cat([y for _, y in nine[4:8]])
    assert sorted(second.tolist()) == sorted(indices.tolist())
    assert not torch.equal(second, ys)


def test_batches_large_batch_is_whole_pass():
    ds = toy()
    indices = torch.arange(0, 30, 3)
    batches = collect(ds, indices, 64, 3, seed=1)
    assert len(batches) == 3
    for _, y in batches:
        assert sorted(y.tolist()) == indices.tolist()


def test_batches_seeded():
    ds = toy(hflip=True)
    indices = torch.arange(30)
    a, b, c = (collect(ds, indices, 4, 10, seed=s) for s in (5, 5, 6))
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_random_crop_against_reference():
    b, c, h, w, p = 40, 3, 6, 5, 2
    x = torch.randn(b, c, h, w, generator=gen(0))
    v = torch.tensor([-1.5, 0.25, 7.0])
    out = random_crop(x, p, v, gen(1))
    assert out.shape == x.shape
    g = gen(1)  # same draws as random_crop: top offsets, then left offsets
    top = torch.randint(0, 2 * p + 1, (b,), generator=g)
    left = torch.randint(0, 2 * p + 1, (b,), generator=g)
    assert len(set(top.tolist())) > 1 and len(set(left.tolist())) > 1
    for i in range(b):
        padded = v.view(c, 1, 1).repeat(1, h + 2 * p, w + 2 * p)
        padded[:, p:p + h, p:p + w] = x[i]
        want = padded[:, top[i]:top[i] + h, left[i]:left[i] + w]
        # padding x - v with zeros and adding v back rounds the image pixels by ~1 ulp
        torch.testing.assert_close(out[i], want, rtol=1e-6, atol=1e-6)


def test_random_crop_constant_image_border_is_pad_value():
    b, c, h, w, p = 64, 3, 8, 8, 3
    x = torch.full((b, c, h, w), 5.0)
    v = torch.tensor([-1.0, -2.0, -3.0])
    out = random_crop(x, p, v, gen(2))
    assert out.shape == (b, c, h, w)
    is_pad = out != 5.0
    # every non-image pixel is the channel's pad value
    assert torch.equal(out[is_pad], v.view(1, c, 1, 1).expand_as(out)[is_pad])
    assert is_pad.any() and (~is_pad).any()
    # a pixel is padding on all channels or none, padding forms whole rows / columns at the
    # border, and at most p of them on each side
    assert torch.equal(is_pad.all(1), is_pad.any(1))
    for i in range(b):
        rows = is_pad[i, 0].all(1)
        cols = is_pad[i, 0].all(0)
        assert torch.equal(is_pad[i, 0], rows[:, None] | cols[None, :])
        for line in (rows, cols):
            n = int(line.sum())
            assert n <= p
            assert line[:n].all() or line[len(line) - n:].all()
    # every offset appears in 64 crops: some images with p padded rows on top, some at the bottom
    assert is_pad[:, 0, 0, :].all(1).any() and is_pad[:, 0, -1, :].all(1).any()
    assert is_pad[:, 0, :p, :].all((1, 2)).any()


def test_random_crop_without_pad_value_pads_zeros():
    x = torch.full((32, 1, 4, 4), 3.0)
    out = random_crop(x, 1, None, gen(3))
    assert set(out.unique().tolist()) == {0.0, 3.0}


def test_hflip_draws_flips():
    ds = DeviceDataset(torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long), 10, hflip=True)
    x = torch.randn(64, 2, 3, 5, generator=gen(0))
    out = ds.augment(x, gen(4))
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped | kept).all()  # each image is itself or its mirror image
    assert flipped.any() and kept.any()
    assert 10 < int(flipped.sum()) < 54
    want = torch.rand(64, generator=gen(4)) < 0.5  # the draw augment makes
    assert torch.equal(flipped, want)


def test_no_augmentation_when_disabled():
    x = torch.randn(16, 1, 4, 4, generator=gen(0))
    plain = DeviceDataset(x, torch.arange(16), 10)
    assert torch.equal(plain.augment(x, gen(0)), x)
    aug = DeviceDataset(x, torch.arange(16), 10, crop_padding=1, hflip=True)
    for xb, yb in aug.batches(torch.arange(16), 5, 4, gen(0), augment=False):
        assert torch.equal(xb, x[yb])
    changed = [not torch.equal(xb, x[yb]) for xb, yb in aug.batches(torch.arange(16), 16, 1, gen(0))]
    assert changed == [True]


def test_to_keeps_augmentation_settings():
    ds = DeviceDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.long), 10, 4, True, torch.ones(3))
    moved = ds.to(CPU)
    assert (moved.crop_padding, moved.hflip, moved.num_classes) == (4, True, 10)
    assert torch.equal(moved.pad_value, torch.ones(3))
