"""Moments of a normal variable through a clipping activation, for analytic bias correction and data-free ranges.

For z ~ N(μ, σ²) and x = clip(z, a, b), with α = (a − μ)/σ, β = (b − μ)/σ, Φ / φ the standard normal cdf / pdf
(Nagel et al. 2019, Appendix C, generalized to two-sided clipping):
    E[x]  = a·Φ(α) + μ·(Φ(β) − Φ(α)) + σ·(φ(α) − φ(β)) + b·(1 − Φ(β))
    E[x²] = a²·Φ(α) + (μ² + σ²)·(Φ(β) − Φ(α)) + 2μσ·(φ(α) − φ(β)) + σ²·(α·φ(α) − β·φ(β)) + b²·(1 − Φ(β))
(terms with an infinite bound vanish).
"""
from __future__ import annotations

import numpy as np
from scipy.special import ndtr


def _pdf(x):
    """The standard normal density."""
    return np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi)


def clipped_normal_moments(mu, sigma, a=-np.inf, b=np.inf) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of clip(z, a, b), z ~ N(mu, sigma²), elementwise over broadcast arrays."""
    mu = np.asarray(mu, np.float64)
    sigma = np.maximum(np.abs(np.asarray(sigma, np.float64)), 1e-12)
    a, b = np.broadcast_to(np.asarray(a, np.float64), mu.shape), np.broadcast_to(np.asarray(b, np.float64), mu.shape)
    fa, fb = np.isfinite(a), np.isfinite(b)
    a0, b0 = np.where(fa, a, 0.0), np.where(fb, b, 0.0)  # finite stand-ins; their terms are masked below
    al, be = (a0 - mu) / sigma, (b0 - mu) / sigma
    cdf_a, pdf_a = np.where(fa, ndtr(al), 0.0), np.where(fa, _pdf(al), 0.0)
    cdf_b, pdf_b = np.where(fb, ndtr(be), 1.0), np.where(fb, _pdf(be), 0.0)
    mid = cdf_b - cdf_a
    mean = a0 * cdf_a + mu * mid + sigma * (pdf_a - pdf_b) + b0 * (1 - cdf_b)
    second = (a0**2 * cdf_a + (mu**2 + sigma**2) * mid + 2 * mu * sigma * (pdf_a - pdf_b)
              + sigma**2 * (al * pdf_a - be * pdf_b) + b0**2 * (1 - cdf_b))
    return mean, np.sqrt(np.maximum(second - mean**2, 0.0))
