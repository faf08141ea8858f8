"""Simulated free-hand sketches: what a clinician draws after looking at an image.

The synthesized sketch (`generation.sketch.sketch_from_mask`) is a perfect trace of the
segmentation. A person draws from memory of the image: the whole drawing is a little displaced,
bent and rescaled, outlines are simplified and wobble, loops do not close exactly, the pen
pressure varies, and now and then an object is left out, two neighbours are drawn as one, or
something is added. `freehand_sketch` reproduces this in four stages:

    instances (`mask_instances`)      -> object edits (drop / merge / add)
    contour strokes (`contour_strokes`) -> stroke perturbations -> global deformation
    rendering                          (`draw_strokes` at strength 0, else variable width/pressure)

and, above strength 1, memory errors around them: the mask is warped before its instances are
taken, instances are simplified and only the biggest kept, and the finished strokes are misplaced.

Strengths 0 to 1 are the hand: every effect is scaled by `strength`: probabilities are
`strength * p` and magnitudes are `strength * m`, with `p` and `m` the fields of `HandParameters`
(values at strength 1). Strengths 1 to 2 keep the hand at its strength-1 level and add the errors of
drawing from memory (`MemoryParameters`, values at strength 2), each scaled by `strength - 1`.
Lengths are fractions of the sketch side `size = max(H, W)`. At strength 0 every effect is the
identity and the strokes are drawn with `draw_strokes`, so the result is byte-identical to the
synthesized sketch. Strength 1 is a sloppy but recognisable drawing. The random numbers are drawn
in a fixed pattern before the strength is applied, so for one seed a higher strength makes
largely the same choices, only larger and more often.
Defaults (the `HandParameters` fields) at 256 px: wobble 2.6 px, elastic 7.7 px, shift 7.7 px std,
rotation 5 degrees std, smoothing sigma 3.8 px, overshoot or gap up to 9 px.

Object edits (on the instance masks, before contours are taken):
  merge_p       probability that a small instance (under `small_area` of the image) is merged with a
                neighbour closer than `merge_gap`: the pair is drawn as one outline (union closed
                over the gap), the border between them is lost.
  drop_p        probability that a small instance is left out (its borders shared with others stay).
  extra_p       probability of one extra object: a small ellipse, radius `extra_radius` (range),
                somewhere on the drawn anatomy.
Stroke perturbations (per contour, along its arc length):
  simplify      polygon simplification tolerance (skimage `approximate_polygon`): small detail lost.
  smooth        Gaussian smoothing of the outline along its length (sigma): a hand draws round curves.
  wobble        displacement by a smooth random vector field of std `wobble` and correlation length
                `wobble_length`: the outline drifts in and out of the true contour. A field over the
                image rather than noise per contour, so a border shared by two regions (drawn by
                both contours) moves as one line instead of splitting into two.
  tremor        normal displacement by noise along each stroke, std `tremor`, correlation length
                `tremor_length`: small fast shakes of the pen.
  split_p       probability of drawing a contour as 2 strokes (and `split_p / 2` for 3) instead of 1.
  end_offset    arc length each stroke end runs past (overshoot) or stops short of (gap) where it
                should meet the next; drawn uniformly from [-0.6, 1] * end_offset.
  end_drift     sideways drift (std) accumulated by each stroke's end, so ends miss each other.
Global deformation (of all points together):
  elastic       amplitude of a smooth displacement field (sum of low-frequency sine waves).
  rotation      std of the rotation in degrees, about the image centre.
  scale         std of the relative scale change.
  shift         std of the translation along each axis.
Rendering (4x supersampled discs, averaged down; paper stays exactly 255):
  width_var     std of the log stroke width per stroke (mean width `line_width(size)`).
  width_wave    relative variation of width along a stroke.
  pressure_var  how much lighter (grey instead of black) a stroke can be, per stroke and along it.
  taper         how much width and pressure fade over the first and last `taper_length` of a stroke.

Drawing from memory (`MemoryParameters`, strength 1 to 2; each magnitude times `strength - 1`):
  warp          proportions: a smooth displacement of the mask, before its contours are taken, whose
                gradient (the relative stretch of a part) has about this std; correlation length
                `warp_length`.
  outline       shapes reduced to their rough outline: each instance closed then opened by a disc of
                this radius, so notches fill and thin parts vanish.
  keep          partial drawing: only the `keep` biggest instances are drawn at strength 2; between
                1 and 2 the number left out grows linearly.
  rotation      rotation of the whole drawing about the image centre, uniform in +- this (degrees).
  scale         relative scale error, uniform in +- this.
  shift         offset along each axis, uniform in +- this; the drawing is then moved back inside the
                frame where it fits, as a drawing stays on its paper.
The memory errors use their own random stream, drawn after the hand's, so the hand makes the same
choices at every strength and strengths 0 to 1 are exactly what they were without them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.measure import approximate_polygon

from generation.errors import InputError
from generation.images import find_images, load_mask
from generation.sketch import PAPER, contour_strokes, draw_strokes, line_width, mask_instances


@dataclass(frozen=True)
class HandParameters:
    """Effect sizes at strength 1; lengths as fractions of the sketch side. See the module docstring."""

    merge_p: float = 0.1
    merge_gap: float = 0.03
    drop_p: float = 0.1
    small_area: float = 0.08
    extra_p: float = 0.25
    extra_radius: tuple[float, float] = (0.025, 0.06)
    simplify: float = 0.004
    smooth: float = 0.015
    wobble: float = 0.01
    wobble_length: float = 0.06
    tremor: float = 0.0015
    tremor_length: float = 0.006
    split_p: float = 0.6
    end_offset: float = 0.035
    end_drift: float = 0.012
    elastic: float = 0.03
    rotation: float = 5.0
    scale: float = 0.06
    shift: float = 0.03
    width_var: float = 0.3
    width_wave: float = 0.3
    pressure_var: float = 0.4
    taper: float = 0.6
    taper_length: float = 0.03


HAND = HandParameters()


@dataclass(frozen=True)
class MemoryParameters:
    """Errors of drawing from memory at strength 2; lengths as fractions of the sketch side."""

    warp: float = 0.1
    warp_length: float = 0.3
    outline: float = 0.03
    keep: int = 3
    rotation: float = 15.0
    scale: float = 0.25
    shift: float = 0.1


MEMORY = MemoryParameters()
MAX_STRENGTH = 2.0
PointMap = Callable[[np.ndarray], np.ndarray]  # (N, 2) (x, y) points -> moved points
SUPERSAMPLE = 4
MAX_MASK_VALUES = 128  # more distinct values than this is a grayscale picture, not a label map


@dataclass
class Stroke:
    """One pen stroke: (x, y) points and, for rendering, width (px) and pressure (0-1) per point."""

    points: np.ndarray
    width: np.ndarray | None = None
    pressure: np.ndarray | None = None


def freehand_sketch(
    mask: np.ndarray,
    strength: float,
    rng: np.random.Generator | int,
    hand: HandParameters = HAND,
    memory: MemoryParameters = MEMORY,
) -> np.ndarray:
    """A simulated free-hand sketch of a class-index mask (H, W): uint8 (H, W), black on white.

    Strength 0 gives exactly `sketch_from_mask(mask)`; strength 1 a sloppy but recognisable drawing;
    strength 2 that drawing made from memory (misplaced, warped, simplified, partial).
    """
    return _draw(mask, strength, rng, hand, memory, labelled=False)[0]


def freehand_labelled_sketch(
    mask: np.ndarray,
    strength: float,
    rng: np.random.Generator | int,
    hand: HandParameters = HAND,
    memory: MemoryParameters = MEMORY,
) -> tuple[np.ndarray, np.ndarray]:
    """`freehand_sketch` (the same sketch for the same arguments) and the class of each of its ink
    pixels, uint8 (H, W): the class of the darkest stroke there, 0 on paper. An object that was
    merged keeps the class of its first instance; an added one (not in the mask) is 0, unlabelled.
    `generation.labelled.colour_coded` turns the pair into the colour-coded sketch a user would draw."""
    sketch, classes = _draw(mask, strength, rng, hand, memory, labelled=True)
    return sketch, classes


def _draw(mask: np.ndarray, strength: float, rng: np.random.Generator | int, hand: HandParameters, memory: MemoryParameters,
          labelled: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The sketch and, when `labelled`, its class map (else None)."""
    if not 0.0 <= strength <= MAX_STRENGTH:
        raise ValueError(f"strength must be in [0, {MAX_STRENGTH:g}], got {strength}")
    rng = np.random.default_rng(rng)
    # Independent streams per stage, so one stage's random choices do not shift another's.
    streams = rng.integers(0, 2**63, 5)
    object_rng, field_rng, stroke_rng, global_rng, render_rng = (np.random.default_rng(s) for s in streams)
    warp_rng, placement_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, 2))
    level = max(0.0, strength - 1.0)
    strength = min(strength, 1.0)
    height, width = mask.shape
    size = max(height, width)
    if level > 0.0:
        mask = warp_mask(mask, level * memory.warp, memory.warp_length * size, warp_rng)
    found = mask_instances(mask)
    instances, classes = [m for _, m in found], [c for c, _ in found]
    if not instances:
        blank = np.full(mask.shape, PAPER, dtype=np.uint8)
        return blank, (np.zeros(mask.shape, np.uint8) if labelled else None)
    if level > 0.0:
        instances, kept = _remembered(instances, level, memory)
        classes = [classes[i] for i in kept]
    instances, origins = _edited(instances, strength, object_rng, hand)
    classes = [classes[i] if i >= 0 else 0 for i in origins]
    outlines = [(c, k) for instance, k in zip(instances, classes) for c in contour_strokes(instance)]
    contours = [c for c, _ in outlines]
    if strength == 0.0:
        sketch = draw_strokes(contours, height, width)
        return sketch, (_class_lines(outlines, sketch) if labelled else None)
    wobble = smooth_field(height, width, strength * hand.wobble * size, hand.wobble_length * size, field_rng)
    # One generator per contour: how one contour's noise is drawn never shifts another's choices.
    contour_rngs = [np.random.default_rng(s) for s in stroke_rng.integers(0, 2**63, len(contours))]
    drawn = [(s, k) for (c, k), r in zip(outlines, contour_rngs) for s in perturb_contour(c, size, strength, r, wobble, hand)]
    strokes = [s for s, _ in drawn]
    deform = global_deformation(height, width, strength, global_rng, hand)
    for stroke in strokes:
        stroke.points = deform(stroke.points)
    if level > 0.0:
        misplace_drawing(strokes, height, width, level, placement_rng, memory)
    set_width_and_pressure(strokes, size, strength, render_rng, hand)
    if labelled:
        return render_labelled_strokes(strokes, [k for _, k in drawn], height, width)
    return render_strokes(strokes, height, width), None


