"""Synthetic chest-CT phantom in Hounsfield units.

The phantom is deliberately simple geometry (ellipses, discs and smooth blobs)
but with CT-like intensities and noise so that a DICOM reader, a lung-slice
policy and a small CNN all have something realistic to work on.

Image axes follow the DICOM convention for an axial slice with
ImageOrientationPatient ``[1, 0, 0, 0, 1, 0]``: rows run from anterior (row 0)
to posterior, columns from the patient's right (column 0) to the left.
Slices are ordered from feet to head (increasing z).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["HU_MAX", "HU_MIN", "Phantom", "chest_phantom"]

HU_MIN = -1024
HU_MAX = 3071

# Tissue levels (HU).
_AIR = -1000.0
_FAT = -100.0
_SOFT = 40.0
_LUNG = -850.0
_VESSEL = 38.0
_CORTICAL = 700.0
_TRABECULAR = 250.0
_CSF = 15.0
_LIVER = 58.0

# Noise standard deviations (HU): quantum noise everywhere, extra
# parenchymal texture inside the lungs.
_NOISE_STD = 12.0
_LUNG_TEXTURE_STD = 22.0


@dataclass
class Phantom:
    """A synthetic chest-CT volume.

    Attributes
    ----------
    hu : numpy.ndarray
        int16 HU, shape (slices, size, size), slices ordered by increasing z.
    lesion_mask : numpy.ndarray
        bool, True where ground-glass opacity or consolidation was painted.
    lung_mask : numpy.ndarray
        bool, True inside the lungs (lesions included).
    """

    hu: np.ndarray
    lesion_mask: np.ndarray
    lung_mask: np.ndarray

    @property
    def lung_slices(self) -> np.ndarray:
        """Indices of slices that contain lung."""
        return np.flatnonzero(self.lung_mask.any(axis=(1, 2)))

    @property
    def lesion_slices(self) -> np.ndarray:
        """Indices of slices that contain at least one lesion pixel."""
        return np.flatnonzero(self.lesion_mask.any(axis=(1, 2)))


@dataclass
class _Blob:
    """One sub-sphere of a lesion, offset from the lesion centre."""

    du: float  # in-plane offset, fraction of image size
    dv: float
    dz: float  # z offset, slices
    r: float  # in-plane radius, fraction of image size
    rz: float  # z radius, slices


@dataclass
class _Lesion:
    side: int  # 0 = patient right lung, 1 = left
    zc: float  # centre, lung-slice index
    theta: float  # angle of the pleural anchor point on the lung ellipse
    depth: float  # fraction of lung radius from the lung centre
    hu: float  # ground-glass level
    core_hu: float | None  # consolidation level, None for pure GGO
    blobs: list[_Blob]


@dataclass
class _Tube:
    """A vessel or nodule following a straight line in lung coordinates."""

    side: int
    u0: float  # position in normalised lung coordinates at t = 0
    v0: float
    du: float  # drift per unit t
    dv: float
    r: float  # radius, fraction of image size
    z_lo: float  # extent, lung-slice index (inclusive, fractional)
    z_hi: float
    hu: float
    zc: float | None = None  # spherical profile centre for nodules


def _box(cy: float, cx: float, ry: float, rx: float, size: int) -> tuple[slice, slice] | None:
    """Bounding box of an ellipse, clipped to the image; None when outside."""
    y0 = max(int(np.floor(cy - ry)) - 1, 0)
    y1 = min(int(np.ceil(cy + ry)) + 2, size)
    x0 = max(int(np.floor(cx - rx)) - 1, 0)
    x1 = min(int(np.ceil(cx + rx)) + 2, size)
    if y0 >= y1 or x0 >= x1:
        return None
    return slice(y0, y1), slice(x0, x1)


def _ellipse(
    grid: np.ndarray, cy: float, cx: float, ry: float, rx: float
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """Boolean ellipse restricted to its bounding box.

    Working in the bounding box keeps the per-slice cost proportional to the
    object area, which is what makes 512x512x300 volumes fast.
    """
    size = grid.shape[0]
    if ry <= 0 or rx <= 0:
        return None
    box = _box(cy, cx, ry, rx, size)
    if box is None:
        return None
    ys = grid[box[0]][:, None]
    xs = grid[box[1]][None, :]
    mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1.0
    return box, mask


def _paint(
    img: np.ndarray,
    shape: tuple[tuple[slice, slice], np.ndarray] | None,
    value: float,
    where: np.ndarray | None = None,
) -> None:
    """Set ``img`` to ``value`` inside ``shape`` (and inside ``where`` if given)."""
    if shape is None:
        return
    box, mask = shape
    if where is not None:
        mask = mask & where[box]
    img[box][mask] = value


def _lung_profile(t: np.ndarray) -> np.ndarray:
    """Lung cross-section scale along z (t=0 base, t=1 apex).

    The apex narrows more than the base, which is cut by the diaphragm dome.
    """
    base = np.sin(np.pi * (0.10 + 0.82 * t)) ** 0.5
    return np.clip(base * (1.0 - 0.25 * t**3), 0.3, 1.0)


def _make_lesions(n: int, rng: np.random.Generator, consolidation: bool) -> list[_Lesion]:
    """Peripheral GGO lesions spread along the lung range."""
    count = int(np.clip(round(n / 3), 6, 12))
    # Stratify the centres so that most lung slices carry a lesion.
    edges = np.linspace(0.08 * n, 0.92 * n, count + 1)
    lesions = []
    for i in range(count):
        zc = rng.uniform(edges[i], edges[i + 1])
        rz_main = max(1.6, rng.uniform(0.10, 0.18) * n)
        r_main = rng.uniform(0.045, 0.065)
        blobs = [_Blob(0.0, 0.0, 0.0, r_main, rz_main)]
        for _ in range(int(rng.integers(2, 5))):
            blobs.append(
                _Blob(
                    du=rng.normal(0, 0.025),
                    dv=rng.normal(0, 0.025),
                    dz=rng.normal(0, 0.3 * rz_main),
                    r=r_main * rng.uniform(0.5, 0.9),
                    rz=rz_main * rng.uniform(0.5, 0.9),
                )
            )
        # Subpleural: anchor on the lateral/posterior part of the lung ellipse.
        side = int(rng.integers(0, 2))
        theta = rng.uniform(-0.6 * np.pi, 0.6 * np.pi)
        core = rng.uniform(-50.0, 40.0) if consolidation and rng.random() < 0.5 else None
        lesions.append(
            _Lesion(
                side=side,
                zc=zc,
                theta=theta,
                depth=rng.uniform(0.72, 0.88),
                hu=rng.uniform(-550.0, -300.0),
                core_hu=core,
                blobs=blobs,
            )
        )
    if consolidation and not any(les.core_hu is not None for les in lesions):
        lesions[0].core_hu = rng.uniform(-50.0, 40.0)
    return lesions


def _make_vessels(n: int, rng: np.random.Generator) -> list[_Tube]:
    tubes = []
    for side in (0, 1):
        for _ in range(int(rng.integers(5, 8))):
            rad = np.sqrt(rng.uniform(0.0, 0.55))
            ang = rng.uniform(0, 2 * np.pi)
            z_lo = rng.uniform(-0.2, 0.5) * n
            tubes.append(
                _Tube(
                    side=side,
                    u0=rad * np.cos(ang),
                    v0=rad * np.sin(ang),
                    du=rng.normal(0, 0.25),
                    dv=rng.normal(0, 0.25),
                    r=rng.uniform(0.01, 0.02),
                    z_lo=z_lo,
                    z_hi=z_lo + rng.uniform(0.4, 1.0) * n,
                    hu=_VESSEL + rng.normal(0, 3),
                )
            )
    return tubes


def _make_nodules(n: int, rng: np.random.Generator) -> list[_Tube]:
    nodules = []
    for _ in range(int(rng.integers(2, 5))):
        rad = np.sqrt(rng.uniform(0.0, 0.5))
        ang = rng.uniform(0, 2 * np.pi)
        zc = rng.uniform(0.15, 0.85) * n
        rz = max(1.0, 0.04 * n)
        nodules.append(
            _Tube(
                side=int(rng.integers(0, 2)),
                u0=rad * np.cos(ang),
                v0=rad * np.sin(ang),
                du=0.0,
                dv=0.0,
                r=rng.uniform(0.02, 0.03),
                z_lo=zc - rz,
                z_hi=zc + rz,
                hu=_SOFT + rng.normal(0, 5),
                zc=zc,
            )
        )
    return nodules


def chest_phantom(
    n_slices: int,
    size: int,
    *,
    positive: bool,
    rng: np.random.Generator,
    nodules: bool = False,
    consolidation: bool = False,
    lung_margin_slices: int = 0,
) -> Phantom:
    """Generate a synthetic chest CT.

    Parameters
    ----------
    n_slices : int
        Number of slices that contain lung.
    size : int
        Rows and columns of each slice.
    positive : bool
        Paint COVID-like peripheral ground-glass opacities.
    rng : numpy.random.Generator
        Source of all randomness (same state -> same volume).
    nodules : bool
        Add a few small solid nodules (meant for negatives).
    consolidation : bool
        Give some lesions a dense consolidation core (positives only).
    lung_margin_slices : int
        Extra lung-free slices added below and above the lungs, so the
        returned volume has ``n_slices + 2 * lung_margin_slices`` slices.

    Returns
    -------
    Phantom
    """
    if n_slices < 1 or size < 16:
        raise ValueError(f"need n_slices >= 1 and size >= 16, got {n_slices}, {size}")
    if lung_margin_slices < 0:
        raise ValueError("lung_margin_slices must be >= 0")
    m = lung_margin_slices
    total = n_slices + 2 * m
    hu = np.empty((total, size, size), dtype=np.int16)
    lesion_mask = np.zeros((total, size, size), dtype=bool)
    lung_mask = np.zeros((total, size, size), dtype=bool)

    # Pixel-centre coordinates; one 1-D grid serves both axes (square image).
    grid = np.arange(size, dtype=np.float32)
    c = (size - 1) / 2.0
    s = float(size)

    # Per-patient anatomy jitter so that studies are not identical.
    body_rx = s * rng.uniform(0.43, 0.47)
    body_ry = s * rng.uniform(0.31, 0.34)
    fat = s * rng.uniform(0.015, 0.03)
    lung_rx = s * rng.uniform(0.135, 0.15)
    lung_ry = s * rng.uniform(0.21, 0.23)
    lung_dx = s * rng.uniform(0.185, 0.2)
    lung_cy = c - s * rng.uniform(0.0, 0.03)
    spine_cy = c + s * 0.225
    spine_r = s * 0.05
    heart_cx = c + s * 0.04
    heart_cy = c - s * 0.06
    # Angles measured from the patient's right; -pi/2 is anterior (row 0).
    rib_angles = np.concatenate(
        [
            np.linspace(-0.38 * np.pi, 0.3 * np.pi, 6),
            np.linspace(0.7 * np.pi, 1.38 * np.pi, 6),
        ]
    ) + rng.normal(0, 0.03, 12)

    lesions = _make_lesions(n_slices, rng, consolidation) if positive else []
    vessels = _make_vessels(n_slices, rng)
    nods = _make_nodules(n_slices, rng) if nodules else []
    lesion_levels = np.array([les.hu for les in lesions])

    t_all = (np.arange(n_slices) + 0.5) / n_slices
    profile = _lung_profile(t_all)

    for k in range(total):
        img = np.full((size, size), _AIR, dtype=np.float32)
        std = np.full((size, size), _NOISE_STD * 0.5, dtype=np.float32)
        li = k - m  # lung-slice index, may be outside [0, n_slices)
        has_lung = 0 <= li < n_slices
        if li < 0:
            # Upper abdomen: slightly wider body, liver on the patient's right.
            bscale = 1.03
        elif li >= n_slices:
            # Lower neck / shoulders: narrower body.
            bscale = 0.8
        else:
            bscale = 1.0

        body = _ellipse(grid, c, c, body_ry * bscale, body_rx * bscale)
        _paint(img, body, _FAT)
        _paint(std, body, _NOISE_STD)
        _paint(img, _ellipse(grid, c, c, body_ry * bscale - fat, body_rx * bscale - fat), _SOFT)

        if li < 0:
            _paint(img, _ellipse(grid, c - s * 0.02, c - s * 0.15, s * 0.2, s * 0.22), _LIVER)

        lungs_img = np.zeros((size, size), dtype=bool)
        if has_lung:
            t = t_all[li]
            p = float(profile[li])
            centres = [(lung_cy, c - lung_dx), (lung_cy, c + lung_dx)]
            axes = (lung_ry * p, lung_rx * p)
            for cy, cx in centres:
                e = _ellipse(grid, cy, cx, *axes)
                if e is not None:
                    lungs_img[e[0]] |= e[1]
            # Heart near the base pushes into the left lung; trachea near the apex.
            if t < 0.6:
                h = np.sin(np.pi * min(t / 0.6 + 0.15, 1.0)) ** 0.5
                heart = _ellipse(grid, heart_cy, heart_cx, s * 0.11 * h, s * 0.13 * h)
                if heart is not None:
                    lungs_img[heart[0]] &= ~heart[1]
            # Ribs sit in the fat rim; painted below, but keep lung off them.
            img[lungs_img] = _LUNG
            std[lungs_img] = _LUNG_TEXTURE_STD
            if t > 0.6:
                _paint(img, _ellipse(grid, c - s * 0.06, c, s * 0.025, s * 0.025), _AIR)

            for tube in vessels + nods:
                if not tube.z_lo <= li <= tube.z_hi:
                    continue
                r = tube.r * s
                if tube.zc is not None:
                    rz = (tube.z_hi - tube.z_lo) / 2
                    r *= np.sqrt(max(0.0, 1.0 - ((li - tube.zc) / rz) ** 2))
                cy, cx = centres[tube.side]
                py = cy + (tube.v0 + tube.dv * t) * axes[0]
                px = cx + (tube.u0 + tube.du * t) * axes[1]
                disc = _ellipse(grid, py, px, r, r)
                _paint(img, disc, tube.hu, where=lungs_img)
                _paint(std, disc, _NOISE_STD, where=lungs_img)

            if lesions:
                _paint_lesions(
                    img,
                    lesion_mask[k],
                    lungs_img,
                    lesions,
                    lesion_levels,
                    li,
                    centres,
                    axes,
                    grid,
                    s,
                )

            # Ribs: small bony discs just inside the fat rim, none over the
            # sternum or the spine.
            ry = body_ry - fat - s * 0.02
            rx = body_rx - fat - s * 0.02
            for a in rib_angles:
                _paint(
                    img,
                    _ellipse(grid, c + ry * np.sin(a), c + rx * np.cos(a), s * 0.012, s * 0.018),
                    450.0,
                )
            lung_mask[k] = lungs_img

        # Spine: cortical shell, trabecular core, spinal canal behind it.
        _paint(img, _ellipse(grid, spine_cy, c, spine_r, spine_r * 1.1), _CORTICAL)
        _paint(img, _ellipse(grid, spine_cy, c, spine_r * 0.78, spine_r * 0.86), _TRABECULAR)
        arch_cy = spine_cy + spine_r * 1.75
        _paint(img, _ellipse(grid, arch_cy, c, spine_r * 0.85, spine_r * 0.8), _CORTICAL)
        _paint(img, _ellipse(grid, arch_cy, c, spine_r * 0.5, spine_r * 0.45), _CSF)

        noise = rng.standard_normal((size, size), dtype=np.float32)
        img += noise * std
        np.clip(np.rint(img), HU_MIN, HU_MAX, out=img)
        hu[k] = img

    logger.debug(
        "phantom %d slices %dx%d positive=%s: %d lesion slices",
        total,
        size,
        size,
        positive,
        int(lesion_mask.any(axis=(1, 2)).sum()),
    )
    return Phantom(hu=hu, lesion_mask=lesion_mask, lung_mask=lung_mask)


def _paint_lesions(
    img: np.ndarray,
    mask_out: np.ndarray,
    lungs: np.ndarray,
    lesions: list[_Lesion],
    levels: np.ndarray,
    li: int,
    centres: list[tuple[float, float]],
    axes: tuple[float, float],
    grid: np.ndarray,
    s: float,
) -> None:
    """Paint the cross-sections of all lesions on one slice.

    Each lesion is a sum of anisotropic Gaussian blobs; thresholding the sum
    gives merged, lobulated outlines that change smoothly from slice to slice.
    """
    size = img.shape[0]
    thr, ramp = 0.45, 0.2
    for les, level in zip(lesions, levels, strict=True):
        cy, cx = centres[les.side]
        # Mirror the anchor for the left lung so lesions stay lateral.
        sign = -1.0 if les.side == 0 else 1.0
        ay = cy + les.depth * axes[0] * np.sin(les.theta)
        ax = cx + sign * les.depth * axes[1] * np.cos(les.theta)
        active = [b for b in les.blobs if abs(li - (les.zc + b.dz)) < 2.5 * b.rz]
        if not active:
            continue
        extent = max(abs(b.du) * s + 2.0 * b.r * s for b in active)
        box = _box(ay, ax, extent, extent, size)
        if box is None:
            continue
        ys = grid[box[0]]
        xs = grid[box[1]]
        field = np.zeros((ys.shape[0], xs.shape[0]), dtype=np.float32)
        for b in active:
            wz = np.exp(-(((li - les.zc - b.dz) / b.rz) ** 2))
            r2 = (b.r * s) ** 2
            # Isotropic Gaussians are separable: two 1-D exps and an outer product.
            ey = np.exp(-((ys - (ay + b.dv * s)) ** 2) / r2)
            ex = np.exp(-((xs - (ax + sign * b.du * s)) ** 2) / r2)
            field += np.float32(wz) * np.outer(ey, ex)
        inside = lungs[box]
        alpha = np.clip((field - thr) / ramp, 0.0, 1.0) * inside
        sub = img[box]
        sub += alpha * (level - sub)
        if les.core_hu is not None:
            core = np.clip((field - 0.9) / ramp, 0.0, 1.0) * inside
            sub += core * (les.core_hu - sub)
        mask_out[box] |= alpha >= 0.5
