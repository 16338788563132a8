#!/usr/bin/env bash
# Install OpenNMT-py 3.5.1 into its own venv (runs/bench/onmt-venv) for the side-by-side benchmark.
# It is never an nmtkit dependency. OpenNMT-py 3.5.1 pins torch<2.3; we install torch 2.13.0 (CPU)
# first and OpenNMT-py with --no-deps, then only the packages its train/translate imports need.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ONMT_VENV:-runs/bench/onmt-venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
    python -m pip install -q torch==2.13.0
fi
python -m pip install -q --no-deps "OpenNMT-py==3.5.1"
# import-time dependencies of onmt_train / onmt_translate (the rest of its pins are unused here)
python -m pip install -q configargparse pyyaml sacrebleu sentencepiece numpy six rapidfuzz \
    pyahocorasick pyonmttok "ctranslate2>=4,<5" waitress flask tensorboard
# spacy and fasttext are imported only by transforms we do not use; stub them if they are missing
SITE=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
for mod in spacy fasttext; do
    python -c "import $mod" 2>/dev/null || echo "# stub: not needed for the benchmark" > "$SITE/$mod.py"
done
python -c "import torch, onmt; print('OpenNMT-py', onmt.__version__, 'torch', torch.__version__)"
