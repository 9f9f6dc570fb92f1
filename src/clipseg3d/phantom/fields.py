"""Smooth random fields on a case's grid, interpolated from values at a coarse lattice of knots."""

from __future__ import annotations

import numpy as np


def _smooth_weights(coords: np.ndarray, knots: np.ndarray) -> np.ndarray:
    """Normalised gaussian interpolation weights (len(coords) x len(knots))."""
    width = 0.8 * (knots[1] - knots[0])
    w = np.exp(-0.5 * ((coords[:, None] - knots[None, :]) / width) ** 2)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def tensor_field(axes, knots, values: np.ndarray) -> np.ndarray:
    """A smooth field on the grid from values at a coarse lattice of knots (separable interpolation)."""
    wx, wy, wz = (_smooth_weights(a, k) for a, k in zip(axes, knots))
    field_ = np.tensordot(values.astype(np.float32), wz, axes=([2], [1]))   # (kx, ky, nz)
    field_ = np.tensordot(field_, wy, axes=([1], [1]))                       # (kx, nz, ny)
    field_ = np.tensordot(wx, field_, axes=([1], [0]))                       # (nx, nz, ny)
    return np.ascontiguousarray(field_.transpose(0, 2, 1))
