"""Scoring samples on Fashion-MNIST, for quality.py, sampler_quality.py and ablation.py: a small classifier trained
once and cached, whose penultimate features give FID and KID (torchmetrics), precision and recall (Kynkaenniemi et
al. 2019) and the class histogram of the samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from diffusion.data.datasets import fit_images, load_digits, load_fashion
from diffusion.outputs.evaluation import ImageMetrics

# ---------------------------------------------------------------- the data and the classifier


def fashion(data_root: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train and test images ``(N, 1, 28, 28)`` uint8 with their labels, from Debian's files."""
    train, test = load_fashion(data_root, False)
    return train.images, train.labels, test.images, test.labels


class Classifier(nn.Module):
    """A small CNN for 28x28 Fashion-MNIST; its 128-d penultimate layer gives the features of the scores.
    ``forward`` takes uint8 ``(N, 1 or 3, 28, 28)`` and returns features, as torchmetrics' feature networks do."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images[:, :1].float() / 127.5 - 1.0
        return self.body(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def digits(image_size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits as the default run trains on them (``dataset=digits``: resized to 16x16) and then
    at the classifier's 28x28, split seeded into 1,400 to train the classifier on and 397 to test it."""
    full, _ = load_digits()
    images = at_28(fit_images(full.images, image_size, 1))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    return images[train], full.labels[train], images[test], full.labels[test]


def classifier(
    cache: Path, data: tuple, device: torch.device, name: str = "fashion", epochs: int = 2
) -> tuple[Classifier, float]:
    """The classifier trained once (``epochs`` of Adam, seed 0) on ``data`` and cached as ``name``; returns it
    with its test accuracy. Another machine or thread count trains another classifier from the same seed, and the
    FIDs it gives differ (benchmarks/scorer_spread.py): compare figures scored with one cache only."""
    path = cache / f"{name}_classifier.pt"
    if path.is_file():
        saved = torch.load(path, map_location=device, weights_only=True)
        net = Classifier().to(device)
        net.load_state_dict(saved["state_dict"])
        return net.eval(), float(saved["test_accuracy"])
    net, accuracy = train_classifier(data, device, seed=0, epochs=epochs)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": net.state_dict(), "test_accuracy": accuracy}, path)
    return net, accuracy


def train_classifier(data: tuple, device: torch.device, seed: int, epochs: int = 2) -> tuple[Classifier, float]:
    """A :class:`Classifier` trained for ``epochs`` of Adam from ``seed`` on ``data``, with its test accuracy."""
    train_x, train_y, test_x, test_y = data
    torch.manual_seed(seed)
    net = Classifier().to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    for epoch in range(epochs):
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), 256):
            index = order[start : start + 256]
            logits = net.head(net.features(train_x[index].to(device)))
            loss = F.cross_entropy(logits, train_y[index].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"classifier epoch {epoch + 1}: loss {loss.item():.3f}", flush=True)
    net.eval()
    return net, float((predict(net, test_x, device) == test_y).float().mean())


@torch.inference_mode()
def predict(net: Classifier, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([net.head(net.features(b.to(device))).argmax(1).cpu() for b in images.split(500)])


@torch.inference_mode()
def features(net: Classifier, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.cat([net.features(b.to(device)).double().cpu() for b in images.split(500)])


# ---------------------------------------------------------------- the scores


def at_28(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 1, H, W)`` images at the classifier's 28x28 (experiment=fashion trains at 32x32)."""
    if images.shape[-1] == 28:
        return images
    images = F.interpolate(images.float(), size=(28, 28), mode="bilinear", antialias=True)
    return images.round().clamp(0, 255).to(torch.uint8)


def npz_images(path: Path) -> torch.Tensor:
    """sample.py's samples.npz as uint8 ``(N, C, H, W)``."""
    return torch.from_numpy(np.load(path)["arr_0"]).permute(0, 3, 1, 2)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaenniemi et al. 2019: a fake sample counts toward precision when it lies inside the k-NN ball of some
    real sample; recall swaps the roles."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # the point itself is its own nearest neighbour

    def covered(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= r[None]).any(1).float().mean())

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def scores(net: Classifier, images: torch.Tensor, reference: torch.Tensor, device: torch.device) -> dict:
    """FID, KID, precision, recall and the class histogram of uint8 ``images`` against ``reference``, plus the
    FIDs of the two halves of the images (their spread is the noise of the FID)."""

    def fid_kid(fake: torch.Tensor) -> dict[str, float]:
        metrics = ImageMetrics(net, kid_subset_size=min(1000, len(fake), len(reference))).to(device)
        for batch in reference.split(500):
            metrics.update(batch.to(device), real=True)
        for batch in fake.split(500):
            metrics.update(batch.to(device), real=False)
        return metrics.compute()

    whole = fid_kid(images)
    halves = [fid_kid(images[: len(images) // 2])["fid"], fid_kid(images[len(images) // 2 :])["fid"]]
    precision, recall = precision_recall(features(net, reference, device), features(net, images, device))
    classes = torch.bincount(predict(net, images, device), minlength=10)
    return {
        "fid": whole["fid"],
        "kid": whole["kid"],
        "fid_halves": halves,
        "precision": precision,
        "recall": recall,
        "class_histogram": classes.tolist(),
    }
