"""Drawing of the embedded shapes dataset: one image and its visible-part instance masks.

Everything is numpy + PIL and driven by one ``numpy.random.Generator`` per image, so an image is
a pure function of its seed. Design choices that keep the task learnable by a small Mask R-CNN
trained from scratch, yet not trivial:

* six classes with distinct geometry; each class has a home hue that it uses with probability
  0.5, so colour is a strong cue but never determines the class;
* objects are saturated, backgrounds are desaturated textures (gradient + stripes or
  low-frequency noise + fine noise) with soft-edged distractor blobs of saturated colour, which
  have no sharp outline to be mistaken for a shape;
* diameters are log-uniform from 8 px to 0.8 x the short side (at most about half the image
  area), so COCO small (< 32^2), medium and large (>= 96^2) areas all occur;
* shapes are drawn largest first and later ones occlude earlier ones; a placement that would
  leave an earlier object less than ``MIN_VISIBLE`` of its drawn area is retried, so no ground
  truth is an unlabelled sliver, and masks are read from the final label map (the visible part).
"""
from __future__ import annotations

import colorsys
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "draw_image"]

CLASSES = ("circle", "rectangle", "triangle", "star", "ring", "cross")
HOME_HUES = (0.0, 0.15, 0.33, 0.5, 0.62, 0.8)  # red, yellow, green, cyan, blue, magenta
MIN_DIAMETER = 8.0
MIN_VISIBLE = 0.4  # fraction of an object's drawn area that must stay visible
MIN_PIXELS = 12


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A desaturated textured background, (h, w, 3) float32 in 0..255."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(theta) + yy * np.sin(theta)) / max(h, w)  # about -1.4 .. 1.4
    c0 = _hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.25, 0.8))
    c1 = _hsv(rng.random(), rng.uniform(0, 0.3), rng.uniform(0.25, 0.8))
    t = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]
    if rng.random() < 0.5:  # stripes of random period and direction
        phi = rng.uniform(0, 2 * np.pi)
        period = rng.uniform(6, 30)
        wave = np.sin((xx * np.cos(phi) + yy * np.sin(phi)) * (2 * np.pi / period))
        img += (rng.uniform(8, 25) * wave)[..., None]
    else:  # low-frequency noise: coarse grid upsampled bilinearly
        gh, gw = max(2, h // 16), max(2, w // 16)
        coarse = rng.normal(0, rng.uniform(8, 22), size=(gh, gw)).astype(np.float32)
        smooth = Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR)
        img += np.asarray(smooth)[..., None]
    for _ in range(int(rng.integers(0, 4))):  # soft distractor blobs
        cx, cy, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 30)
        alpha = rng.uniform(0.3, 0.6) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        colour = _hsv(rng.random(), rng.uniform(0.5, 1), rng.uniform(0.5, 1))
        img += (colour - img) * alpha[..., None]
    img += rng.normal(0, 3.0, size=img.shape).astype(np.float32)  # sensor-like fine noise
    return img


