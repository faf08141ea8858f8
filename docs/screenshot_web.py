"""The screenshot of the search page in the README (docs/web_search.png), with a real bundle.

    python cli.py demo --out /tmp/demo
    python docs/screenshot_web.py --clinic /tmp/demo/archive/images --workspace /tmp/demo/clinic-workspace \\
        --sketch /tmp/demo/query_sketch.png --out docs/web_search.png

With `--clinic FOLDER`, the PNG images of FOLDER are first written as DICOM files with made-up
identifiers (`clinic_archive`: patients, studies, series, dates; each image followed by a
near-identical second frame of its series, as consecutive video frames are) beside the workspace,
and indexed into `--workspace` with the default bundle, so the cards show patients, studies, dates
and group counts. Without it, `--workspace` is used as it is.

Starts `cli.py serve` on 127.0.0.1 and a free port, opens the page in headless Chromium (Debian's,
through Playwright, as the end-to-end test does), optionally shows a template, uploads the sketch,
searches for 6 results, opens the first and saves a full-page screenshot (a palette PNG). Needs the `serve` and `dev` extras.
"""

from __future__ import annotations

import argparse
import datetime
import io
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load_server import start_server  # noqa: E402  (starts `serve` on a free port and waits for /api/health)

FRAMES_PER_STUDY = 6  # 3 images, each with its near-identical next frame
STUDIES_PER_PATIENT = 2


def write_rgb_dicom(path: Path, pixels: np.ndarray, **tags) -> None:
    """An 8-bit RGB Secondary Capture file of (H, W, 3) pixels with these DICOM attributes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    # the same UID for the same file name: a second run writes the same files, which indexing then skips
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", generate_uid(entropy_srcs=[path.name])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID, dataset.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    dataset.Rows, dataset.Columns = pixels.shape[:2]
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = np.ascontiguousarray(pixels, np.uint8).tobytes()
    dataset.save_as(path, enforce_file_format=True)


def clinic_archive(images: Path, out: Path) -> Path:
    """The PNGs of `images` (sorted) as DICOM files: consecutive images share a study of one patient,
    and each is followed in its series by a copy with +-2 levels of noise (a near-identical frame)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    first_day = datetime.date(2019, 1, 7)
    for n, path in enumerate(sorted(images.glob("*.png"))):
        pixels = np.asarray(Image.open(path).convert("RGB"))
        study = n * 2 // FRAMES_PER_STUDY
        patient = study // STUDIES_PER_PATIENT
        tags = dict(PatientID=f"P{patient + 1:03d}", StudyInstanceUID=f"1.2.826.0.1.3680043.10.{study + 1}",
                    SeriesInstanceUID=f"1.2.826.0.1.3680043.10.{study + 1}.1", Modality="ES", BodyPartExamined="LARYNX",
                    StudyDate=(first_day + datetime.timedelta(days=29 * study)).strftime("%Y%m%d"))
        write_rgb_dicom(out / f"{path.stem}_1.dcm", pixels, **tags)
        noisy = np.clip(pixels.astype(np.int16) + rng.integers(-2, 3, pixels.shape), 0, 255)
        write_rgb_dicom(out / f"{path.stem}_2.dcm", noisy, **tags)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--sketch", type=Path, required=True, help="sketch file uploaded on the page")
    p.add_argument("--clinic", type=Path, help="folder of PNG images to index first as DICOM files with identifiers")
    p.add_argument("--template", type=Path, help="image shown faintly under the drawing")
    p.add_argument("--results", type=int, default=6, help="results asked for (the page's k)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "web_search.png")
    args = p.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Debian's chromium is not installed (apt-get install -y chromium)")
    if args.clinic:
        archive = clinic_archive(args.clinic, args.workspace.parent / f"{args.workspace.name}-archive" / "clinic-a")
        subprocess.run([sys.executable, str(ROOT / "cli.py"), "index", str(archive), "--workspace", str(args.workspace)], cwd=ROOT, check=True)

    base, server = start_server(argparse.Namespace(workspace=args.workspace, bundle=None, threads=0, max_concurrent=32))
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=chromium, args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(base)
            page.wait_for_function("() => document.getElementById('info').textContent.includes('images')")
            if args.template:
                page.set_input_files("#template-file", str(args.template))
            page.evaluate("k => { document.getElementById('k').value = k; }", str(args.results))  # under the closed options
            page.set_input_files("#sketch-file", str(args.sketch))
            page.locator("#search").click()
            page.wait_for_function("() => document.querySelectorAll('#results .result').length > 0", timeout=120_000)
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(img => img.complete && img.naturalWidth > 0)")
            page.locator("#results .result").first.click()
            page.wait_for_function("() => document.getElementById('detail-image').complete && document.getElementById('detail-masks').complete")
            shot = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
            browser.close()
        shot.quantize(256, method=Image.Quantize.MEDIANCUT).save(args.out, optimize=True)  # a palette PNG: a third of the bytes
        print(f"wrote {args.out}")
    finally:
        server.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        server.wait(30)


if __name__ == "__main__":
    main()
