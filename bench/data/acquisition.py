"""Acquisition physics of the synthetic generator: diffusion signal, Rician noise, EPI artefacts, headers.

Contract (used by :mod:`bench.data.synth`; every function is deterministic given its ``rng``):

* **Signal.** ADC maps are not measured, they are computed. A diffusion-weighted spin-echo EPI acquires a
  b = 0 image ``S0`` and, for each of :data:`N_DIFFUSION_DIRECTIONS` orthogonal gradient directions, a
  b = :data:`B_VALUE` image ``S0 * exp(-b * ADC)`` (Stejskal-Tanner). The scanner takes the magnitude of
  the complex reconstruction, so thermal noise (complex Gaussian, standard deviation ``sigma`` per
  channel) becomes **Rician** (:func:`rician_magnitude`): unbiased where the signal is high, biased upward
  where it approaches the noise floor. The trace image is the geometric mean of the directions, and
  ``ADC = ln(S0 / S_trace) / b`` (:func:`adc_from_signals`). Consequences the generator reproduces without
  being told: ADC noise grows with ADC (the b = 1000 signal of CSF, ADC ~ 3.0 um^2/ms, is ~5 % of its
  S0), and fluid ADC is *underestimated* at low SNR (the noise floor lifts ``S_b``).
* **EPI artefacts** (:class:`EpiArtefacts`): a smooth displacement along the phase-encode axis (array
  axis 1; B0 inhomogeneity near air-tissue interfaces shifts EPI pixels along the blipped axis only),
  T2* blurring along that axis (the signal decays during the echo train, widening the point spread
  function in phase-encode only), a per-direction shift of the diffusion-weighted images relative to
  ``S0`` (eddy currents of the diffusion gradients), and slice-wise in-plane motion (a neonate moving
  between the interleaved slices of one volume). Distortion and motion move the anatomy; the rater
  outlines what is shown, so they move the label with it, but not the normative atlas.
* **Headers** (:data:`ORIENTATIONS`, :func:`store_oriented`): the generator works in one frame, array
  (z, y, x) = (superior, posterior, left) with the identity direction (ITK's LPS). A case is then
  *stored* in its site's orientation: the same voxels in another array order (``RAS``: x and y axes
  reversed; ``LAS``: y reversed, a left-handed index frame as radiological-convention NIfTI files have)
  or on an oblique grid (slices prescribed along the head, the grid rotated in scanner space). Every
  voxel keeps its physical position; only the header and the array order change.

Units: ADC in 10^-6 mm^2/s (the unit of the BONBID-HIE maps), b in s/mm^2, signals relative to the b = 0
signal of white matter (1.0), lengths in millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from bench.imageio import Geometry

#: Diffusion weighting of the clinical neonatal DWI that BONBID-HIE's ADC maps come from (s/mm^2).
B_VALUE = 1000.0
#: Orthogonal diffusion directions averaged (geometric mean) into the trace image.
N_DIFFUSION_DIRECTIONS = 3
#: ADC unit: 10^-6 mm^2/s, so ``b * ADC`` = ``ADC / 1000`` at b = 1000.
ADC_UNIT_MM2_S = 1e-6
#: Smallest signal used in the logarithm (relative units): a noise-free zero would give an infinite ADC.
SIGNAL_FLOOR = 1e-4
#: Stored ADC range, 10^-6 mm^2/s: 0 marks the skull-stripped background, so brain voxels are at least 1.
ADC_STORED_RANGE = (1.0, 4000.0)
#: Array axis of the phase-encode direction (anterior-posterior, as in axial neonatal EPI).
PHASE_ENCODE_AXIS = 1
#: Correlation length of the susceptibility displacement field (mm): B0 offsets vary over centimetres.
DISTORTION_SCALE_MM = 40.0


def rician_magnitude(signal: np.ndarray, sigma: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of standard deviation ``sigma`` per channel.

    ``|S + sigma * (n_re + i n_im)|`` is Rician distributed: mean ``sqrt(S^2 + sigma^2)`` at high SNR,
    ``sigma * sqrt(pi / 2)`` (the noise floor) where ``S`` is 0.
    """
    real = rng.standard_normal(signal.shape, dtype=np.float32)
    real *= sigma
    real += signal
    imaginary = rng.standard_normal(signal.shape, dtype=np.float32)
    imaginary *= sigma
    return np.sqrt(real * real + imaginary * imaginary, dtype=np.float32)


