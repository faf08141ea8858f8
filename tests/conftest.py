import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from hypothesis import settings

# CI explores a fixed set of examples, so a red run always reproduces; local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# The CI machine has 2 cores; one thread per test process keeps timings predictable.
torch.set_num_threads(1)

POSTGRES_URL = os.environ.get("SKETCH2MEDI_TEST_POSTGRES_URL")


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new database on the test PostgreSQL server, dropped afterwards."""
    if not POSTGRES_URL:
        pytest.skip("SKETCH2MEDI_TEST_POSTGRES_URL is not set (.ci/run starts a server and sets it)")
    admin = sa.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    name = f"s2m_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCALFOLDS = SHARED_DATA / "vocalfolds256"


@pytest.fixture
def vocalfolds() -> Path:
    if not (VOCALFOLDS / "images").is_dir():
        pytest.skip("../shared/data/vocalfolds256 is not present (fresh clone)")
    return VOCALFOLDS


@pytest.fixture(scope="session")
def tiny_chain(tmp_path_factory):
    """`train all --preset tiny` on a 24-image phantom at 64 px: (data, bundle, stage reports + [the
    stages that reported progress]).

    Shared by the generation and retrieval tests (the chain takes ~30 s on one thread)."""
    from generation.phantom import write_phantom_dataset
    from training.train_all import train_all

    root = tmp_path_factory.mktemp("chain")
    data = root / "phantom"
    write_phantom_dataset(data, 24, 64, 0)
    seen: list[str] = []  # the stages that reported progress (what drives the CLI's bars)
    reports = train_all(data, root / "bundle", "tiny", device="cpu", log=lambda message: None,
                        progress=lambda stage, done, total: seen.append(stage) if stage not in seen else None)
    reports.append(seen)
    return data, root / "bundle", reports
