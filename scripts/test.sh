#!/usr/bin/env bash
# Install autoprune with its test extras into the active Python environment and run the tests.
# Used verbatim by README.md and .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q -c constraints.txt -e '.[cpu,test]'
python -m pytest -q "$@"
