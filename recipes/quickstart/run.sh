#!/usr/bin/env bash
# Quickstart, end to end: set up (if needed), prepare Multi30k en->de, preprocess, train,
# translate test2016 with beam search, print sacreBLEU. Usage: bash recipes/quickstart/run.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${1:-runs/quickstart}
bash scripts/setup.sh
. .venv/bin/activate
start=$(date +%s)
python data/multi30k.py "$RUN/raw"
nmtkit preprocess --src en --tgt de --train "$RUN/raw/train" --valid "$RUN/raw/val" \
    --test "$RUN/raw/test_2016_flickr" --vocab-size 8000 --out "$RUN/data" --force
nmtkit train "$RUN/data" --recipe recipes/quickstart/multi30k-en-de.yaml --save "$RUN/model" \
    $( [ -f "$RUN/model/last.pt" ] && echo --resume )
zcat "$RUN/raw/test_2016_flickr.en.gz" > "$RUN/test.en"
zcat "$RUN/raw/test_2016_flickr.de.gz" > "$RUN/test.de"
nmtkit translate -m "$RUN/model/best.pt" --beam 5 < "$RUN/test.en" > "$RUN/test.hyp.de"
nmtkit score --ref "$RUN/test.de" "$RUN/test.hyp.de" | tee "$RUN/test.score"
echo "quickstart: $(( $(date +%s) - start )) s after set-up; model in $RUN/model, scores in $RUN/test.score" >&2
