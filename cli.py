"""sketch2medi command line: thin wrappers over library functions (also `python cli.py ...`)."""

from __future__ import annotations

from pathlib import Path

import typer

from generation.device import is_main_process, set_threads
from generation.errors import InputError
from retrieval.defaults import DEFAULT_CANDIDATES, DEFAULT_LAMBDA, DEFAULT_WEIGHTS
from training.commands import (
    COMPILE_ARCHIVE_HELP,
    DEVICE_HELP,
    PRECISION_HELP,
    train_app,
)
from training.console import (
    ProgressLines,
    WholeHelpGroup,
    check_folder_out,
    check_image_out,
    finite,
    literal_printer,
    print_groups,
    print_results,
    progress_bar,
    report_skipped,
    shortened_paths,
    timing_line,
)


class UserErrorGroup(WholeHelpGroup):
    """Turns the library's `InputError`s into one line on stderr and exit code 2, no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as error:
            typer.secho(f"error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2)


app = typer.Typer(
    cls=UserErrorGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help wraps long words where rich's panels cut them at 80 columns
    help="Sketch-based medical image retrieval with the Sketch2MedI generator.",
)
app.add_typer(train_app, name="train")

LAMBDA_HELP = ("score = lambda * similarity + (1 - lambda) * DICE / 100 (DICE runs 0-100), "
               "blended with the alignment's score (docs/SEARCH.md).")
WEIGHTS_TEXT = ",".join(f"{name}={value:g}" for name, value in DEFAULT_WEIGHTS.items())
@app.command()
def phantom(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write images/, masks/, classes.json, split.csv into."),
    n: int = typer.Option(2000, "--n", min=1, help="Number of images."),
    size: int = typer.Option(256, "--size", min=32, max=512, help="Image side in pixels (32-512)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed; the same seed gives the same images."),
):
    """Generate the procedural pharyngeal phantom dataset (images, exact masks, splits)."""
    from generation.phantom import write_phantom_dataset

    with progress_bar() as progress:
        task = progress.add_task("phantom", total=n)
        write_phantom_dataset(out, n=n, size=size, seed=seed, on_image=lambda: progress.advance(task))
    typer.echo(f"wrote {n} phantom images of {size}x{size} px to {out}")


@app.command()
def freehand(
    source: Path = typer.Argument(..., metavar="SOURCE", help="A mask file, a folder of masks, or a dataset folder with masks/."),
    out: Path = typer.Option(..., "--out", help="Folder for the simulated sketches (NAME.png)."),
    strength: float = typer.Option(0.5, "--strength", min=0.0, max=2.0, callback=finite,
                                   help="0 = synthesized sketch, 1 = sloppy, 2 = drawn from memory (misplaced, warped, partial)."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random hand."),
):
    """Simulate free-hand sketches drawn from segmentation masks; a file that fails is reported and skipped."""
    from generation.freehand import freehand_sketches_from_folder

    check_folder_out(out)
    skipped: list[tuple[Path, str]] = []
    count = freehand_sketches_from_folder(source, out, strength=strength, seed=seed, on_skip=lambda path, why: skipped.append((path, why)))
    typer.echo(f"wrote {count} sketches (strength {strength:g}) to {out}" + (f"; skipped {len(skipped)}" if skipped else ""))
    report_skipped(skipped)


@app.command()
def normalize(
    sketch: Path = typer.Argument(..., metavar="SKETCH", help="A sketch image file (any polarity, mode and size)."),
    out: Path = typer.Option(..., "--out", help="Where to write the canonical sketch PNG."),
    size: int = typer.Option(256, "--size", min=32, max=1024, help="Side of the canonical sketch."),
):
    """Show what the system sees: bring a drawn sketch to the canonical form."""
    from PIL import Image

    from generation.normalize import normalize_sketch_file

    check_image_out(out)
    canonical = normalize_sketch_file(sketch, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canonical).save(out)
    typer.echo(f"wrote {out}")


@app.command()
def generate(
    sketch: Path = typer.Argument(..., metavar="SKETCH", help="A sketch image (any polarity, mode and size; normalised first)."),
    out: Path = typer.Option(..., "--out", help="PNG to write: the image, or with --strip every refinement step."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle made by `train all` (default: $SKETCH2MEDI_BUNDLE, else the shipped one)."),
    steps: int = typer.Option(None, "--steps", min=0, help="Refinement steps T (default: as trained, 3; 0 = E alone)."),
    strip: bool = typer.Option(False, "--strip", help="Write sketch | x_0 | x_1 | ... | x_T side by side."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Generate a realistic image from one sketch with E, G and H."""
    import numpy as np
    from PIL import Image

    from generation.bundle import default_bundle
    from generation.images import tensor_to_images
    from generation.normalize import normalize_sketch_file
    from generation.pipeline import Sketch2MedI

    check_image_out(out)
    model = Sketch2MedI.from_bundle(bundle or default_bundle(), device)
    canonical = normalize_sketch_file(sketch, model.resolution)
    result = model.generate(canonical[None], steps=steps)
    if strip:
        pictures = [np.repeat(canonical[:, :, None], 3, axis=2)] + [tensor_to_images(image)[0] for image in result.steps]
        picture = np.concatenate(pictures, axis=1)
    else:
        picture = tensor_to_images(result.images)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out)
    typer.echo(f"wrote {out} ({len(result.steps) - 1} refinement steps)")


