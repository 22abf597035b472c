#!/usr/bin/env bash
# Set up the harness in ./.venv: system data packages (when root), Python packages, editable install.
# Safe to rerun; every step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")"

# chromium: the MLflow UI browser test; texlive: the tests that compile the LaTeX tables with pdflatex
DEBIAN_PACKAGES=(dataset-fashion-mnist gimp-data fonts-freefont-ttf chromium texlive-latex-base texlive-latex-recommended)
if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for p in "${DEBIAN_PACKAGES[@]}"; do  # a package removed but not purged is known to dpkg, not installed
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      echo "setup: installing Debian packages: ${missing[*]}"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
        || echo "setup: could not install ${missing[*]} (embedded suite: fallbacks; tests needing them skip)"
    else
      echo "setup: not root; skipping Debian packages ${missing[*]} (embedded suite: fallbacks; tests needing them skip)"
    fi
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import harness, torch, open_clip, mlflow, pytest, xdist, pytest_timeout, transformers, imagecorruptions, cmaes" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q -e '.[dev]'
fi
echo "setup: ready (.venv/bin/harness)"
