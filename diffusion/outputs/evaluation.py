"""Evaluation: FID and KID against real images (torchmetrics), and the negative log-likelihood in bits per
dimension, through the variational bound (the evaluation of improved DDPM) and through the probability-flow ODE
(:mod:`diffusion.core.likelihood`)."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from tqdm import tqdm

from diffusion.core.denoiser import Denoiser
from diffusion.core.images import to_uint8
from diffusion.core.likelihood import bits_per_dim, dequantize, ode_log_likelihood
from diffusion.core.objectives import Objective
from diffusion.core.reverse import Variance
from diffusion.errors import RunError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"


def rgb(images: Tensor) -> Tensor:
    """Grayscale ``(N, 1, H, W)`` repeated to three channels, as Inception expects; RGB unchanged."""
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


class ImageMetrics(nn.Module):
    """FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) of generated against real uint8 images, sharing one
    feature network. The real statistics survive :meth:`reset_fake`, so they are computed once per run; in a
    multi-process run each process adds its share and torchmetrics reduces the states in :meth:`compute`.

    Args:
        feature: an Inception-v3 feature size (64, 192, 768 or 2048; torch-fidelity's weights), or an ``nn.Module``
            mapping uint8 ``(N, 3, H, W)`` images to ``(N, D)`` features.
        kid_subset_size: images per KID subset (at most the number of images of either kind).
    """

    def __init__(self, feature: int | nn.Module, kid_subset_size: int) -> None:
        super().__init__()
        try:
            self.fid = FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=False)
        except OSError as error:  # urllib's URLError: the weights could not be fetched
            raise RunError(
                f"FID and KID need the Inception-v3 weights of torch-fidelity, which could not be downloaded "
                f"({error}). On a machine with internet, download {INCEPTION_URL} and put it at "
                f"{Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_FILE} (or under $TORCH_HOME/hub/checkpoints), "
                f"then run again; or give a feature network of your own with eval.feature. The samples were written."
            ) from None
        self.kid = KernelInceptionDistance(
            feature=self.fid.inception, subset_size=kid_subset_size, reset_real_features=False, normalize=False
        )

    def update(self, images: Tensor, real: bool) -> None:
        """images: ``(N, C, H, W)`` uint8."""
        images = rgb(images)
        self.fid.update(images, real=real)
        self.kid.update(images, real=real)

    def compute(self) -> dict[str, float]:
        kid_mean, kid_std = self.kid.compute()
        return {"fid": float(self.fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}

    def reset_fake(self) -> None:
        self.fid.reset()
        self.kid.reset()


def nll_bits_per_dim(
    denoiser_for: Callable[[Tensor | None], Denoiser],
    objective: Objective,
    batches: Iterable[tuple[Tensor, Tensor]],
    variance: Variance,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """The negative variational bound on log p(x0) in bits per dimension over ``batches`` of ``(x0 in [-1, 1],
    labels)``: the sum of all T terms of an objective that has one (``has_variational_bound``) and the prior
    (improved-diffusion's ``calc_bpd_loop``), one network evaluation per term and image. ``denoiser_for(labels)``
    gives the denoiser for a batch. Returns the mean and its standard error over images, with the prior, decoder
    (t = 0) and KL parts."""
    totals, priors, decoders = [], [], []
    progress = tqdm(desc="NLL: terms of the bound", unit="term", file=sys.stderr)
    for x0, labels in batches:
        terms = {}
        for t, term in objective.vlb_terms_bpd(denoiser_for(labels), x0, variance, generator):
            terms[t] = term
            progress.update(1)
        prior = objective.prior_bpd(x0)
        totals.append(torch.stack(list(terms.values())).sum(0) + prior)
        priors.append(prior)
        decoders.append(terms[0])
    progress.close()
    if not totals:
        raise RunError("there were no images to evaluate the likelihood on")
    total, prior, decoder = torch.cat(totals).double(), torch.cat(priors).double(), torch.cat(decoders).double()
    return {
        "nll_bpd": float(total.mean()),
        "nll_bpd_stderr": float(total.std() / math.sqrt(len(total))) if len(total) > 1 else float("nan"),
        "prior_bpd": float(prior.mean()),
        "decoder_bpd": float(decoder.mean()),
        "kl_bpd": float((total - prior - decoder).mean()),
        "images": len(total),
    }


def ode_nll_bits_per_dim(
    denoiser_for: Callable[[Tensor | None], Denoiser],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    probes: int,
    rtol: float,
    atol: float,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """The negative log-likelihood of 8-bit ``batches`` of ``(x0 in [-1, 1], labels)`` in bits per dimension through
    the probability-flow ODE (:func:`diffusion.core.likelihood.ode_log_likelihood`), each image dequantized uniformly
    within its bins: the mean and its standard error over images, and the denoiser's evaluations per image (each with
    ``probes`` vector-Jacobian products). ``denoiser_for(labels)`` gives the denoiser for a batch; it must not clip."""
    bits, evaluations = [], []
    progress = tqdm(desc="NLL: probability-flow ODE", unit="batch", file=sys.stderr)
    for x0, labels in batches:
        x = dequantize(x0, generator)
        log_likelihood, nfe = ode_log_likelihood(
            denoiser_for(labels), x, probes=probes, rtol=rtol, atol=atol, generator=generator
        )
        bits.append(bits_per_dim(log_likelihood, x0[0].numel(), dequantized=True))
        evaluations += [nfe] * len(x0)
        progress.update(1)
    progress.close()
    if not bits:
        raise RunError("there were no images to evaluate the likelihood on")
    total = torch.cat(bits)
    return {
        "ode_nll_bpd": float(total.mean()),
        "ode_nll_bpd_stderr": float(total.std() / math.sqrt(len(total))) if len(total) > 1 else float("nan"),
        "ode_nfe": sum(evaluations) / len(evaluations),
        "images": len(total),
    }


def fid_against(
    images: Tensor,
    real: Iterable[tuple[Tensor, Tensor]],
    real_count: int,
    feature: int | nn.Module,
    kid_subset_size: int,
    device: torch.device,
) -> dict[str, float]:
    """FID and KID of ``images`` (uint8 ``(N, C, H, W)``) against ``real_count`` real images in ``real`` batches
    (in model range, as :meth:`diffusion.data.datamodule.DiffusionDataModule.batches` gives them)."""
    subset = max(2, min(kid_subset_size, real_count, len(images)))
    metrics = ImageMetrics(feature, kid_subset_size=subset).to(device)
    with torch.inference_mode():
        for x0, _ in tqdm(real, desc="FID: real features", unit="batch", file=sys.stderr, leave=False):
            metrics.update(to_uint8(x0.to(device)), real=True)
        for start in range(0, len(images), 256):
            metrics.update(images[start : start + 256].to(device), real=False)
        return {**metrics.compute(), "reference_images": real_count}