def _class_lines(outlines: list[tuple[np.ndarray, int]], sketch: np.ndarray) -> np.ndarray:
    """The class map of `draw_strokes`'s lines: each contour's line drawn in its class, later over earlier."""
    height, width = sketch.shape
    canvas = Image.new("L", (width, height), 0)
    draw, line = ImageDraw.Draw(canvas), line_width(max(height, width))
    for stroke, class_index in outlines:
        points = [tuple(p) for p in np.asarray(stroke, dtype=np.float64)]
        draw.line(points * 2 if len(points) == 1 else points, fill=int(class_index), width=line, joint="curve" if line > 2 else None)
    return np.where(sketch < PAPER, np.asarray(canvas, dtype=np.uint8), 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Object edits


def edit_objects(
    instances: list[np.ndarray], strength: float, rng: np.random.Generator, hand: HandParameters = HAND
) -> list[np.ndarray]:
    """Merge neighbours, drop instances and add one extra blob, each with probability ~ strength."""
    return _edited(instances, strength, rng, hand)[0]


def _edited(
    instances: list[np.ndarray], strength: float, rng: np.random.Generator, hand: HandParameters = HAND
) -> tuple[list[np.ndarray], list[int]]:
    """`edit_objects` and, per object drawn, the index of the instance it comes from (-1: added)."""
    if strength == 0.0:
        return instances, list(range(len(instances)))
    height, width = instances[0].shape
    size = max(height, width)
    # Random numbers are drawn up front in a fixed pattern, so a seed makes the same choices at
    # every strength and only the thresholds move: more strength never undoes an edit.
    n = len(instances)
    merge_draws, drop_draws = rng.random(n), rng.random(n)
    extra_draw, extra_shape = rng.random(), rng.random(5)

    areas = [int(m.sum()) for m in instances]
    small = hand.small_area * height * width  # only objects below this area are merged or dropped
    gap = max(1, round(hand.merge_gap * size))
    structure = _disk(gap)
    merged: list[np.ndarray] = []
    sources: list[int] = []
    used = [False] * n
    for i in range(n):
        if used[i]:
            continue
        instance = instances[i]
        if merge_draws[i] < strength * hand.merge_p:
            # Merging two large regions would erase a main border of the anatomy: one must be small.
            near = ndimage.binary_dilation(instance, structure)
            partner = next(
                (
                    j
                    for j in range(i + 1, n)
                    if not used[j] and min(areas[i], areas[j]) < small and (near & instances[j]).any()
                ),
                None,
            )
            if partner is not None:
                used[partner] = True
                union = instance | instances[partner]
                # Close over the gap so the pair becomes one region with one outline.
                instance = ndimage.binary_closing(np.pad(union, gap), structure)[gap:-gap, gap:-gap] | union
        merged.append(instance)
        sources.append(i)

    # Only small objects get forgotten; never all of them.
    areas = [m.sum() for m in merged]
    largest = int(np.argmax(areas))
    chosen = [k for k in range(len(merged)) if k == largest or areas[k] >= small or drop_draws[k] >= strength * hand.drop_p]
    kept, origins = [merged[k] for k in chosen], [sources[k] for k in chosen]

    if extra_draw < strength * hand.extra_p:
        ys, xs = np.nonzero(np.logical_or.reduce(kept))
        pick = int(extra_shape[0] * len(xs))
        low, high = hand.extra_radius
        ry, rx = (low + (high - low) * extra_shape[1:3]) * size
        angle = math.pi * extra_shape[3]
        yy, xx = np.mgrid[:height, :width]
        dy, dx = yy - ys[pick], xx - xs[pick]
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        kept.append((u / rx) ** 2 + (v / ry) ** 2 <= 1.0)
        origins.append(-1)
    return kept, origins


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


# ---------------------------------------------------------------------------------------------
# Strokes along arc length


def resample(points: np.ndarray, closed: bool, step: float = 1.0) -> np.ndarray:
    """Points evenly spaced by about `step` along the polyline (closed: without repeating the start)."""
    ring = np.vstack([points, points[:1]]) if closed else points
    lengths = np.hypot(*np.diff(ring, axis=0).T)
    arc = np.concatenate([[0.0], np.cumsum(lengths)])
    total = arc[-1]
    if total <= 1e-9:
        return points[:1].astype(np.float64)
    count = max(3 if closed else 2, round(total / step) + (0 if closed else 1))
    t = np.linspace(0.0, total, count, endpoint=not closed)
    return np.stack([np.interp(t, arc, ring[:, 0]), np.interp(t, arc, ring[:, 1])], axis=1)


def smooth_noise(count: int, correlation: float, closed: bool, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise of unit std, correlated over `correlation` samples."""
    noise = rng.standard_normal(count)
    if correlation > 0.5 and count > 1:
        noise = ndimage.gaussian_filter1d(noise, min(correlation, count), mode="wrap" if closed else "nearest")
    spread = noise.std()
    return noise / spread if spread > 1e-9 else np.zeros(count)


def smooth_field(height: int, width: int, amplitude: float, correlation: float, rng: np.random.Generator) -> PointMap:
    """A smooth random 2-D displacement field, std `amplitude`, as a function (N, 2) -> (N, 2).

    Built on a coarse grid (a quarter of the correlation length) with a margin, so points pushed
    slightly outside the image still get smooth values; sampled bilinearly.
    """
    cell = max(1.0, correlation / 4)
    margin = 8
    shape = (int(height / cell) + 2 * margin + 1, int(width / cell) + 2 * margin + 1)
    noise = rng.standard_normal((2, *shape))
    field = np.stack([ndimage.gaussian_filter(n, correlation / cell, mode="wrap") for n in noise])
    field *= amplitude / np.maximum(field.std(axis=(1, 2), keepdims=True), 1e-9)

    def displace(points: np.ndarray) -> np.ndarray:
        grid = np.stack([points[:, 1] / cell + margin, points[:, 0] / cell + margin])
        offsets = [ndimage.map_coordinates(f, grid, order=1, mode="nearest") for f in field]
        return points + np.stack(offsets, axis=1)

    return displace


def normals(points: np.ndarray, closed: bool) -> np.ndarray:
    """Unit normals of an evenly spaced polyline (N, 2)."""
    if len(points) < 2:
        return np.zeros_like(points)
    if closed:
        tangent = np.roll(points, -1, axis=0) - np.roll(points, 1, axis=0)
    else:
        tangent = np.gradient(points, axis=0)
    tangent /= np.maximum(np.hypot(*tangent.T), 1e-9)[:, None]
    return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def arc_piece(points: np.ndarray, closed: bool, start: float, stop: float) -> np.ndarray:
    """The polyline between arc positions start < stop (in samples of an evenly spaced polyline).

    Closed polylines wrap around; open ones continue straight along their end tangents.
    """
    count = len(points)
    t = np.linspace(start, stop, max(2, int(math.ceil(stop - start)) + 1))
    if closed:
        ring = np.vstack([points, points[:1]])
        t = np.mod(t, count)
        index = np.minimum(t.astype(int), count - 1)
        frac = (t - index)[:, None]
        return ring[index] * (1 - frac) + ring[index + 1] * frac
    inside = np.clip(t, 0, count - 1)
    index = np.minimum(inside.astype(int), max(count - 2, 0))
    frac = (inside - index)[:, None]
    upper = np.minimum(index + 1, count - 1)
    piece = points[index] * (1 - frac) + points[upper] * frac
    if count >= 2:  # extrapolate overshoots past the ends
        head, tail = points[0] - points[1], points[-1] - points[-2]
        head /= max(np.hypot(*head), 1e-9)
        tail /= max(np.hypot(*tail), 1e-9)
        piece += np.minimum(t, 0)[:, None] * -head + np.maximum(t - (count - 1), 0)[:, None] * tail
    return piece


def perturb_contour(
    contour: np.ndarray,
    size: int,
    strength: float,
    rng: np.random.Generator,
    wobble: PointMap | None = None,
    hand: HandParameters = HAND,
) -> list[Stroke]:
    """One contour (from `contour_strokes`) as one or more hand-drawn strokes.

    `wobble` displaces points, (N, 2) -> (N, 2): a `smooth_field` shared by all contours.
    """
    closed = len(contour) > 3 and np.allclose(contour[0], contour[-1])
    # Fixed-size draws first: the seed then makes the same choices at every strength.
    choice = rng.random(8)
    offsets = rng.uniform(-0.6, 1.0, size=(3, 2))
    drifts = rng.standard_normal((3, 2))
    if strength == 0.0:
        return [Stroke(contour)]
    s = strength
    points = contour[:-1] if closed else contour
    simplified = approximate_polygon(np.vstack([points, points[:1]]) if closed else points, s * hand.simplify * size)
    if closed:
        simplified = simplified[:-1]
    points = resample(simplified if len(simplified) >= (3 if closed else 2) else points, closed)
    count = len(points)
    if count < 3:
        return [Stroke(points)]
    mode = "wrap" if closed else "nearest"
    sigma = min(s * hand.smooth * size, count / 6)
    if sigma > 0.3:
        points = ndimage.gaussian_filter1d(points, sigma, axis=0, mode=mode)
    if wobble is not None:
        points = wobble(points)

    # How many strokes and where they start: a loop can start anywhere.
    pieces = 1 + int(choice[0] < s * hand.split_p) + int(choice[1] < s * hand.split_p / 2)
    pieces = min(pieces, max(1, count // 12))
    span = count if closed else count - 1
    start = choice[2] * count if closed else 0.0
    jitter = np.zeros(pieces + 1)
    jitter[1:pieces] = (choice[3 : 2 + pieces] - 0.5) * 0.5  # interior cuts only
    cuts = start + span * (np.arange(pieces + 1) + jitter) / pieces
    reach = min(s * hand.end_offset * size, 0.15 * span)
    strokes = []
    for k in range(pieces):
        # Positive offset: overshoot past the meeting point; negative: stop short of it.
        begin, end = cuts[k] - reach * offsets[k, 0], cuts[k + 1] + reach * offsets[k, 1]
        if end - begin < 2:
            continue
        piece = arc_piece(points, closed, begin, end)
        ramp = np.linspace(0.0, 1.0, len(piece))[:, None] ** 2
        piece = piece + ramp * drifts[k] * s * hand.end_drift * size
        tremor = s * hand.tremor * size * smooth_noise(len(piece), hand.tremor_length * size, False, rng)
        strokes.append(Stroke(piece + tremor[:, None] * normals(piece, False)))
    return strokes


# ---------------------------------------------------------------------------------------------
# Global deformation


def global_deformation(
    height: int, width: int, strength: float, rng: np.random.Generator, hand: HandParameters = HAND
) -> PointMap:
    """A smooth elastic warp followed by rotation, scale and shift about the centre; (N, 2) -> (N, 2)."""
    size = max(height, width)
    waves = 4
    directions = rng.uniform(0, 2 * math.pi, waves)
    frequencies = rng.uniform(0.5, 1.5, waves) * 2 * math.pi / size
    phases = rng.uniform(0, 2 * math.pi, waves)
    amplitudes = rng.standard_normal((waves, 2)) / math.sqrt(waves)
    angle, zoom, dx, dy = rng.standard_normal(4)
    wave_vectors = np.stack([np.cos(directions), np.sin(directions)], axis=1) * frequencies[:, None]
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    theta = math.radians(strength * hand.rotation * angle)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    factor = 1.0 + strength * hand.scale * float(np.clip(zoom, -2, 2))
    shift = strength * hand.shift * size * np.array([dx, dy])

    def deform(points: np.ndarray) -> np.ndarray:
        phase = points @ wave_vectors.T + phases  # (N, waves)
        warped = points + strength * hand.elastic * size * (np.sin(phase) @ amplitudes)
        return centre + shift + factor * (warped - centre) @ rotation.T

    return deform


# ---------------------------------------------------------------------------------------------
# Drawing from memory


def warp_mask(mask: np.ndarray, stretch: float, correlation: float, rng: np.random.Generator) -> np.ndarray:
    """The class-index mask resampled through a smooth random displacement field.

    `stretch` is the std of the field's gradient, the relative change of proportions: the field's
    amplitude is `stretch * correlation` (the gradient of a `smooth_field` has about its amplitude
    over its correlation length as std).
    """
    height, width = mask.shape
    field = smooth_field(height, width, stretch * correlation, correlation, rng)
    yy, xx = np.mgrid[:height, :width]
    sources = field(np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64))
    coordinates = np.stack([sources[:, 1], sources[:, 0]]).reshape(2, height, width)
    return ndimage.map_coordinates(mask, coordinates, order=0, mode="nearest")


def remember_objects(instances: list[np.ndarray], level: float, memory: MemoryParameters = MEMORY) -> list[np.ndarray]:
    """Instances as remembered: each reduced to its rough outline, and only the biggest kept.

    `level` in [0, 1] is the strength above 1. An instance the simplification erases is drawn
    as it was: a remembered structure is still drawn, only coarsely.
    """
    return _remembered(instances, level, memory)[0]


def _remembered(instances: list[np.ndarray], level: float, memory: MemoryParameters = MEMORY) -> tuple[list[np.ndarray], list[int]]:
    """`remember_objects` and the indices of the instances kept."""
    height, width = instances[0].shape
    radius = round(level * memory.outline * max(height, width))
    if radius >= 1:
        disk = _disk(radius)
        rough = []
        for instance in instances:
            padded = np.pad(instance, radius, mode="edge")  # the frame edge is not an outline to round
            simple = ndimage.binary_opening(ndimage.binary_closing(padded, disk), disk)[radius:-radius, radius:-radius]
            rough.append(simple if simple.any() else instance)
        instances = rough
    left_out = math.floor(level * max(0, len(instances) - memory.keep))
    biggest = sorted(int(i) for i in np.argsort([-int(m.sum()) for m in instances], kind="stable")[: len(instances) - left_out])
    return [instances[i] for i in biggest], biggest


def misplace_drawing(
    strokes: list[Stroke], height: int, width: int, level: float, rng: np.random.Generator,
    memory: MemoryParameters = MEMORY,
) -> None:
    """Rotate, rescale and shift all strokes together (in place), then bring them back on the paper.

    Uniform errors up to `level` times the `memory` limits. Where the drawing fits in the frame
    it is moved back inside it; a larger one is centred on it.
    """
    angle, zoom, dx, dy = rng.uniform(-1.0, 1.0, 4)
    theta = math.radians(level * memory.rotation * angle)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    factor = 1.0 + level * memory.scale * zoom
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    shift = level * memory.shift * max(height, width) * np.array([dx, dy])
    for stroke in strokes:
        stroke.points = centre + shift + factor * (stroke.points - centre) @ rotation.T
    if not strokes:
        return
    points = np.vstack([stroke.points for stroke in strokes])
    low, high = points.min(axis=0), points.max(axis=0)
    frame = np.array([width - 1, height - 1], dtype=np.float64)
    fits = high - low <= frame
    inside = np.maximum(0.0, -low) - np.maximum(0.0, high - frame)
    centred = (frame - (high + low)) / 2
    correction = np.where(fits, inside, centred)
    for stroke in strokes:
        stroke.points = stroke.points + correction


# ---------------------------------------------------------------------------------------------
# Rendering


def set_width_and_pressure(
    strokes: list[Stroke], size: int, strength: float, rng: np.random.Generator, hand: HandParameters = HAND
) -> None:
    """Per-point width (px) and pressure (0-1): per-stroke level, slow variation, tapered ends."""
    base = line_width(size)
    taper_length = max(2.0, hand.taper_length * size)
    s = strength
    for stroke, seed in zip(strokes, rng.integers(0, 2**63, len(strokes))):
        stroke_rng = np.random.default_rng(seed)  # per stroke, so stroke lengths do not shift the stream
        count = len(stroke.points)
        level_width, level_pressure = stroke_rng.standard_normal(), stroke_rng.random()
        wave_width = smooth_noise(count, 0.08 * size, False, stroke_rng)
        wave_pressure = smooth_noise(count, 0.08 * size, False, stroke_rng)
        steps = np.hypot(*np.diff(stroke.points, axis=0).T)
        arc = np.concatenate([[0.0], np.cumsum(steps)])
        to_end = np.minimum(arc, arc[-1] - arc)
        fade = 1.0 - s * hand.taper * np.clip(1.0 - to_end / taper_length, 0.0, 1.0)
        width = base * math.exp(s * hand.width_var * level_width) * (1.0 + s * hand.width_wave * np.tanh(wave_width))
        stroke.width = np.maximum(width * (0.5 + 0.5 * fade), 0.75)
        pressure = 1.0 - s * hand.pressure_var * (0.6 * level_pressure + 0.4 * np.abs(np.tanh(wave_pressure)))
        stroke.pressure = np.clip(pressure * fade, 0.3, 1.0)


def render_strokes(strokes: list[Stroke], height: int, width: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased strokes of varying width and pressure; uint8 (height, width), paper exactly 255.

    Each stroke is a chain of discs on a supersampled canvas; strokes combine by darkest ink, so a
    light stroke crossing a dark one does not lighten it. Untouched pixels stay at 255.
    """
    return _render(strokes, None, height, width, supersample)[0]


def render_labelled_strokes(strokes: list[Stroke], classes: list[int], height: int, width: int,
                            supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
    """`render_strokes` and the class (one per stroke) of each pixel: that of the stroke darkest at
    the pixel's darkest sub-pixel; 0 on paper. uint8 (height, width) each."""
    sketch, classes_map = _render(strokes, classes, height, width, supersample)
    return sketch, classes_map


def _render(strokes: list[Stroke], classes: list[int] | None, height: int, width: int,
            supersample: int) -> tuple[np.ndarray, np.ndarray | None]:
    f = supersample
    darkness = np.zeros((height * f, width * f), dtype=np.uint8)
    owner = np.zeros(darkness.shape, np.uint8) if classes is not None else None
    for number, stroke in enumerate(strokes):
        points, widths, pressure = stroke.points, stroke.width, stroke.pressure
        if widths is None or pressure is None:
            widths = np.full(len(points), float(line_width(max(height, width))))
            pressure = np.ones(len(points))
        # Densify so consecutive discs overlap smoothly: spacing a fraction of the thinnest width.
        steps = np.hypot(*np.diff(points, axis=0).T) if len(points) > 1 else np.zeros(0)
        arc = np.concatenate([[0.0], np.cumsum(steps)])
        spacing = max(0.15, 0.3 * float(widths.min()))
        t = np.linspace(0.0, arc[-1], max(1, int(arc[-1] / spacing) + 1))
        xs, ys = (np.interp(t, arc, points[:, i]) for i in range(2))
        radii, inks = np.interp(t, arc, widths) * f / 2, np.interp(t, arc, pressure) * 255
        cx, cy = (xs + 0.5) * f - 0.5, (ys + 0.5) * f - 0.5
        # Draw the stroke on its own patch (its bounding box) and merge by maximum darkness.
        left = max(0, int(np.floor((cx - radii).min())) - 1)
        top = max(0, int(np.floor((cy - radii).min())) - 1)
        right = min(width * f, int(np.ceil((cx + radii).max())) + 2)
        bottom = min(height * f, int(np.ceil((cy + radii).max())) + 2)
        if right <= left or bottom <= top:
            continue
        patch = Image.new("L", (right - left, bottom - top), 0)
        draw = ImageDraw.Draw(patch)
        for x, y, r, ink in zip(cx - left, cy - top, radii, inks):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=int(round(ink)))
        region, ink = darkness[top:bottom, left:right], np.asarray(patch)
        if owner is not None:
            owner[top:bottom, left:right][ink > region] = classes[number]
        np.maximum(region, ink, out=region)
    mean = darkness.reshape(height, f, width, f).mean(axis=(1, 3))
    # Round darkness up: any touched pixel shows some ink, untouched ones stay exactly 255.
    sketch = (PAPER - np.ceil(mean)).astype(np.uint8)
    if owner is None:
        return sketch, None
    blocks = darkness.reshape(height, f, width, f).transpose(0, 2, 1, 3).reshape(height, width, f * f)
    darkest = blocks.argmax(axis=2)
    owners = owner.reshape(height, f, width, f).transpose(0, 2, 1, 3).reshape(height, width, f * f)
    classes_map = np.take_along_axis(owners, darkest[..., None], axis=2)[..., 0]
    return sketch, np.where(sketch < PAPER, classes_map, 0).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Files


def file_seed(seed: int, name: str) -> int:
    """A per-file seed from the run seed and the file's relative name, independent of file order."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def freehand_sketches_from_folder(source: Path, out: Path, strength: float, seed: int,
                                  on_skip: Callable[[Path, str], None] | None = None) -> int:
    """Write `out/NAME.png`, a simulated free-hand sketch, for every mask under `source`.

    `source` is one mask file, a folder of masks, or a dataset folder with `masks/`. Relative
    names are mirrored; each file's randomness depends only on (seed, relative name). A mask that
    cannot be used is passed to `on_skip(path, why)` and the others are still drawn; when none can
    be, the first one's error is raised. Returns the number of sketches written.
    """
    source, out = Path(source), Path(out)
    if not (0.0 <= strength <= MAX_STRENGTH):  # also rejects NaN
        raise InputError(
            f"strength {strength} is outside [0, {MAX_STRENGTH:g}]; use 0 (synthesized), 1 (sloppy) to 2 (from memory)"
        )
    if not source.exists():
        raise InputError(f"{source}: no such file or folder; pass a mask file, a folder of masks or a dataset folder")
    root = source
    if source.is_dir():
        if (source / "masks").is_dir():
            root = source / "masks"
        elif (source / "images").is_dir():
            raise InputError(f"{source}: dataset folder has no masks/; free-hand sketches are drawn from masks")
    paths = find_images(root)
    if not paths:
        raise InputError(f"{root}: no mask images found; pass a mask PNG or a folder of class-index mask PNGs")
    count, failures = 0, []
    for path in paths:
        name = Path(path.name) if root.is_file() else path.relative_to(root)
        try:
            mask = _class_index_mask(path)
        except InputError as error:
            failures.append(error)
            if on_skip is not None:
                on_skip(path, str(error).removeprefix(f"{path}: "))
            continue
        sketch = freehand_sketch(mask, strength, file_seed(seed, name.as_posix()))
        target = out / name.with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sketch).save(target)
        count += 1
    if count == 0:
        raise failures[0]
    return count


def _class_index_mask(path: Path) -> np.ndarray:
    mask = load_mask(path)
    if len(np.unique(mask)) > MAX_MASK_VALUES:
        raise InputError(
            f"{path}: {len(np.unique(mask))} distinct values looks like a grayscale picture, "
            "not a class-index mask; pass segmentation masks"
        )
    return mask
