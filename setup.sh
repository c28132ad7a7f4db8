#!/usr/bin/env bash
# Installs everything into .venv; on Debian also the offline Fashion-MNIST package.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  echo "installing Debian's dataset-fashion-mnist (real Fashion-MNIST, no download needed)"
  $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq dataset-fashion-mnist \
    || echo "could not install dataset-fashion-mnist: train.py will download Fashion-MNIST instead"
fi
python3 -m venv .venv
.venv/bin/pip install -q -r requirements.txt
echo "ready: .venv/bin/python train.py algo=fedavg"
