"""Render how generation quality grows with training compute: DICE and FD_C against CPU-hours.

    python docs/figures_scaling.py --out docs/scaling.png \\
        --point "Sketch2MedI:runs/e2000.json:sketch2medi:80000:8000" --point "pix2pix:runs/p1000.json:pix2pix:16000:800" ...

Each `--point` is LABEL:REPORT:ROW:IMAGES:SECONDS: an `evaluate --out` report, the generator row
of its generation table to read (sketch2medi, no_refiner, pix2pix, ...), and the training compute
behind it (images shown to the networks the method trains, and single-thread CPU seconds). Points
of one LABEL form one curve, ordered by compute. Prints the table (markdown) and writes a two-panel
PNG (DICE, FD_C; one line per label and strength, CPU-hours on a log axis). Plain PIL: no plotting
library is needed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
WIDTH, HEIGHT, MARGIN = 460, 320, 56


def read_points(specs: list[str]) -> list[dict]:
    points = []
    for spec in specs:
        label, report, row, images, seconds = spec.rsplit(":", 4)
        generation = json.loads(Path(report).read_text())["generation"][row]
        points.append({"label": label, "images": int(images), "hours": float(seconds) / 3600, "report": report,
                       **{strength: values for strength, values in generation.items()}})
    return points


def panel(points: list[dict], metric: str, title: str, strengths: list[str]) -> Image.Image:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    xs = [math.log10(p["hours"]) for p in points]
    ys = [p[s][metric] for p in points for s in strengths]
    x0, x1 = math.floor(min(xs) * 2) / 2, math.ceil(max(xs) * 2) / 2 + 1e-9
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.1 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def at(x: float, y: float) -> tuple[float, float]:
        return (MARGIN + (x - x0) / (x1 - x0) * (WIDTH - 1.5 * MARGIN), HEIGHT - MARGIN + (y0 - y) / (y1 - y0) * (HEIGHT - 1.6 * MARGIN))

    draw.rectangle([at(x0, y1), at(x1, y0)], outline="black")
    draw.text((MARGIN, 8), title, fill="black")
    tick = x0
    while tick <= x1:
        x, y = at(tick, y0)
        draw.line([(x, y), (x, y + 4)], fill="black")
        draw.text((x - 12, y + 6), f"{10 ** tick:.2g}", fill="black")
        tick += 0.5
    draw.text((WIDTH // 2 - 60, HEIGHT - 20), "training CPU-hours (log)", fill="black")
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        x, y = at(x0, value)
        draw.text((4, y - 6), f"{value:.3g}", fill="black")
    legend = 0
    for colour, label in zip(COLOURS, dict.fromkeys(p["label"] for p in points)):
        curve = sorted((p for p in points if p["label"] == label), key=lambda p: p["hours"])
        for dash, strength in enumerate(strengths):
            line = [at(math.log10(p["hours"]), p[strength][metric]) for p in curve]
            shade = colour if dash == 0 else tuple(min(255, c + 90) for c in colour)
            draw.line(line, fill=shade, width=2)
            for x, y in line:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=shade)
            draw.text((MARGIN + 8, 24 + 12 * legend), f"{label}, strength {strength}", fill=shade)
            legend += 1
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--point", action="append", required=True, help="LABEL:REPORT:ROW:IMAGES:SECONDS (repeat).")
    parser.add_argument("--strengths", default="0.5,1", help="Strengths to draw, as in the reports.")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write.")
    args = parser.parse_args()
    strengths = [s.strip() for s in args.strengths.split(",")]
    points = read_points(args.point)
    print("| method | images shown | CPU-hours | " + " | ".join(f"DICE {s} | FD_C {s}" for s in strengths) + " |")
    print("|---|---|---|" + "---|---|" * len(strengths))
    for p in points:
        cells = " | ".join(f"{p[s]['dice']:.1f} | {p[s]['fd_c']:.3f}" for s in strengths)
        print(f"| {p['label']} | {p['images']:,} | {p['hours']:.2f} | {cells} |")
    canvas = Image.new("RGB", (2 * WIDTH, HEIGHT), "white")
    canvas.paste(panel(points, "dice", "DICE(S(x_hat), S(x)), higher is better", strengths), (0, 0))
    canvas.paste(panel(points, "fd_c", "FD_C, lower is better", strengths), (WIDTH, 0))
    canvas.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