def adc_from_signals(s0: np.ndarray, s_trace: np.ndarray, b_value: float = B_VALUE) -> np.ndarray:
    """``ln(S0 / S_b) / b`` in 10^-6 mm^2/s (mono-exponential decay), both signals floored above 0."""
    ratio = np.maximum(s0, SIGNAL_FLOOR) / np.maximum(s_trace, SIGNAL_FLOOR)
    return (np.log(ratio) / (b_value * ADC_UNIT_MM2_S)).astype(np.float32)


def diffusion_weighted(s0: np.ndarray, adc: np.ndarray, b_value: float = B_VALUE) -> np.ndarray:
    """Noise-free b-value signal ``S0 * exp(-b * ADC)`` (ADC in 10^-6 mm^2/s)."""
    return (s0 * np.exp(-b_value * ADC_UNIT_MM2_S * adc)).astype(np.float32)


@dataclass(frozen=True)
class EpiArtefacts:
    """How one site's EPI departs from a perfect acquisition (all zero: a perfect one).

    ``distortion_mm``: standard deviation of the phase-encode displacement left after the site's
    correction (0.5-1 mm with field-map correction, 2-3 mm without). ``blur_px``: Gaussian sigma of the
    T2* point-spread broadening along phase-encode, in acquired pixels. ``eddy_px``: standard deviation of
    each diffusion direction's shift against ``S0`` along phase-encode, in acquired pixels.
    ``motion_fraction``: share of slices acquired after the baby moved; ``motion_mm``: standard deviation
    of their in-plane displacement.
    """

    distortion_mm: float = 0.0
    blur_px: float = 0.0
    eddy_px: float = 0.0
    motion_fraction: float = 0.0
    motion_mm: float = 0.0


def slice_motion_mm(rng: np.random.Generator, n_slices: int, artefacts: EpiArtefacts) -> np.ndarray:
    """``(n_slices, 2)`` in-plane displacement (y, x) in mm of each slice; 0 for slices acquired before any
    movement. Interleaved acquisition makes the moved slices scattered, not one contiguous block."""
    offsets = np.zeros((n_slices, 2))
    if artefacts.motion_fraction <= 0 or artefacts.motion_mm <= 0:
        return offsets
    moved = rng.random(n_slices) < artefacts.motion_fraction
    offsets[moved] = rng.normal(0.0, artefacts.motion_mm, size=(int(moved.sum()), 2))
    return offsets


def shift_along(volume: np.ndarray, shift_px: float, axis: int = PHASE_ENCODE_AXIS) -> np.ndarray:
    """``volume`` translated by ``shift_px`` (fractional) pixels along ``axis``, linear interpolation,
    edges repeated (the shifted-in border is background or its nearest neighbour)."""
    if abs(shift_px) < 1e-6:
        return volume
    n = volume.shape[axis]
    position = np.clip(np.arange(n) - shift_px, 0.0, n - 1.0)
    lower = np.minimum(np.floor(position).astype(int), max(n - 2, 0))
    fraction = (position - lower).astype(np.float32)
    shape = [1] * volume.ndim
    shape[axis] = -1
    weight = fraction.reshape(shape)
    upper = np.minimum(lower + 1, n - 1)
    return (np.take(volume, lower, axis=axis) * (1.0 - weight) + np.take(volume, upper, axis=axis) * weight).astype(np.float32)


@dataclass(frozen=True)
class SignalProtocol:
    """Noise level and artefacts of one acquisition, applied by :func:`acquire_adc`."""

    #: b = 0 SNR of white matter on one acquired voxel (3 T about 30-40, 1.5 T about 15-20).
    snr_b0: float
    artefacts: EpiArtefacts = field(default_factory=EpiArtefacts)


