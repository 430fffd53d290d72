#!/usr/bin/env bash
# Rewrite constraints.txt from what .venv holds now. Run it after the full suite passed on the versions you
# want to pin, typically the newest: ORPO_DIST_LATEST=1 bash scripts/test.sh && bash scripts/refresh_constraints.sh
# (torch stays out: scripts/setup.sh pins it through TORCH_SPEC.)
set -euo pipefail
cd "$(dirname "$0")/.."
{
  sed -n '/^#/p' constraints.txt
  .venv/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|orpo-dist)=='
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pins from .venv"
