"""Procedural pharyngeal phantoms: flash photos into an open mouth with exact class masks.

Every sample is a random `Anatomy` (shapes in normalised coordinates, [0, 1] across the image)
plus a random appearance (colours, flash, texture). The anatomy is rasterised twice from the same
implicit shapes: at 2x for the image, which is then area-downsampled, and at the final size,
sampled at pixel centres, for the mask. Parts are painted back to front (pharyngeal wall seen
through the palatal arch, palate, tonsils, uvula, tongue, lips), so a mask pixel is the class of
the frontmost part covering that pixel's centre, exactly as in the image.

`phantom_sample(seed, size)` draws one sample; image i of `write_phantom_dataset(out, n, size,
seed)` is `phantom_sample(image_seed(seed, i), size)`, and split.csv records that seed.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage  # a dependency of scikit-image

from generation.errors import InputError

PHANTOM_CLASSES: dict[int, str] = {0: "background", 1: "uvula", 2: "pharyngeal wall", 3: "tonsil", 4: "tongue"}
MIN_SIZE, MAX_SIZE = 32, 512
FORMAT_VERSION = 1  # bump when the drawing changes, so an old folder is not extended with new images

# Drawing parts; the part id indexes the tables below.
LIPS, PALATE, WALL, TONSIL, UVULA, TONGUE = range(6)
PART_CLASS = np.array([0, 0, 2, 3, 1, 4], np.uint8)
# Distance from the flash relative to the palate: the far wall gets less light (inverse square),
# and a part next to a nearer one lies in its contact shadow.
PART_DEPTH = np.array([0.75, 1.0, 1.2, 1.06, 1.02, 0.85], np.float32)


@dataclass(frozen=True)
class Tonsil:
    x: float
    y: float
    radius_x: float
    radius_y: float
    angle: float
    lobes: tuple[tuple[int, float, float], ...]  # (frequency, amplitude, phase) of the outline's wobble
    overhang: float  # how far it bulges over the palatal arch's edge


@dataclass(frozen=True)
class Anatomy:
    """One open mouth; lengths are fractions of the image side, in the anatomy frame."""

    # camera: image coordinates -> anatomy frame (zoom > 1 magnifies)
    zoom: float
    roll: float
    shift: tuple[float, float]
    mouth: tuple[float, float, float, float]  # the lips' opening: ellipse x, y, radius x, radius y
    # the palatal arch (fauces) through which the pharyngeal wall is seen
    centre_x: float
    apex_y: float
    shoulder: float  # height of the arch's rounded top
    half_width: tuple[float, float]  # left, right
    flare: float  # the pillars widen (> 0) or narrow (< 0) downwards
    rim: float  # radius of the palate's rolled edge
    tonsils: tuple[Tonsil | None, Tonsil | None]  # left, right
    # uvula, hanging from the arch's apex
    uvula_x: float
    uvula_length: float
    uvula_deviation: float  # sideways offset of the tip
    uvula_root: float  # half-widths
    uvula_tip: float
    # tongue, a dome rising from the bottom
    tongue_x: float
    tongue_top: float
    tongue_curve: float
    tongue_tilt: float
    tongue_groove: float


def _random_tonsil(
    rng: np.random.Generator, side: int, centre_x: float, half_width: float, shoulder_y: float
) -> Tonsil | None:
    kind = rng.random()
    if kind < 0.04:  # removed, or hidden behind the pillar
        return None
    scale = rng.uniform(0.35, 0.6) if kind < 0.12 else rng.uniform(1.3, 1.75) if kind > 0.8 else rng.uniform(0.85, 1.2)
    radius_x = 0.075 * scale * rng.uniform(0.85, 1.15)
    x = centre_x + side * half_width * rng.uniform(0.8, 1.0)
    # a swollen tonsil may reach towards the midline but keeps clear of it: left and right stay
    # two instances (the outline wobbles by at most 1.18x)
    radius_x = min(radius_x, max(abs(x - centre_x) - 0.035, 0.02) / 1.18)
    lobes = tuple((k, rng.uniform(0.0, 0.06), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    return Tonsil(
        x=x,
        y=shoulder_y + rng.uniform(0.0, 0.12),
        radius_x=radius_x,
        radius_y=radius_x * rng.uniform(1.2, 1.7),
        angle=side * rng.uniform(-0.1, 0.35),
        lobes=lobes,
        overhang=rng.uniform(0.01, 0.08),
    )


def random_anatomy(rng: np.random.Generator) -> Anatomy:
    """A random open mouth: sizes, positions, asymmetry, swollen or small tonsils, deviated uvula."""
    centre_x = 0.5 + rng.uniform(-0.03, 0.03)
    apex_y = rng.uniform(0.12, 0.24)
    shoulder = rng.uniform(0.2, 0.34)
    half_width = rng.uniform(0.22, 0.3)
    half_widths = (half_width * rng.uniform(0.88, 1.12), half_width * rng.uniform(0.88, 1.12))
    shoulder_y = apex_y + shoulder
    tonsils = (
        _random_tonsil(rng, -1, centre_x, half_widths[0], shoulder_y),
        _random_tonsil(rng, 1, centre_x, half_widths[1], shoulder_y),
    )
    deviation = rng.normal(0.0, 0.02)
    if rng.random() < 0.1:
        deviation += rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.06)
    return Anatomy(
        zoom=rng.uniform(1.0, 1.25),
        roll=rng.normal(0.0, 0.06),
        shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
        mouth=(
            0.5 + rng.uniform(-0.03, 0.03),
            0.52 + rng.uniform(-0.03, 0.04),
            rng.uniform(0.62, 0.85),
            rng.uniform(0.55, 0.75),
        ),
        centre_x=centre_x,
        apex_y=apex_y,
        shoulder=shoulder,
        half_width=half_widths,
        flare=rng.uniform(0.0, 1.2),
        rim=rng.uniform(0.04, 0.08),
        tonsils=tonsils,
        uvula_x=centre_x + rng.uniform(-0.01, 0.01),
        uvula_length=rng.uniform(0.14, 0.26),
        uvula_deviation=float(deviation),
        uvula_root=rng.uniform(0.038, 0.05),
        uvula_tip=rng.uniform(0.03, 0.048),
        tongue_x=0.5 + rng.uniform(-0.04, 0.04),
        tongue_top=max(rng.uniform(0.64, 0.8), shoulder_y + 0.1),  # leaves the wall visible
        tongue_curve=rng.uniform(0.04, 0.16),
        tongue_tilt=rng.uniform(-0.05, 0.05),
        tongue_groove=rng.uniform(0.0, 0.012),
    )


def _anatomy_grid(anatomy: Anatomy, res: int) -> tuple[np.ndarray, np.ndarray]:
    """Anatomy-frame coordinates (X, Y) of the centres of a res x res pixel grid, float32."""
    centres = (np.arange(res, dtype=np.float32) + 0.5) / res - 0.5
    x, y = np.meshgrid(centres - anatomy.shift[0], centres - anatomy.shift[1])
    cos, sin = math.cos(anatomy.roll) / anatomy.zoom, math.sin(anatomy.roll) / anatomy.zoom
    return 0.5 + (cos * x + sin * y), 0.5 + (cos * y - sin * x)


def _to_image(anatomy: Anatomy, points: np.ndarray) -> np.ndarray:
    """Anatomy-frame points (N, 2) to normalised image coordinates: the inverse of `_anatomy_grid`."""
    cos, sin = math.cos(anatomy.roll) * anatomy.zoom, math.sin(anatomy.roll) * anatomy.zoom
    p = np.asarray(points, np.float64) - 0.5
    x, y = cos * p[:, 0] - sin * p[:, 1], sin * p[:, 0] + cos * p[:, 1]
    return np.stack([x + 0.5 + anatomy.shift[0], y + 0.5 + anatomy.shift[1]], axis=1)


def _window(anatomy: Anatomy, res: int, x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
    """Rows and columns of the pixels that can see the anatomy-frame box [x0, x1] x [y0, y1]."""
    corners = _to_image(anatomy, np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]])) * res
    low = np.clip(np.floor(corners.min(axis=0)) - 1, 0, res).astype(int)
    high = np.clip(np.ceil(corners.max(axis=0)) + 1, 0, res).astype(int)
    return slice(low[1], high[1]), slice(low[0], high[0])


def _rounded(depth: np.ndarray, radius: float) -> np.ndarray:
    """Height of a rolled edge: a quarter circle of `radius` rising from the edge (depth 0) inward."""
    t = 1.0 - np.clip(depth * (1.0 / radius), 0.0, 1.0)
    return radius * np.sqrt(1.0 - t * t)


@dataclass
class Raster:
    parts: np.ndarray  # uint8 (res, res): the frontmost part at each pixel centre
    height: np.ndarray  # float32 (res, res): that part's relief towards the camera, normalised units
    y: np.ndarray  # float32 (res, res): anatomy-frame vertical coordinate


def rasterise(anatomy: Anatomy, res: int) -> Raster:
    """Paint the parts back to front at the pixel centres of a res x res grid.

    Shapes are implicit functions of the anatomy-frame position, so every resolution samples the
    same geometry; the mask of a sample is `PART_CLASS[rasterise(anatomy, size).parts]`.
    """
    a = anatomy
    X, Y = _anatomy_grid(a, res)

    # Palatal arch: an elliptic top on two pillars. `outside` ~ distance outside the opening:
    # inside it the pharyngeal wall is seen, outside it the palate with a rolled edge.
    dx = X - a.centre_x
    shoulder_y = a.apex_y + a.shoulder
    # left and right half-widths blend across the midline: no seam in the palate above the apex
    left, right = a.half_width
    half = 0.5 * (left + right) + 0.5 * (right - left) * np.tanh(dx * 20.0)
    half *= 1.0 + a.flare * np.maximum(Y - shoulder_y, 0.0)
    up = np.maximum(shoulder_y - Y, 0.0) * (1.0 / a.shoulder)
    outside = np.sqrt(dx * dx + (up * half) ** 2) - half
    arch = outside < 0
    parts = np.where(arch, np.uint8(WALL), np.uint8(PALATE))
    # the palate's edge is rolled, and beyond it the palate vaults towards the lens
    height = _rounded(outside, a.rim) + 0.12 * np.maximum(outside - a.rim, 0.0)

    for tonsil in a.tonsils:
        if tonsil is None:
            continue
        reach = 1.2 * max(tonsil.radius_x, tonsil.radius_y)
        rows, cols = _window(a, res, tonsil.x - reach, tonsil.y - reach, tonsil.x + reach, tonsil.y + reach)
        cos, sin = math.cos(tonsil.angle), math.sin(tonsil.angle)
        u, v = X[rows, cols] - tonsil.x, Y[rows, cols] - tonsil.y
        u, v = (cos * u + sin * v) * (1.0 / tonsil.radius_x), (cos * v - sin * u) * (1.0 / tonsil.radius_y)
        theta = np.arctan2(v, u)
        outline = 1.0 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in tonsil.lobes)
        rho2 = (u * u + v * v) / (outline * outline)
        # beyond the overhang the tonsil is tucked behind the palatal arch's pillar
        inside = (rho2 < 1.0) & (outside[rows, cols] < tonsil.overhang)
        parts[rows, cols][inside] = TONSIL
        dome = np.sqrt(1.0 - rho2[inside])
        height[rows, cols][inside] = 0.8 * tonsil.radius_x * dome * np.sqrt(dome)  # (1 - rho^2)^0.75: a soft rim

    # Uvula: hangs from the apex, a centre line bending to the deviated tip, a round tip, and a
    # fillet where it meets the arch; it shows only inside the arch (it grows out of the palate).
    length, dev = a.uvula_length, a.uvula_deviation
    reach = abs(dev) + max(a.uvula_root, a.uvula_tip) + 0.06
    bottom = a.apex_y + length + a.uvula_tip + 0.01
    rows, cols = _window(a, res, a.uvula_x - reach, a.apex_y - 0.02, a.uvula_x + reach, bottom)
    x, y = X[rows, cols], Y[rows, cols]
    t = (y - a.apex_y) * (1.0 / length)
    tc = np.clip(t, 0.0, 1.0)
    centre = a.uvula_x + dev * tc * np.sqrt(tc)
    fillet = 0.05 * np.exp(-np.maximum(t, 0.0) * (length / 0.02))
    width = a.uvula_root + (a.uvula_tip - a.uvula_root) * (tc * tc * (3 - 2 * tc)) + fillet
    across = (x - centre) / width
    cap = np.maximum(t - 1.0, 0.0) * (length / (0.9 * a.uvula_tip))
    round2 = across * across + cap * cap
    uvula = (round2 < 1.0) & (outside[rows, cols] < 0)
    parts[rows, cols][uvula] = UVULA
    height[rows, cols][uvula] = (width * np.sqrt(np.maximum(1.0 - round2, 0.0)))[uvula]

    # Tongue: a dome rising from the bottom, in front; rolled top edge and a median groove.
    tdx = (X - a.tongue_x) * (1.0 / 0.45)
    into = Y - (a.tongue_top + a.tongue_curve * tdx * tdx + a.tongue_tilt * tdx)
    tongue = into > 0
    groove = a.tongue_groove * np.exp(-((X - a.tongue_x) * (1.0 / 0.03)) ** 2) * np.clip(into * 10.0, 0.0, 1.0)
    parts[tongue] = TONGUE
    height[tongue] = (_rounded(into, 0.08) + 0.15 * into - groove)[tongue]

    # Lips and cheeks: everything outside the lips' ellipse, closest to the camera.
    mx, my, mrx, mry = a.mouth
    mouth = np.sqrt(((X - mx) * (1.0 / mrx)) ** 2 + ((Y - my) * (1.0 / mry)) ** 2)
    lips = mouth > 1.0
    parts[lips] = LIPS
    height[lips] = _rounded(mouth[lips] - 1.0, 0.2) * 0.5
    return Raster(parts, height.astype(np.float32, copy=False), Y)


def phantom_mask(anatomy: Anatomy, size: int) -> np.ndarray:
    """The class-index mask (size, size) of an anatomy, sampled at pixel centres."""
    return PART_CLASS[rasterise(anatomy, size).parts]


def _smooth_noise(rng: np.random.Generator, cells: int, res: int) -> np.ndarray:
    """Value noise with features about 1/cells of the image wide, roughly unit variance, (res, res).

    The random grid does not depend on `res`, so a sample looks the same at every size.
    """
    grid = rng.standard_normal((cells + 4, cells + 4)).astype(np.float32)
    field = Image.fromarray(grid, "F").resize((res, res), Image.BICUBIC, box=(2, 2, cells + 2, cells + 2))
    return np.asarray(field) * 1.23


def _binomial(field: np.ndarray) -> np.ndarray:
    """A [1 2 1] / 4 blur along both image axes of (H, W) or (H, W, C); edge rows and columns kept."""
    rows = field.copy()
    rows[1:-1] += rows[1:-1]
    rows[1:-1] += field[:-2]
    rows[1:-1] += field[2:]
    rows[1:-1] *= 0.25
    both = rows.copy()
    both[:, 1:-1] += both[:, 1:-1]
    both[:, 1:-1] += rows[:, :-2]
    both[:, 1:-1] += rows[:, 2:]
    both[:, 1:-1] *= 0.25
    return both


def _wide_blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a large sigma (pixels) of a float32 (res, res) field, done at 1/4 resolution."""
    res = field.shape[0]
    small_res = max(8, res // 4)
    small = np.asarray(Image.fromarray(field, "F").resize((small_res, small_res), Image.BOX))
    small = ndimage.gaussian_filter(small, sigma * small_res / res, mode="nearest")
    return np.asarray(Image.fromarray(small, "F").resize((res, res), Image.BILINEAR))


def _mucosa(hue: float, saturation: float, value: float) -> np.ndarray:
    """An RGB albedo near red: hue > 0 leans orange, < 0 leans magenta."""
    low = value * (1.0 - min(saturation, 0.95))
    return np.array([value, low * (1.0 + 1.5 * hue), low * (1.0 - 1.5 * hue)], np.float32).clip(0.0, 1.0)


def _draw_details(
    rng: np.random.Generator, anatomy: Anatomy, res: int
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Fine marks in [0, 1], each (res, res): dark marks (vessels on the wall, crypts in the
    tonsils), whitish exudate on the tonsils (None for most samples), lymphoid granules on the wall.

    Drawn in the anatomy frame regardless of occlusion; the renderer applies them only on the
    wall and tonsils.
    """
    a = anatomy
    small_res = max(8, res // 4)  # granules are blurred into bumps, so they are drawn small
    canvases = [Image.new("L", (res, res), 0) for _ in range(2)] + [Image.new("L", (small_res, small_res), 0)]
    dark, exudate, granules = (ImageDraw.Draw(c) for c in canvases)

    def pixels(points: np.ndarray, scale: int = res) -> list[tuple[float, float]]:
        return [(float(x), float(y)) for x, y in _to_image(a, points) * scale]

    left, width = a.centre_x - a.half_width[0], a.half_width[0] + a.half_width[1]
    top, depth = a.apex_y, a.tongue_top - a.apex_y

    def on_wall() -> np.ndarray:
        return np.array([left + rng.random() * width, top + rng.random() * depth])

    for _ in range(int(rng.integers(5, 12))):  # vessels: meandering random walks, some branching
        point, heading = on_wall(), rng.uniform(0, 2 * np.pi)
        line = max(1, round(res * a.zoom * rng.uniform(0.0025, 0.005)))
        strength = int(rng.uniform(110, 255))
        path = [point]
        for _ in range(int(rng.integers(10, 30))):
            heading += rng.normal(0, 0.3)
            point = point + rng.uniform(0.005, 0.01) * np.array([math.cos(heading), math.sin(heading)])
            path.append(point)
        dark.line(pixels(np.array(path)), fill=strength, width=line, joint="curve")
        if rng.random() < 0.5:
            branch = path[len(path) // 2] + np.cumsum(rng.normal(0, 0.01, size=(8, 2)), axis=0)
            twig = pixels(np.vstack([path[len(path) // 2][None], branch]))
            dark.line(twig, fill=strength // 2, width=max(1, line - 1))
    for _ in range(int(rng.integers(8, 40))):  # lymphoid granules on the posterior wall
        (x, y), = pixels(on_wall()[None], small_res)
        radius = rng.uniform(0.005, 0.014) * small_res * a.zoom
        granules.ellipse((x - radius, y - radius * 0.8, x + radius, y + radius * 0.8), fill=255)
    has_exudate = rng.random() < 0.12
    for tonsil in a.tonsils:
        if tonsil is None:
            continue

        def on_tonsil(spread: float) -> np.ndarray:
            r, angle = math.sqrt(rng.random()) * spread, rng.uniform(0, 2 * np.pi)
            offset = (tonsil.radius_x * math.cos(angle), tonsil.radius_y * math.sin(angle))
            return np.array([tonsil.x + r * offset[0], tonsil.y + r * offset[1]])

        for _ in range(int(rng.integers(5, 16))):  # crypts: small dark pits, some drawn out to slits
            centre, along = on_tonsil(0.8), rng.uniform(-1, 1, size=2) * rng.uniform(0.0, 0.007)
            line = max(1, round(res * a.zoom * rng.uniform(0.004, 0.009)))
            pit = pixels(np.array([centre - along, centre + along]))
            dark.line(pit, fill=int(rng.uniform(120, 255)), width=line)
        for _ in range(int(rng.integers(2, 7)) if has_exudate else 0):  # whitish exudate spots
            (x, y), = pixels(on_tonsil(0.7)[None])
            radius = rng.uniform(0.005, 0.014) * res * a.zoom
            exudate.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    marks = _binomial(np.asarray(canvases[0], np.float32) * (1.0 / 255.0))  # softened: under wet mucosa
    spots = np.asarray(canvases[1], np.float32) * (1.0 / 255.0) if has_exudate else None
    small = np.asarray(canvases[2], np.float32) * (1.0 / 255.0)
    small = ndimage.gaussian_filter(small, 0.006 * small_res * a.zoom)
    bumps = np.asarray(Image.fromarray(small, "F").resize((res, res), Image.BILINEAR))
    return marks, spots, bumps


def _slopes(surface: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d/dx and d/dy of a (res, res) height field in normalised units (central differences)."""
    res = surface.shape[0]
    slope_x, slope_y = np.zeros_like(surface), np.zeros_like(surface)
    np.subtract(surface[:, 2:], surface[:, :-2], out=slope_x[:, 1:-1])
    np.subtract(surface[2:], surface[:-2], out=slope_y[1:-1])
    return slope_x * (0.5 * res), slope_y * (0.5 * res)


def _separable_falloff(res: int, centre: tuple[float, float], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Column and row factors of a Gaussian spot: their outer product is the 2-D falloff."""
    g = (np.arange(res, dtype=np.float32) + 0.5) / res
    return np.exp(-0.5 * ((g - centre[0]) / sigma) ** 2), np.exp(-0.5 * ((g - centre[1]) / sigma) ** 2)


def render(anatomy: Anatomy, rng: np.random.Generator, size: int) -> np.ndarray:
    """The flash photo of an anatomy: uint8 RGB (size, size, 3), drawn at 2x and area-downsampled."""
    res = 2 * size  # drawn at 2x, area-downsampled at the end
    raster = rasterise(anatomy, res)
    parts = raster.parts

    # Appearance, drawn in a fixed order that does not depend on the size.
    hue = rng.uniform(-0.08, 0.06)
    redness = rng.uniform(0.0, 1.0)  # from pale to inflamed
    value = rng.uniform(0.85, 0.97)
    saturation = rng.uniform(0.45, 0.6) + 0.1 * redness
    albedo_table = np.stack([
        _mucosa(hue + 0.03, saturation + 0.15, value * 0.6),  # lips and cheeks
        _mucosa(hue, saturation, value),  # palate
        _mucosa(hue - 0.02, saturation + 0.12 + 0.12 * redness, value * 0.95),  # pharyngeal wall
        _mucosa(hue, saturation + 0.06 + 0.1 * redness, value),  # tonsil
        _mucosa(hue - 0.01, saturation + 0.04, value),  # uvula
        _mucosa(hue + 0.03, saturation - 0.06, value),  # tongue
    ]) * rng.uniform(0.95, 1.05, size=(6, 1)).astype(np.float32)
    flash_centre = (0.5 + rng.normal(0, 0.05), 0.48 + rng.normal(0, 0.05))
    flash_width = rng.uniform(0.24, 0.4)
    lx, ly = rng.normal(0, 0.15), rng.normal(-0.1, 0.15)  # the flash sits a little off the lens
    exposure = rng.uniform(1.6, 2.4)
    shininess = rng.uniform(300, 700)
    gloss = rng.uniform(1.5, 4.0)
    coating = rng.uniform(0.0, 0.3)  # whitish coat on the tongue
    blur = rng.uniform(0.2, 0.9)
    low, mid, fine = (_smooth_noise(rng, cells, res) for cells in (5, 20, 60))
    wet = _smooth_noise(rng, 8, res)
    marks, exudate, bumps = _draw_details(rng, anatomy, res)

    is_wall, is_tonsil, is_tongue = parts == WALL, parts == TONSIL, parts == TONGUE
    # Surface relief: gentle swelling everywhere, granules on the wall, pits in the tonsils. Finer
    # grain (papillae, mucosal texture) only modulates brightness and where glints sparkle.
    relief = np.array([0.003, 0.0012, 0.0014, 0.0016, 0.0008, 0.0014], np.float32)[parts]
    surface = raster.height + relief * mid + is_wall * (0.002 * bumps) - is_tonsil * (0.0015 * marks)
    slope_x, slope_y = _slopes(surface)
    normal_z = 1.0 / np.sqrt(1.0 + slope_x * slope_x + slope_y * slope_y)
    norm = 1.0 / math.sqrt(lx * lx + ly * ly + 1.0)
    diffuse = np.clip((1.0 - slope_x * lx - slope_y * ly) * (normal_z * norm), 0.0, 1.0)
    hx, hy, hz = lx * norm, ly * norm, 1.0 + norm  # half-way vector between light and lens (unnormalised)
    hn = 1.0 / math.sqrt(hx * hx + hy * hy + hz * hz)
    facing = np.clip((hz - slope_x * hx - slope_y * hy) * (normal_z * hn), 0.0, 1.0)
    wetness = np.clip(0.1 + 0.8 * wet, 0.0, 1.0) * np.array([0.3, 1, 0.6, 0.8, 1, 1], np.float32)[parts]
    sparkle = np.clip(fine - 0.8, 0.0, None) ** 2  # small wet bumps catching the flash
    lobe = np.exp(shininess * (facing - 1.0))  # ~ facing ** shininess near 1, and much cheaper
    specular = wetness * (gloss * (2.0 * sparkle + 0.15) * lobe + 0.06 * np.exp(8.0 * (facing - 1.0)))

    # Light: the flash's bright spot with vignetting, inverse square with depth, contact shadows.
    depth = PART_DEPTH[parts] - 2.0 * raster.height
    down_throat = np.clip((raster.y - anatomy.apex_y) / (anatomy.tongue_top - anatomy.apex_y), 0.0, 1.0)
    depth += is_wall * (0.45 * down_throat)
    occlusion = np.maximum(depth - _wide_blur(depth, 0.02 * res), 0.0)
    spot_x, spot_y = _separable_falloff(res, flash_centre, flash_width)
    vignette_x, vignette_y = _separable_falloff(res, (0.5, 0.5), 0.45)
    spot = np.outer(0.25 * vignette_y + spot_y, 0.25 * vignette_x + spot_x) * (1.0 / 1.5625)
    light = spot / (depth * depth) * np.exp(-5.0 * occlusion)
    grain = np.array([0.03, 0.03, 0.04, 0.05, 0.03, 0.08], np.float32)[parts]
    tint = 1.0 + 0.08 * low + 0.04 * mid + grain * fine + 0.3 * is_wall * bumps

    # Colour, one channel at a time (contiguous planes are cheapest): part albedo, vessels darken
    # the wall, coat and exudate whiten tongue and tonsils; then area-downsample 2x2 -> 1.
    shade = light * diffuse * tint + 0.03
    glare = light * specular
    marks *= is_wall | is_tonsil
    whiten = np.clip(coating * (0.6 + 0.5 * low), 0.0, 0.6) * is_tongue
    if exudate is not None:
        whiten += np.clip(1.5 * exudate, 0.0, 1.0) * is_tonsil
    white_light = whiten * shade
    shade -= white_light
    image = np.empty((size, size, 3), np.float32)
    for channel, (darken, white) in enumerate(zip((0.25, 0.5, 0.4), (1.0, 0.93, 0.86))):
        plane = albedo_table[:, channel][parts] * (1.0 - darken * marks) * shade + white * white_light + glare
        image[..., channel] = 0.25 * (plane[0::2, 0::2] + plane[1::2, 0::2] + plane[0::2, 1::2] + plane[1::2, 1::2])
    image = 1.0 - np.exp(-exposure * image)
    image *= np.sqrt(np.sqrt(image))  # camera response: soft shoulder, deeper shadows (^1.25)
    image += blur * (_binomial(image) - image)  # mild lens blur
    image += 0.012 * (rng.random(image.shape, dtype=np.float32) - 0.5)  # sensor noise
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"phantom size must be an integer from {MIN_SIZE} to {MAX_SIZE} pixels, got {size!r}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"phantom seed must be a non-negative integer, got {seed!r}")


def phantom_anatomy(seed: int) -> Anatomy:
    """The anatomy of sample `seed` (independent of the size it is drawn at)."""
    _check_seed(seed)
    return random_anatomy(np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(0,))))


def phantom_sample(seed: int, size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """One phantom: image uint8 (size, size, 3) RGB and class-index mask uint8 (size, size)."""
    _check_size(size)
    anatomy = phantom_anatomy(seed)
    appearance = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(1,)))
    return render(anatomy, appearance, int(size)), phantom_mask(anatomy, int(size))


def image_seed(seed: int, index: int) -> int:
    """The per-image seed of image `index` in a dataset of seed `seed` (63 bits, stable in n)."""
    state = np.random.SeedSequence(int(seed), spawn_key=(2, int(index))).generate_state(2, np.uint32)
    return (int(state[0]) << 31) | (int(state[1]) >> 1)


def image_split(image_seed_: int) -> str:
    """80/10/10 train/val/test, decided by the image's own seed so it is stable as n grows."""
    bucket = image_seed_ % 10
    return "train" if bucket < 8 else "val" if bucket == 8 else "test"


def _metadata(n: int, size: int, seed: int) -> dict:
    return {"generator": "sketch2medi phantom", "version": FORMAT_VERSION, "n": n, "size": size, "seed": seed}


def _check_output(out: Path, metadata: dict) -> None:
    """Refuse to write into a file, or into a non-empty folder that is not this very dataset."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder; choose another output path")
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        existing = json.loads((out / "phantom.json").read_text())
    except (OSError, ValueError):
        raise InputError(f"{out}: not empty and not a phantom dataset; choose an empty or new folder")
    if existing != metadata:
        theirs = ", ".join(f"{k} {existing.get(k)}" for k in ("n", "size", "seed"))
        raise InputError(
            f"{out}: holds a phantom dataset with other parameters ({theirs}); choose an empty or new folder"
        )


def _keep_freed_memory() -> None:
    """Worker set-up: let glibc reuse freed large blocks instead of returning them to the OS.

    Every sample allocates dozens of megabyte-sized arrays; by default each is a fresh mmap whose
    pages are faulted in and zeroed, which costs about as much as the drawing itself.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: only slower


def _write_one(job: tuple[Path, str, int, int]) -> None:
    out, name, sample_seed, size = job
    image, mask = phantom_sample(sample_seed, size)
    Image.fromarray(image).save(out / "images" / name, compress_level=1)
    Image.fromarray(mask).save(out / "masks" / name, compress_level=6)


def write_phantom_dataset(
    out: Path, n: int, size: int, seed: int, on_image: Callable[[], None] | None = None
) -> None:
    """Write n phantoms as a dataset folder: images/, masks/, classes.json, split.csv, phantom.json.

    The folder must be new, empty, or this same dataset (same n, size, seed), which is then
    rewritten: an interrupted run can be repeated. Uses up to all CPU cores for large n.
    """
    out = Path(out)
    _check_size(size)
    _check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"phantom count n must be a positive integer, got {n!r}")
    n, size, seed = int(n), int(size), int(seed)
    metadata = _metadata(n, size, seed)
    _check_output(out, metadata)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    (out / "phantom.json").write_text(json.dumps(metadata, indent=1) + "\n")
    (out / "classes.json").write_text(json.dumps({str(k): v for k, v in PHANTOM_CLASSES.items()}, indent=1) + "\n")

    digits = max(5, len(str(n - 1)))
    seeds = [image_seed(seed, i) for i in range(n)]
    names = [f"phantom_{i:0{digits}d}.png" for i in range(n)]
    with (out / "split.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "seed", "split"])
        writer.writerows((name, s, image_split(s)) for name, s in zip(names, seeds))

    jobs = [(out, name, s, size) for name, s in zip(names, seeds)]
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    if workers < 2 or n < 16:
        for job in jobs:
            _write_one(job)
            if on_image:
                on_image()
        return
    import multiprocessing

    with multiprocessing.get_context().Pool(workers, initializer=_keep_freed_memory) as pool:
        for _ in pool.imap(_write_one, jobs, chunksize=8):
            if on_image:
                on_image()