def acquire_adc(
    s0: np.ndarray,
    s_b: np.ndarray,
    protocol: SignalProtocol,
    rng: np.random.Generator,
    support: np.ndarray | None = None,
    artefact_rng: np.random.Generator | None = None,
) -> np.ndarray:
    """ADC (10^-6 mm^2/s) computed from noisy magnitude images, on the acquired grid.

    ``s0`` and ``s_b`` are the noise-free b = 0 and b = :data:`B_VALUE` signals (partial-volume mixed,
    relative to white-matter S0). T2* blur and per-direction eddy shifts are applied before the noise,
    as they act on the signal during the readout. With ``support`` (flat indices), noise is drawn and the
    ADC computed only there (elsewhere it is 0): the brain and its rim are all that is ever kept.
    Eddy shifts draw from ``artefact_rng`` (default ``rng``), the noise from ``rng``.
    """
    from scipy import ndimage

    art = protocol.artefacts
    if art.blur_px > 0:
        s0 = ndimage.gaussian_filter1d(s0, art.blur_px, axis=PHASE_ENCODE_AXIS, mode="nearest")
        s_b = ndimage.gaussian_filter1d(s_b, art.blur_px, axis=PHASE_ENCODE_AXIS, mode="nearest")
    shifts = (artefact_rng or rng).normal(0.0, art.eddy_px, size=N_DIFFUSION_DIRECTIONS) if art.eddy_px > 0 else np.zeros(N_DIFFUSION_DIRECTIONS)

    def at_support(volume: np.ndarray) -> np.ndarray:
        return volume.reshape(-1)[support] if support is not None else volume

    sigma = 1.0 / protocol.snr_b0
    noisy_s0 = rician_magnitude(at_support(s0), sigma, rng)
    log_trace = np.zeros(noisy_s0.shape, np.float32)
    for shift in shifts:
        log_trace += np.log(np.maximum(rician_magnitude(at_support(shift_along(s_b, float(shift))), sigma, rng), SIGNAL_FLOOR))
    adc = adc_from_signals(noisy_s0, np.exp(log_trace / N_DIFFUSION_DIRECTIONS))
    if support is None:
        return adc
    full = np.zeros(s0.size, np.float32)
    full[support] = adc
    return full.reshape(s0.shape)


# --------------------------------------------------------------------------------------------------
# Smooth random fields (bias, distortion, deformation, rater wobble)


