#!/usr/bin/env bash
# nmtkit on a CUDA GPU: the whole test suite (tests/test_cuda.py runs only where there is a GPU),
# training throughput of the reference model (fp32, bf16; 200 steps) and the quickstart recipe
# end to end (train on the GPU, translate test2016 with beam 5 on the CPU, sacreBLEU).
#
#   bash bench/gpu_check.sh [OUT_DIR]          (GPU_CHECK_TESTS=0: skip the test suite)
#
# Runs with the python3 that has torch with CUDA (no set-up: the packages nmtkit imports must be
# there). Data: $NMTKIT_DATA_MIRROR (a copy of ../shared/data) or ../shared/data beside the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu}
DATA=${NMTKIT_DATA_MIRROR:-$(cd .. && pwd)/shared/data}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 NMTKIT_DATA_MIRROR=$DATA
mkdir -p "$OUT"
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    || { echo "no CUDA GPU visible to torch" >&2; exit 1; }

if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
    echo "=== test suite"
    workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))")
    python3 -m pytest -q -rfE "${workers[@]}" -p no:cacheprovider tests > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|[0-9]+ (passed|failed)" "$OUT/pytest.log" | tail -20
fi

echo "=== reference model (bench/README.md), 200 steps, target tokens/s over steps 21-200"
R=$OUT/ref; mkdir -p "$R/raw"
for s in train val test; do
    ln -sf "$DATA/wmt14-toy/src-$s.txt" "$R/raw/$s.en"; ln -sf "$DATA/wmt14-toy/tgt-$s.txt" "$R/raw/$s.de"
done
head -500 "$R/raw/val.en" > "$R/raw/val500.en"; head -500 "$R/raw/val.de" > "$R/raw/val500.de"
[ -f "$R/data/manifest.json" ] || python3 -m nmtkit preprocess --src en --tgt de --train "$R/raw/train" \
    --valid "$R/raw/val500" --model-type word --vocab-size 10000 --separate --out "$R/data" > /dev/null
for P in fp32 bf16; do
    start=$(date +%s%N); rm -rf "$R/m-$P"
    python3 -m nmtkit train "$R/data" --save "$R/m-$P" --encoder birnn --decoder luong --attention luong-general \
        --window global --rnn lstm --layers 2 --hidden-size 512 --embed-size 512 --dropout 0.3 --input-feed \
        --bridge last --optimizer adam --lr 0.001 --batch-tokens 1000000 --batch-sents 64 --max-steps 200 \
        --epochs 1000 --no-valid-bleu --precision "$P" --set train.log_every=10 > "$R/log-$P" 2>&1
    echo "train $P rc=$? wall $(ms "$start") ms"
    python3 - "$R/m-$P/metrics.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
windows = [r for r in rows if r.get("event") == "train" and 20 < r["step"] <= 200]
print(f"  {sum(r['tokens'] for r in windows) / sum(r['seconds'] for r in windows):.0f} target tokens/s "
      f"(median of {len(windows)} 10-step windows: {statistics.median(r['tokens'] / r['seconds'] for r in windows):.0f})")
PY
done

echo "=== quickstart recipe: train on the GPU, translate on the CPU"
Q=$OUT/quickstart
python3 data/multi30k.py "$Q/raw" > /dev/null
python3 -m nmtkit preprocess --src en --tgt de --train "$Q/raw/train" --valid "$Q/raw/val" \
    --test "$Q/raw/test_2016_flickr" --vocab-size 8000 --out "$Q/data" --force > /dev/null
zcat "$Q/raw/test_2016_flickr.en.gz" > "$Q/test.en"; zcat "$Q/raw/test_2016_flickr.de.gz" > "$Q/test.de"
start=$(date +%s%N); rm -rf "$Q/model"
python3 -m nmtkit train "$Q/data" --recipe recipes/quickstart/multi30k-en-de.yaml --save "$Q/model" > "$Q/train.log" 2>&1
echo "train rc=$? wall $(ms "$start") ms"; grep -E "done|interrupted" "$Q/train.log"
start=$(date +%s%N)
python3 -m nmtkit translate -m "$Q/model/best.pt" --beam 5 < "$Q/test.en" > "$Q/test.hyp.de"
echo "translate rc=$? wall $(ms "$start") ms"
python3 -m nmtkit score --ref "$Q/test.de" "$Q/test.hyp.de" | head -1
