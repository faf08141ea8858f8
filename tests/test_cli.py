"""The command line as a user meets it: one application, two entry points, clean failures."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_console_script_is_the_same_application():
    script = shutil.which("sketch2medi", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("package not installed with its console script")
    installed = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert installed.returncode == 0
    # Identical help apart from the program name in the usage line.
    assert installed.stdout.split("\n")[2:] == run("--help").stdout.split("\n")[2:]
    assert "phantom" in installed.stdout and "freehand" in installed.stdout


def test_phantom_then_freehand_sketches_from_its_masks(tmp_path):
    assert run("phantom", str(tmp_path / "ph"), "--n", "3", "--size", "64", "--seed", "2").returncode == 0
    result = run("freehand", str(tmp_path / "ph"), "--out", str(tmp_path / "sk"), "--strength", "0.5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    sketches = sorted((tmp_path / "sk").glob("*.png"))
    assert [p.name for p in sketches] == sorted(p.name for p in (tmp_path / "ph" / "masks").glob("*.png"))
    sketch = np.asarray(Image.open(sketches[0]))
    assert sketch.shape == (64, 64) and (sketch < 128).any() and (sketch == 255).mean() > 0.8


@pytest.mark.parametrize(
    "args, message",
    [
        (["freehand", "/no/such/masks", "--out", "/tmp/x"], "no such"),
        (["normalize", "/no/such/sketch.png", "--out", "/tmp/x.png"], "no such file"),
    ],
)
def test_wrong_paths_exit_2_with_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