def _bspline_weights(n_out: int, n_control: int) -> np.ndarray:
    """``(n_out, n_control)`` cubic B-spline interpolation matrix spanning the inner control points."""
    position = np.linspace(1.0, n_control - 3.0 - 1e-9, n_out) if n_out > 1 else np.array([1.0])
    base = np.floor(position).astype(int)
    t = position - base
    weights = np.zeros((n_out, n_control))
    rows = np.arange(n_out)
    for offset, w in enumerate(((1 - t) ** 3 / 6, (3 * t**3 - 6 * t**2 + 4) / 6, (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6, t**3 / 6)):
        weights[rows, base - 1 + offset] = w
    return weights


def smooth_random_field(
    rng: np.random.Generator, shape: Sequence[int], control_spacing_vox: Sequence[float], n_fields: int = 1
) -> np.ndarray:
    """``n_fields`` smooth Gaussian random fields of unit standard deviation on a grid of ``shape``.

    Random values on a coarse grid (one control point every ``control_spacing_vox`` voxels per axis) are
    interpolated with cubic B-splines. The interpolation is separable, so it costs three small matrix
    products instead of a 3-D filter; each row of the interpolation matrices is divided by its own gain,
    so the standard deviation is one at every voxel. Returns ``(n_fields, *shape)`` float32.
    """
    matrices = []
    for n, spacing in zip(shape, control_spacing_vox):
        n_control = int(np.ceil((n - 1) / max(float(spacing), 1e-6))) + 4
        weights = _bspline_weights(int(n), n_control)
        matrices.append(weights / np.sqrt((weights**2).sum(axis=1, keepdims=True)))
    wz, wy, wx = matrices
    control = rng.standard_normal((n_fields, wz.shape[1], wy.shape[1], wx.shape[1]))
    # One axis at a time, with plain matrix products: x, then y, then z. Double precision, so that
    # differences between BLAS kernels vanish when the result is rounded to float32.
    fields = np.matmul(np.matmul(wy, control @ wx.T).reshape(n_fields, wz.shape[1], -1).transpose(0, 2, 1), wz.T)
    return np.ascontiguousarray(fields.transpose(0, 2, 1), dtype=np.float32).reshape(n_fields, *(int(n) for n in shape))


# --------------------------------------------------------------------------------------------------
# Storage orientation (image headers)

#: Storage orientations: how the generator's (S, P, L) array is stored. Codes name where the x, y, z
#: index axes point (ITK / DICOM "to" convention, as :func:`SimpleITK.DICOMOrient` uses them).
ORIENTATIONS: tuple[str, ...] = ("LPS", "RAS", "LAS", "oblique")
#: Array axes (z, y, x) reversed by each orthogonal storage orientation.
_FLIPPED_AXES: dict[str, tuple[int, ...]] = {"LPS": (), "RAS": (1, 2), "LAS": (1,)}
#: Oblique prescriptions: standard deviations (degrees) of the grid's rotation about the L-R axis
#: (pitch: slices along the AC-PC line, the largest), the A-P axis and the S-I axis.
OBLIQUE_SD_DEG = (12.0, 4.0, 4.0)


def oblique_rotation(rng: np.random.Generator) -> np.ndarray:
    """A random 3x3 rotation (physical x, y, z) of an oblique slice prescription, at least 5 degrees of pitch."""
    pitch, roll, yaw = np.deg2rad(rng.normal(0.0, OBLIQUE_SD_DEG))
    pitch = np.sign(pitch or 1.0) * max(abs(pitch), np.deg2rad(5.0))
    about_x = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    about_y = np.array([[np.cos(roll), 0, np.sin(roll)], [0, 1, 0], [-np.sin(roll), 0, np.cos(roll)]])
    about_z = np.array([[np.cos(yaw), -np.sin(yaw), 0], [np.sin(yaw), np.cos(yaw), 0], [0, 0, 1]])
    return about_z @ about_y @ about_x


def store_oriented(arrays: Sequence[np.ndarray], geometry: Geometry, orientation: str, rng: np.random.Generator) -> tuple[list[np.ndarray], Geometry]:
    """``arrays`` (on ``geometry``, identity direction) and the geometry as stored in ``orientation``.

    Flipped orientations reverse array axes and move the origin to the voxel that becomes index 0, with
    the matching direction cosines; ``oblique`` keeps the arrays and rotates the grid about its centre.
    Either way each voxel keeps its physical position (or, oblique, the whole image moves rigidly).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; known: {', '.join(ORIENTATIONS)}")
    shape = np.asarray(geometry.shape, float)
    spacing_xyz = np.asarray(geometry.spacing[::-1], float)
    origin_xyz = np.asarray(geometry.origin[::-1], float)
    if orientation == "oblique":
        rotation = oblique_rotation(rng)
        center = origin_xyz + (shape[::-1] - 1) / 2.0 * spacing_xyz
        origin_xyz = center + rotation @ (origin_xyz - center)
        direction = rotation
    else:
        flips = _FLIPPED_AXES[orientation]
        arrays = [np.flip(a, axis=flips) if flips else a for a in arrays]
        signs = np.ones(3)
        for axis in flips:  # array axis a is physical axis 2 - a (x is the last array axis)
            signs[2 - axis] = -1.0
            origin_xyz[2 - axis] += (shape[axis] - 1) * spacing_xyz[2 - axis]
        direction = np.diag(signs)
    stored = Geometry(
        shape=geometry.shape,
        spacing=geometry.spacing,
        origin=tuple(float(v) for v in np.round(origin_xyz[::-1], 4)),
        direction=tuple(float(v) + 0.0 for v in np.round(direction.ravel(), 8)),
    )
    return [np.ascontiguousarray(a) for a in arrays], stored


def choose(weights: Mapping[str, float], rng: np.random.Generator) -> str:
    """One key of ``weights`` drawn with probability proportional to its weight (sorted keys: reproducible)."""
    names = sorted(k for k, w in weights.items() if w > 0)
    probabilities = np.array([weights[n] for n in names], float)
    return names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]