@app.command()
def sketch(
    source: Path = typer.Argument(..., metavar="SOURCE", help="An image file or a folder of images."),
    out: Path = typer.Option(..., "--out", help="Folder for masks/NAME.png (class indices) and sketches/NAME.png."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle folder with the trained synthesizer (default: as for `generate`)."),
    size: int = typer.Option(256, "--size", min=32, max=1024, help="Side of the square outputs (images are centre-cropped)."),
    threshold: float = typer.Option(0.35, "--threshold", min=0.0, max=1.0, callback=finite, help="Minimum instance confidence (the paper's delta)."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Synthesize sketches: segment each image with S and draw its instances' contours; a file that fails is reported and skipped."""
    from generation.bundle import default_bundle
    from generation.solov2 import sketch_folder

    check_folder_out(out)
    skipped: list[tuple[Path, str]] = []
    with progress_bar() as progress:
        task = progress.add_task("sketch", total=None)
        count = sketch_folder(source, out, bundle or default_bundle(), size=size, threshold=threshold, device=device,
                              on_image=lambda done, total: progress.update(task, completed=done, total=total),
                              on_skip=lambda path, why: skipped.append((path, why)))
    typer.echo(f"wrote {count} masks and sketches to {out}" + (f"; skipped {len(skipped)}" if skipped else ""))
    report_skipped(skipped)


@app.command()
def evaluate(
    data: Path = typer.Option(..., "--data", help="Dataset folder: every image is the archive, the split's images are queried."),
    split: str = typer.Option("test", "--split", help="Split whose images are the right answers."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle to evaluate (default: as for `generate`)."),
    strengths: str = typer.Option("0,1,2", "--strengths", help="Free-hand simulator strengths (0 to 2), comma-separated."),
    sketches: Path = typer.Option(None, "--sketches", help="Query with drawn sketches instead: a folder of sketches/NAME.png, "
                                  "each of the dataset's image NAME.png (the split, strengths and seeds then do not apply)."),
    seeds: int = typer.Option(2, "--seeds", min=1, help="Simulated sketches per image and strength."),
    limit: int = typer.Option(None, "--limit", min=1, help="Only the first N images of the split."),
    candidates: int = typer.Option(DEFAULT_CANDIDATES, "--candidates", min=1),
    lam: float = typer.Option(DEFAULT_LAMBDA, "--lambda", min=0.0, max=1.0, callback=finite, help=LAMBDA_HELP),
    weights: str = typer.Option(None, "--weights", help=f"Vector weights as for `index` (default: the bundle's search.json, else {WEIGHTS_TEXT})."),
    labelled: bool = typer.Option(False, "--labelled", help="Add the full_labelled row: the same simulated sketches colour-coded "
                                  "by class, matched per class (docs/SEARCH.md)."),
    label_weights: str = typer.Option(None, "--label-weights", help="full_labelled rows for these WEIGHT:DICE pairs, comma-separated "
                                      "(e.g. 0.1:0,0.3:0.5; implies --labelled; default: the search's)."),
    methods: str = typer.Option(None, "--methods", help="Only these rows, comma-separated (e.g. full,sketch_only; default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON."),
    out: Path = typer.Option(None, "--out", help="Also write the JSON report to this file."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("float32", "--precision", help=PRECISION_HELP),
    compile_networks: bool = typer.Option(False, "--compile", help=COMPILE_ARCHIVE_HELP),
):
    """Measure retrieval (Recall@k, MRR, median rank) and generation quality against ablations and baselines."""
    import json
    import math

    from retrieval.evaluate import METHODS, EvaluationOptions
    from retrieval.evaluate import evaluate as run_evaluation
    from retrieval.labelled import LabelWeights, parse_label_weights
    from retrieval.vector import VectorRecipe

    try:
        levels = tuple(float(value) for value in strengths.split(","))
    except ValueError:
        levels = (math.nan,)
    if not all(0 <= level <= 2 for level in levels):  # also refuses NaN; 2 is the simulator's MAX_STRENGTH
        raise InputError(f"--strengths {strengths!r}: give numbers between 0 and 2, e.g. 0,1,2")
    options = EvaluationOptions(strengths=levels, seeds=tuple(range(seeds)), candidates=candidates, lam=lam, limit=limit,
                                recipe=VectorRecipe.parse(weights) if weights else None,
                                sketches=str(sketches) if sketches else None,
                                labelled=parse_label_weights(label_weights) if label_weights else (LabelWeights(),) if labelled else (),
                                methods=tuple(methods.split(",")) if methods else None, precision=precision,
                                compile_archive=compile_networks)
    unknown = [m for m in options.methods or () if m not in METHODS]
    if unknown:
        raise InputError(f"--methods: no method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    with progress_bar() as progress:
        tasks: dict[str, int] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=done)

        report = run_evaluation(data, split, bundle, options, device, on_progress)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    from retrieval.evaluate import markdown_tables

    typer.echo(markdown_tables(report))


@app.command()
def export(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="A bundle folder made by `train all` (or the `train` commands)."),
    out: Path = typer.Option(..., "--out", help="Folder for the exported bundle: networks and bundle.json only."),
    half: bool = typer.Option(True, "--half/--full", help="Store weights as float16 (half the size) or as trained."),
):
    """Copy a bundle's networks without its training scratch, e.g. to ship or commit it."""
    from generation.bundle import export_bundle

    manifest = export_bundle(bundle, out, half)
    size = sum(entry["bytes"] for entry in manifest["networks"].values()) / 1e6
    typer.echo(f"wrote {out}: {', '.join(manifest['networks'])} ({size:.1f} MB), bundle id {manifest['bundle_id']}")


WORKSPACE_HELP = "Workspace folder (default: $SKETCH2MEDI_WORKSPACE, else ~/.local/share/sketch2medi/workspace)."
DB_HELP = "SQLAlchemy URL of the catalog (default: SQLite inside the workspace), e.g. postgresql+psycopg://user@host/db."


@app.command()
def index(
    paths: list[str] = typer.Argument(..., metavar="PATHS", help="Image files or folders (PNG, JPEG, TIFF, BMP, DICOM), searched recursively; "
                                      "or one DICOMweb server, dicomweb+http(s)://HOST:PORT/PATH (needs the pacs extra)."),
    workspace: Path = typer.Option(None, "--workspace", help=WORKSPACE_HELP),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle made by `train all` (default: $SKETCH2MEDI_BUNDLE, else the shipped one)."),
    db_url: str = typer.Option(None, "--db-url", "--db", help=DB_HELP),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per batch (each batch is committed before it is reported)."),
    index_kind: str = typer.Option("auto", "--index", help="auto (exact up to 100k images, HNSW up to 2M, then ivfpq) | flat | ivf | hnsw | ivfpq."),
    weights: str = typer.Option(None, "--weights", help=f"Vector weights, e.g. {WEIGHTS_TEXT} (default: the bundle's search.json, else that; docs/SEARCH.md)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file, also those whose size, mtime, inode and ctime are unchanged."),
    tag: str = typer.Option(None, "--tag", help="Tag recorded with every file (default: the top folder's name) or instance (default: none)."),
    auth: str = typer.Option(None, "--auth", help="DICOMweb: bearer:VARIABLE or basic:VARIABLE, the environment variable holding the token or user:password."),
    modality: list[str] = typer.Option(None, "--modality", help="DICOMweb: only series of this modality (CT, MR, ES, ...); repeatable."),
    study_date: str = typer.Option(None, "--study-date", help="DICOMweb: only studies of these dates: YYYYMMDD, YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD."),
    study_uid: str = typer.Option(None, "--study-uid", help="DICOMweb: only this study (StudyInstanceUID)."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.001, help="DICOMweb: seconds the server has to answer each request."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("float32", "--precision", help=PRECISION_HELP),
    compile_networks: bool = typer.Option(False, "--compile", help=COMPILE_ARCHIVE_HELP),
):
    """Add images to the archive: S's masks, the synthesized sketch's field and E's code, C's embedding; incremental."""
    import functools

    from generation.device import init_distributed
    from indexing.dicomweb import DicomWebFilters, is_dicomweb
    from indexing.ingest import index_dicomweb, index_folders
    from retrieval.models import SystemModels
    from retrieval.vector import ArchiveEmbedder, VectorRecipe

    servers = [path for path in paths if is_dicomweb(path)]
    if servers and (len(paths) > 1 or verify):
        raise InputError("index one DICOMweb server at a time, without folders or --verify")
    if not servers and (auth or modality or study_date or study_uid):
        raise InputError("--auth, --modality, --study-date and --study-uid are for a DICOMweb server (dicomweb+http://...)")
    filters = DicomWebFilters(tuple(modality or ()), study_date, study_uid)  # checked before any network is loaded
    models = SystemModels(bundle, device, precision)
    if compile_networks:
        models.compile_archive(-(-batch_size // init_distributed(models.device).world_size))  # each rank's share of a batch
    embedder = ArchiveEmbedder(models, VectorRecipe.parse(weights) if weights else None)  # None: the bundle's
    options = dict(db_url=db_url, batch_size=batch_size, index_kind=index_kind, tag=tag)
    if servers:
        run = functools.partial(index_dicomweb, servers[0], workspace, embedder, auth=auth, filters=filters, timeout=timeout, **options)
    else:
        run = functools.partial(index_folders, paths, workspace, embedder, verify=verify, **options)
    if not is_main_process():  # torchrun: the other ranks embed their shares quietly
        run()
        return
    from rich.console import Console

    progress = progress_bar("files") if Console().is_terminal else ProgressLines()  # started once the workspace is open and checked
    task = None

    def on_start(total: int) -> None:
        nonlocal task
        progress.start()
        task = progress.add_task("index", total=total)

    def on_progress(done: int, total: int, path: Path | str) -> None:
        name = path.name if isinstance(path, Path) else path.rsplit("/", 1)[-1]
        progress.update(task, completed=done, total=total, description=f"index {name[:40]}")

    try:
        summary = run(on_start=on_start, on_progress=on_progress)
    finally:
        if task is not None:
            progress.stop()
    typer.echo(f"added {summary.added}, unchanged {summary.unchanged}, duplicates {summary.duplicates}, "
               f"skipped {len(summary.skipped)}, removed {summary.removed}")
    for path, why in summary.skipped:
        typer.echo(f"  skipped {path}: {why}")


@app.command()
def search(
    sketch: Path = typer.Argument(None, metavar="[SKETCH]", help="The sketch (any polarity, mode and size); "
                                                                 "leave out with --image or --like."),
    k: int = typer.Option(10, "-k", "--top", min=1, help="How many results."),
    workspace: Path = typer.Option(None, "--workspace", help=WORKSPACE_HELP),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle (default: the one the workspace was indexed with)."),
    db_url: str = typer.Option(None, "--db-url", "--db", help=DB_HELP),
    candidates: int = typer.Option(DEFAULT_CANDIDATES, "--candidates", min=1, help="FAISS candidates re-ranked by DICE and alignment."),
    rerank: bool = typer.Option(True, "--rerank/--no-rerank", help="Re-rank the candidates by the DICE of S's masks and the sketch aligned to their contours."),
    lam: float = typer.Option(DEFAULT_LAMBDA, "--lambda", min=0.0, max=1.0, callback=finite, help=LAMBDA_HELP),
    steps: int = typer.Option(None, "--steps", min=0, help="Refinement steps (default: as trained, 3)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (schema in docs/SEARCH.md) instead of a table."),
    out: Path = typer.Option(None, "--out", help="Folder for sketch.png, generated.png and results.png (contact sheet)."),
    group: str = typer.Option(None, "--group", help="patient | study | series | none: the top k groups with their best frames "
                                                    "(default: study where studies are known, else none)."),
    where: str = typer.Option(None, "--where", help='Only images matching this filter, e.g. "modality=ES,XA; date>=2020-01-01; '
                                                    'body=LARYNX; tag=clinic-a" (docs/SEARCH.md).'),
    image: Path = typer.Option(None, "--image", help="Search by this image instead of a sketch (query by example)."),
    like: list[int] = typer.Option([], "--like", metavar="ID", help="An archive image id (repeatable): alone, more like it; "
                                                                    "with a sketch or --image, feedback toward it."),
    unlike: list[int] = typer.Option([], "--unlike", metavar="ID", help="An archive image id (repeatable): feedback away from it."),
    labelled: bool = typer.Option(False, "--labelled", help="The sketch is colour-coded by class (the colours `classes` lists; "
                                                            "black: unlabelled): match its strokes per class."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Find the archive images that look like the sketch (or the --image, or the --like images)."""
    import json

    from indexing.filters import SearchFilter
    from retrieval.grouping import grouped_search
    from retrieval.quality import no_close_match_notice
    from retrieval.search import Retriever

    if out is not None:
        check_folder_out(out)
    search_filter = SearchFilter.parse(where) if where is not None else None  # a bad clause is refused before the models load
    with Retriever(workspace, bundle, db_url, device) as retriever:
        result, groups = grouped_search(retriever, sketch, k=k, group=group, candidates=candidates, rerank=rerank, lam=lam, steps=steps,
                                        image=image, like=like, unlike=unlike, where=search_filter, labelled=labelled)  # fmt: skip
        if out is not None:
            from retrieval.contact_sheet import write_search_outputs

            write_search_outputs(result, out)
    if as_json:
        payload = result.to_json()
        if groups is not None:
            payload["groups"] = [g.to_json() for g in groups]
        typer.echo(json.dumps(payload, indent=1))
        return
    if result.matching is not None:
        typer.echo(f"{result.matching} archive images match --where {result.where!r}")
    if result.no_close_match:
        typer.echo(no_close_match_notice(result.results[0].quality, result.quality_threshold))
    if groups is not None:
        print_groups(groups)
    else:
        paths = [hit.path + (f" [frame {hit.frame}]" if hit.frame else "") for hit in result.results]
        folder, labels = shortened_paths(paths)
        print_results(result.results, labels, note=f"paths under {folder}/" if folder else None)
    typer.echo(timing_line(result.timings_ms) + (f"; wrote {out}" if out else ""))


@app.command()
def classes(
    bundle: Path = typer.Option(None, "--bundle", help="Bundle whose classes to list (default: as for `generate`)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON: [{index, name, colour}, ...]."),
):
    """The colours a labelled sketch draws each class of the bundle in (for `search --labelled`)."""
    import json

    from generation.bundle import default_bundle
    from generation.labelled import colour_table

    table = colour_table(bundle if bundle is not None else default_bundle())
    if as_json:
        typer.echo(json.dumps(table, indent=1))
        return
    for row in table:
        typer.echo(f"{row['index']:>3}  {row['colour']}  {row['name']}")


@app.command()
def serve(
    workspace: Path = typer.Option(None, "--workspace", help=WORKSPACE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs an access token."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle (default: the one the workspace was indexed with)."),
    db_url: str = typer.Option(None, "--db-url", "--db", help=DB_HELP),
    token_env: str = typer.Option(None, "--token-env", metavar="VARIABLE",
                                  help="The environment variable holding the access token every request must carry (default: SKETCH2MEDI_TOKEN)."),
    max_concurrent: int = typer.Option(32, "--max-concurrent", min=1, help="Searches admitted at once (one batch computes, the rest queue); more get 503."),
    batch_wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0, max=1000, callback=finite,
                                        help="How long an idle model waits for more searches to run in one batch with the first (0: no wait)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, max=256, help="Searches computed together in one batch at most (1: one at a time)."),
    refresh_s: float = typer.Option(2.0, "--refresh-s", min=0, max=86400, callback=finite,
                                    help="How often at most a search first picks up images an index run committed since (0: every batch)."),
    device: str = typer.Option("cpu", "--device", help="cpu (default) | auto | cuda | cuda:N"),
    threads: int = typer.Option(0, "--threads", min=0, help="CPU threads for torch (0 = torch's default)."),
    compile_networks: bool = typer.Option(False, "--compile", help="Compile the networks with torch.compile before serving, with "
                                          "--max-batch 1 only: one search about 1.25x faster on CPUs (docs/BENCHMARKS.md); a few minutes at start."),
    allowed_hosts: str = typer.Option(None, "--allowed-hosts",
                                      help="Comma-separated host names to answer, * for any (default without a token: loopback and --host)."),
    audit_log: Path = typer.Option(None, "--audit-log", help="Append one JSON line per search to this file: time, client, token identity, "
                                                               "upload digests, filter, ids returned; never the images."),
):
    """Serve the draw-to-search web page and its JSON API (needs the `serve` extra)."""
    try:
        from retrieval.server import access_token, check_bind
        from retrieval.server import serve as run_server
    except ImportError as error:
        raise InputError(f"the web app needs the serve extra ({error.name} is missing): pip install 'sketch2medi[serve]'")
    token = access_token(token_env)  # from the environment: a token on the command line shows in every process listing
    check_bind(host, token)  # before loading any network
    set_threads(threads)
    run_server(workspace, host, port, bundle, db_url, token, device, max_concurrent,
               allowed_hosts.split(",") if allowed_hosts is not None else None, audit_log, batch_wait_ms, max_batch, refresh_s,
               compile_networks)


@app.command()
def demo(
    out: Path = typer.Option(Path("sketch2medi-demo"), "--out", help="Folder for the archive, workspace, sketch and contact sheet."),
    bundle: Path = typer.Option(None, "--bundle", help="Bundle (default: $SKETCH2MEDI_BUNDLE, else the shipped phantom bundle)."),
    images: int = typer.Option(200, "--images", min=10, help="Phantom images in the demo archive."),
    strength: float = typer.Option(0.5, "--strength", min=0.0, max=1.0, callback=finite, help="Sloppiness of the simulated free-hand sketch."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
):
    """Generate a phantom archive, index it, sketch one image free-hand, search, show the results."""
    from rich.console import Console

    from retrieval.demo import run_demo

    check_folder_out(out)
    result = run_demo(out, bundle, images=images, strength=strength, device=device, log=literal_printer(Console()))
    hits = result.search.results
    print_results(hits, [Path(hit.path).name + (" <- sketched" if result.rank == hit.rank else "") for hit in hits])
    found = f"found at rank {result.rank}" if result.rank else f"not in the top {len(hits)}"
    typer.echo(f"sketched {result.target.name} ({found}); sketch {result.sketch}; contact sheet {out / 'results.png'}")


if __name__ == "__main__":
    app()
