#!/usr/bin/env bash
# The whole training chain on one GPU: `train all --preset gpu`, pix2pix on the same pairs, then
# `evaluate`, the refinement report and the W-space ceiling, with every log and figure in $OUT.
#
#   bench/gpu_chain.sh pack [DATA]    # here: DATA (default ../shared/data/vocalfolds256) -> .carry/vocalfolds256
#   OUT=DIR bench/gpu_chain.sh run    # on the GPU machine, from the repository root
#
# `pack` stores the images as lossless WebP (pixel-identical, checked; 52.7 MiB for vocalfolds256
# against 67 MiB of PNGs) and refuses a pack over 64 MiB. `run` decodes them back to PNG under
# runs/gpu-chain/, trains into runs/gpu-chain/bundle (re-running resumes the unfinished stage),
# and writes to $OUT, as each step ends: gpu.txt (the device), times.txt (each step's wall time),
# and the logs train_all.log (each stage's minutes), pix2pix.log, evaluate.log (the tables),
# ceiling.log (the ceiling beside E alone and E + H); at the end results.tar.gz holds the JSON
# reports, bundle.json, the metrics files and each stage's last sample grid.
# STAGES (default "train pix2pix evaluate ceiling") picks the steps.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PACK=.carry/vocalfolds256
LIMIT_MIB=64

pack() {
    local data="${1:-../shared/data/vocalfolds256}"
    rm -rf "$PACK"
    python - "$data" "$PACK" <<'EOF'
import shutil, sys
from pathlib import Path

import numpy as np
from PIL import Image

source, pack = Path(sys.argv[1]), Path(sys.argv[2])
if not (source / "images").is_dir():
    sys.exit(f"error: {source} has no images/ folder; pass the dataset folder to pack")
(pack / "images").mkdir(parents=True)
for name in ("masks",):
    if (source / name).is_dir():
        shutil.copytree(source / name, pack / name)
for name in ("split.csv", "classes.json", "README.md", "LICENSE"):
    if (source / name).is_file():
        shutil.copy2(source / name, pack / name)
for path in sorted((source / "images").iterdir()):
    pixels = np.asarray(Image.open(path).convert("RGB"))
    target = pack / "images" / (path.name + ".webp")  # the original name stays inside, for unpacking
    Image.fromarray(pixels).save(target, "WEBP", lossless=True, method=6)
    if not np.array_equal(np.asarray(Image.open(target).convert("RGB")), pixels):
        sys.exit(f"error: {path.name} did not survive lossless WebP")
EOF
    local mib
    mib=$(du -sb "$PACK" | awk '{printf "%.1f", $1 / 1048576}')
    if awk -v m="$mib" -v l="$LIMIT_MIB" 'BEGIN { exit !(m > l) }'; then
        echo "error: the pack is $mib MiB, over $LIMIT_MIB MiB" >&2
        exit 1
    fi
    echo "packed $(ls "$PACK/images" | wc -l) images into $PACK ($mib MiB)"
}

run() {
    : "${OUT:?set OUT to the folder the figures and logs go to}"
    [ -d "$PACK/images" ] || { echo "error: no $PACK; run 'bench/gpu_chain.sh pack' first" >&2; exit 1; }
    local work=runs/gpu-chain data=runs/gpu-chain/vocalfolds256 bundle=runs/gpu-chain/bundle
    local stages="${STAGES:-train pix2pix evaluate ceiling}"
    mkdir -p "$OUT" "$work/report"
    { nvidia-smi || true; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"; } > "$OUT/gpu.txt" 2>&1
    if [ ! -f "$data/split.csv" ]; then  # decode the pack back to the dataset's PNGs, once
        python - "$PACK" "$data" <<'EOF'
import shutil, sys
from pathlib import Path

from PIL import Image

pack, data = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(pack, data, ignore=shutil.ignore_patterns("images"))
(data / "images").mkdir()
for path in sorted((pack / "images").glob("*.webp")):
    Image.open(path).convert("RGB").save(data / "images" / path.stem)
EOF
    fi
    timed() {  # NAME COMMAND...: the command's output in $OUT/NAME.log and its wall time appended to $OUT/times.txt
        local name=$1 start
        shift
        start=$(date +%s)
        "$@" 2>&1 | tee "$OUT/$name.log"
        echo "$name $(( $(date +%s) - start )) s" | tee -a "$OUT/times.txt"
    }
    for stage in $stages; do
        case $stage in
            train) timed train_all python cli.py train all --data "$data" --out "$bundle" --preset gpu --device cuda ;;
            pix2pix) timed pix2pix python cli.py train pix2pix --data "$data" --bundle "$bundle" --preset paper --batch 32 --steps 3000 --device cuda --resume ;;
            evaluate) timed evaluate python cli.py evaluate --data "$data" --split test --bundle "$bundle" --strengths 0,0.5,1 --device cuda --out "$work/report/evaluate.json" ;;
            ceiling) timed ceiling python -m training.invert --bundle "$bundle" --data "$data" --split test --steps 300 --space w,w+ --batch 44 --device cuda --json "$work/report/ceiling.json" ;;
            *) echo "error: unknown stage $stage (train, pix2pix, evaluate, ceiling)" >&2; exit 2 ;;
        esac
    done
    cp "$bundle/bundle.json" "$bundle"/*_metrics.jsonl "$work/report/" 2>/dev/null || true
    for pattern in "kimg*" "encoder-*" "refiner-*"; do  # the last sample grid of G, E and H
        last=$(find "$bundle/samples" -name "$pattern.png" 2>/dev/null | sort | tail -n 1)
        if [ -n "$last" ]; then cp "$last" "$work/report/"; fi
    done
    tar czf "$OUT/results.tar.gz" -C "$work" report
}

case "${1:-}" in
    pack) shift; pack "$@" ;;
    run) run ;;
    *) echo "usage: bench/gpu_chain.sh pack [DATA] | OUT=DIR bench/gpu_chain.sh run" >&2; exit 2 ;;
esac
