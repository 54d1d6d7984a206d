"""Power-function EMA profiles and the post-hoc reconstruction of an EMA of any length (Karras, Aittala, Lehtinen,
Hellsten, Aila and Laine 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", Section 3 and
Appendix C).

Notation (the paper's, except that its training time t is written ``time`` in the code, since ``t`` is a network
timestep everywhere else in this project):

- t: training time, measured here in training images (any unit gives the same profiles: they are scale-free).
- A power-function average at time t weighs the weights of time tau in [0, t] by the profile
  p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)   (eq. 1; it integrates to one).
- Its length is the relative standard deviation of that profile, sigma_rel = std(tau) / t (eq. 2):
  sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)). gamma follows from sigma_rel as the largest real root of
  gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (the same equation, multiplied out).
- After a step of B images that ends at time t the average is updated as avg <- beta avg + (1 - beta) w with
  beta = (1 - B / t)^(gamma + 1) (eq. 3). Then, exactly, avg_t = sum_k (t_k^(gamma+1) - t_{k-1}^(gamma+1)) /
  t^(gamma+1) w_k: each step's weights get the profile's integral over that step, whatever the batch sizes
  (:func:`profile_weights`, which the tests check the update against).
- Reconstruction (Algorithm 3): snapshots of averages with profiles p_i (times t_i, exponents gamma_i) are combined
  as sum_i x_i avg_i with x = A^-1 b, A_ij = <p_i, p_j>, b_i = <p_i, p_target>: the least-squares fit of the
  target profile by the stored ones, the inner products of two profiles in closed form (:func:`profile_dot`).

Everything here is float64 NumPy on plain numbers; the callback that tracks the averages and
writes the snapshots is :class:`diffusion.training.posthoc_ema.PostHocEMA`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from diffusion.errors import SettingError

SIGMA_REL_RANGE = (0.01, 0.28)  # gamma from about 97 down to 0.17; the paper sweeps 0.01 to 0.25


def sigma_rel_of_gamma(gamma: float | np.ndarray) -> np.ndarray:
    """The relative standard deviation of the profile tau^gamma (eq. 2)."""
    gamma = np.asarray(gamma, dtype=np.float64)
    return np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def gamma_of_sigma_rel(sigma_rel: float | np.ndarray) -> np.ndarray:
    """The exponent gamma of the profile of length ``sigma_rel``: the largest real root of the cubic above."""
    sigma_rel = np.asarray(sigma_rel, dtype=np.float64)
    check_sigma_rel(sigma_rel)
    roots = [np.roots([1.0, 7.0, 16.0 - s**-2, 12.0 - s**-2]) for s in sigma_rel.reshape(-1)]
    gammas = [r[np.abs(r.imag) < 1e-9].real.max() for r in roots]
    return np.asarray(gammas, dtype=np.float64).reshape(sigma_rel.shape)


def check_sigma_rel(sigma_rel: float | np.ndarray) -> None:
    low, high = SIGMA_REL_RANGE
    values = np.asarray(sigma_rel, dtype=np.float64).reshape(-1)
    bad = [float(v) for v in values if not low <= v <= high]
    if bad:
        raise SettingError(
            f"an EMA length (sigma_rel) must lie in [{low}, {high}], got {bad[0]:g}: it is the standard deviation of "
            f"the average's profile relative to the training time (the paper uses 0.05 and 0.10, and sweeps 0.01 to "
            f"0.25)"
        )


def power_beta(images_seen: float, batch_images: float, gamma: float) -> float:
    """beta = (1 - B / t)^(gamma + 1) for a step of ``batch_images`` images ending at ``images_seen`` (eq. 3); the
    first step (t = B) gives 0, which copies the weights."""
    if batch_images <= 0 or images_seen < batch_images:
        raise ValueError(f"a step of {batch_images} images cannot end at {images_seen} images seen")
    return (1.0 - batch_images / images_seen) ** (gamma + 1.0)


def profile_weights(step_ends: Sequence[float], gamma: float) -> np.ndarray:
    """The weight of each step's weights in the power-function average after the last step, for steps ending at
    ``step_ends`` (increasing, the first step starting at 0): (t_k^(g+1) - t_{k-1}^(g+1)) / t_n^(g+1)."""
    ends = np.asarray(step_ends, dtype=np.float64)
    cumulative = (ends / ends[-1]) ** (gamma + 1.0)
    return np.diff(cumulative, prepend=0.0)


def profile_dot(time_a: np.ndarray, gamma_a: np.ndarray, time_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral over [0, min(t_a, t_b)] of the product of the two profiles:
    (g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)), m = min(t_a, t_b),
    written with ratios at most one so that large exponents do not overflow. Broadcasts."""
    time_a, gamma_a, time_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (time_a, gamma_a, time_b, gamma_b))
    # (m / t_b)^g_b (m / t_a)^g_a, one of the two ratios being 1
    ratio = np.where(time_a < time_b, (time_a / time_b) ** gamma_b, (time_b / time_a) ** gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio / ((gamma_a + gamma_b + 1) * np.maximum(time_a, time_b))


def _normal_equations(
    times: Sequence[float], sigma_rels: Sequence[float], target_time: float, target_sigma_rel: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """A_ij = <p_i, p_j>, b_i = <p_i, p_target> and <p_target, p_target> for the stored and the target profiles."""
    time = np.asarray(times, dtype=np.float64)
    g = gamma_of_sigma_rel(np.asarray(sigma_rels, dtype=np.float64))
    g_target = float(gamma_of_sigma_rel(target_sigma_rel))
    gram = profile_dot(time[:, None], g[:, None], time[None, :], g[None, :])
    b = profile_dot(time, g, target_time, g_target)
    return gram, b, float(profile_dot(target_time, g_target, target_time, g_target))


def reconstruction_coefficients(
    times: Sequence[float], sigma_rels: Sequence[float], target_time: float, target_sigma_rel: float
) -> np.ndarray:
    """x of Algorithm 3: the coefficients of the stored averages (at ``times``, of lengths ``sigma_rels``, one pair
    per snapshot average) whose combination has the profile closest in L2 to the target's, ``(len(times),)``."""
    gram, b, _ = _normal_equations(times, sigma_rels, target_time, target_sigma_rel)
    return np.linalg.lstsq(gram, b, rcond=None)[0]  # lstsq, not solve: two snapshots at one time may be collinear


def profile_residual(
    times: Sequence[float], sigma_rels: Sequence[float], target_time: float, target_sigma_rel: float
) -> float:
    """||sum_i x_i p_i - p_target|| / ||p_target||: how well the stored profiles can represent the target's."""
    gram, b, target = _normal_equations(times, sigma_rels, target_time, target_sigma_rel)
    x = np.linalg.lstsq(gram, b, rcond=None)[0]
    return float(np.sqrt(max(x @ gram @ x - 2 * x @ b + target, 0.0) / target))


__all__ = [
    "SIGMA_REL_RANGE",
    "check_sigma_rel",
    "gamma_of_sigma_rel",
    "power_beta",
    "profile_dot",
    "profile_residual",
    "profile_weights",
    "reconstruction_coefficients",
    "sigma_rel_of_gamma",
]