def _unit_polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Vertices (K, 2) of a shape inside the unit circle, centred at the origin."""
    if kind == "rectangle":
        b = rng.uniform(0.45, 0.85)  # aspect ratio short/long
        a = 1.0 / np.hypot(1.0, b)
        return np.array([[-a, -a * b], [a, -a * b], [a, a * b], [-a, a * b]])
    if kind == "triangle":
        ang = np.deg2rad(90 + 120 * np.arange(3) + rng.uniform(-8, 8, size=3))
        return np.stack([np.cos(ang), np.sin(ang)], axis=1)
    if kind == "star":
        ang = np.deg2rad(90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)
    if kind == "cross":
        t = rng.uniform(0.22, 0.34)  # half arm width relative to the arm length
        q = np.array([[t, 1], [t, t], [1, t], [1, -t], [t, -t], [t, -1],
                      [-t, -1], [-t, -t], [-1, -t], [-1, t], [-t, t], [-t, 1]])
        return q / np.hypot(1.0, t)
    raise ValueError(f"unknown polygon shape {kind!r}")


def _shape_mask(kind: str, cx: float, cy: float, r: float, angle: float,
                h: int, w: int, rng: np.random.Generator) -> Tuple[Tuple[slice, slice], np.ndarray]:
    """Rasterise one shape. Returns the window (slices into the image) and its bool mask."""
    x0, y0 = max(int(np.floor(cx - r)) - 1, 0), max(int(np.floor(cy - r)) - 1, 0)
    x1, y1 = min(int(np.ceil(cx + r)) + 2, w), min(int(np.ceil(cy + r)) + 2, h)
    win = (slice(y0, max(y1, y0)), slice(x0, max(x1, x0)))
    wh, ww = max(y1 - y0, 0), max(x1 - x0, 0)
    if kind in ("circle", "ring"):
        yy, xx = np.mgrid[y0:y0 + wh, x0:x0 + ww].astype(np.float64)
        dx, dy = xx + 0.5 - cx, yy + 0.5 - cy  # pixel centres
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / r
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) / r
        if kind == "circle":
            return win, u * u + (v / rng.uniform(0.7, 1.0)) ** 2 <= 1.0
        rho2 = u * u + v * v
        return win, (rho2 <= 1.0) & (rho2 >= rng.uniform(0.45, 0.65) ** 2)
    pts = _unit_polygon(kind, rng)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    pts = pts @ rot.T * r + np.array([cx - x0, cy - y0])
    canvas = Image.new("L", (max(ww, 1), max(wh, 1)), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in pts.tolist()], fill=1)
    return win, np.asarray(canvas, dtype=bool)[:wh, :ww]


def _fill(mask: np.ndarray, hue: float, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Colours (mask.shape + (3,)) for an object: solid, two-tone stripes or a gradient."""
    base = _hsv(hue, rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    style = rng.random()
    if style < 0.7:
        return np.broadcast_to(base, mask.shape + (3,))
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32)
    along = xx * np.cos(angle) + yy * np.sin(angle)
    if style < 0.85:
        band = (np.floor(along / rng.uniform(3, 8)) % 2)[..., None]
        return base * (1.0 - 0.35 * band)
    span = max(float(along.max() - along.min()), 1.0)
    return base * (0.6 + 0.4 * ((along - along.min()) / span))[..., None]


def draw_image(height: int, width: int, rng: np.random.Generator
               ) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Draw one image with 2-7 occluding shapes.

    Returns:
        ``image`` (height, width, 3) uint8 RGB and a list of ``(class index, visible mask
        (height, width) bool)`` in drawing order; masks never overlap.
    """
    img = _background(height, width, rng)
    labels = np.zeros((height, width), dtype=np.int16)  # 0 = background, k = k-th object
    objects, drawn = [], []  # (class, ...), drawn area in the image
    # A shape of diameter d covers 0.33-0.8 d^2, so d up to 0.8 x the short side is what makes
    # COCO "large" areas (>= 96^2) possible in 160-256 px images.
    d_max = max(0.8 * min(height, width), 2 * MIN_DIAMETER)
    n = int(rng.integers(2, 8))
    diameters = np.exp(rng.uniform(np.log(MIN_DIAMETER), np.log(d_max), size=n))
    if rng.random() < 0.35:  # log-uniform alone makes "large" rare (~2%); add a big one often
        diameters[0] = rng.uniform(0.55, 0.85) * min(height, width)
    for d in np.sort(diameters)[::-1]:  # painter's order: big shapes first, so they survive
        cls = int(rng.integers(len(CLASSES)))
        r = 0.5 * float(d)
        hue = HOME_HUES[cls] + rng.normal(0, 0.02) if rng.random() < 0.5 else rng.random()
        for _try in range(8):
            cx, cy = rng.uniform(0.4 * r, width - 0.4 * r), rng.uniform(0.4 * r, height - 0.4 * r)
            angle = rng.uniform(0, 2 * np.pi)
            win, mask = _shape_mask(CLASSES[cls], cx, cy, r, angle, height, width, rng)
            area = int(mask.sum())
            if area < MIN_PIXELS:
                continue
            # visible area each earlier object would keep if this one were drawn on top
            hidden = np.bincount(labels[win][mask], minlength=len(objects) + 1)[1:]
            visible = np.bincount(labels.ravel(), minlength=len(objects) + 1)[1:] - hidden
            if all(v >= max(MIN_VISIBLE * d, MIN_PIXELS) for v, d in zip(visible, drawn)):
                break
        else:
            continue  # no acceptable placement: skip this object
        colours = _fill(mask, hue, angle, rng)
        img[win][mask] = colours[mask]
        labels[win][mask] = len(objects) + 1
        objects.append(cls)
        drawn.append(area)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return image, [(cls, labels == k + 1) for k, cls in enumerate(objects)]
