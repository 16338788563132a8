#!/usr/bin/env bash
# BLEU of reduced-precision paths against fp32 on Multi30k test2016 (en->de), one command:
#   bash bench/bleu_check.sh [RUN_DIR] [EPOCHS]
# Trains the quickstart recipe twice (fp32 and bf16 training, EPOCHS epochs each, default 2:
# a shorter run than the quickstart's 8, see bench/README.md), then translates test2016 with
# beam 5: the fp32-trained model with fp32, bf16 and int8 inference, the bf16-trained model with
# fp32 and bf16 inference; sacreBLEU for each. Existing models in RUN_DIR are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/m30k}
EPOCHS=${2:-2}
. .venv/bin/activate
if [ ! -f "$RUN/data/manifest.json" ]; then
    python data/multi30k.py "$RUN/raw"
    nmtkit preprocess --src en --tgt de --train "$RUN/raw/train" --valid "$RUN/raw/val" \
        --test "$RUN/raw/test_2016_flickr" --vocab-size 8000 --out "$RUN/data" --force
fi
zcat "$RUN/raw/test_2016_flickr.en.gz" > "$RUN/test.en"
zcat "$RUN/raw/test_2016_flickr.de.gz" > "$RUN/test.de"
for p in fp32 bf16; do
    [ -f "$RUN/$p/best.pt" ] || nmtkit train "$RUN/data" --recipe recipes/quickstart/multi30k-en-de.yaml \
        --save "$RUN/$p" --epochs "$EPOCHS" --precision "$p" --no-valid-bleu
done
row() {  # trained-with inference-flags...
    local trained=$1; shift
    local name="$trained-trained, inference $*"
    local out="$RUN/hyp.$trained.$(echo "$*" | tr -c 'a-z0-9' '_').de"
    local start=$(date +%s.%N)
    nmtkit translate -m "$RUN/$trained/best.pt" --beam 5 "$@" < "$RUN/test.en" > "$out"
    local secs=$(echo "$(date +%s.%N) - $start" | bc)
    local bleu=$(nmtkit score --ref "$RUN/test.de" --metrics bleu "$out" | cut -f1)
    echo "| $name | $bleu | $secs s |"
}
echo "| model, inference (beam 5, test2016, 1000 sentences) | sacreBLEU | wall |"
echo "|---|---|---|"
row fp32 --precision fp32
row fp32 --precision bf16
row fp32 --quantize int8
row bf16 --precision fp32
row bf16 --precision bf16
