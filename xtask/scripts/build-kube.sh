#!/usr/bin/env bash
# Builds Kubernetes v1.20.2 components from Debian's `kubernetes` source package
# and caches them. Called by `cargo xtask controlplane up` (kube-apiserver) and
# `cargo xtask cluster up` (the node's components and the pause image's binary)
# when the cache lacks one of them.
# Usage: build-kube.sh <cache-dir> <name>...
#   names: kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause
#   (results: <cache-dir>/<name>; pause is Kubernetes' own build/pause/linux/pause.c, static)
set -euo pipefail
cache=${1:?usage: build-kube.sh <cache-dir> <name>...}
shift
mkdir -p "$cache"
missing=()
for name in "$@"; do
  [ -x "$cache/$name" ] || missing+=("$name")
done
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi

step() { echo "==> $*" >&2; }
export DEBIAN_FRONTEND=noninteractive

if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/; then
  step "enabling Debian source packages"
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    > /etc/apt/sources.list.d/supermesh-src.sources
fi
step "apt-get update"
apt-get update -qq
step "installing the Go toolchain and build tools"
apt-get install -y -qq golang-go rsync make gcc libc6-dev golang-github-modern-go-reflect2-dev \
  golang-github-json-iterator-go-dev >/dev/null

work=$(mktemp -d "${TMPDIR:-/tmp}/supermesh-k8s-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
cd "$work"
step "downloading the kubernetes source package"
apt-get source --download-only kubernetes >/dev/null 2>&1 || apt-get source --download-only kubernetes
orig=$(ls kubernetes_*.orig.tar.gz | head -n1)
step "unpacking $orig"
tar xzf "$orig"
src=$(find . -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
cd "$src"

# Go 1.19 + the vendored reflect2 1.0.1 crashes the apiserver (SIGSEGV in
# mapiterinit) on the first custom-resource update: use Debian's newer copies.
step "patching vendored reflect2 and json-iterator"
for pkg in github.com/modern-go/reflect2 github.com/json-iterator/go; do
  rm -rf "vendor/$pkg"
  cp -r "/usr/share/gocode/src/$pkg" "vendor/$pkg"
done

export GOPATH=$PWD/.go CGO_ENABLED=0 HOME=$work/home
mkdir -p "$HOME" .go/src/k8s.io
ln -s ../../.. .go/src/k8s.io/kubernetes

what=()
for name in "${missing[@]}"; do
  case "$name" in
    pause) ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy) what+=("cmd/$name") ;;
    *) echo "unknown component $name" >&2; exit 2 ;;
  esac
done
if [ ${#what[@]} -gt 0 ]; then
  step "building ${what[*]} (about 4 minutes per component on 2 cores)"
  make WHAT="${what[*]}"
fi
for name in "${missing[@]}"; do
  if [ "$name" = pause ]; then
    gcc -Os -static -o _output/pause build/pause/linux/pause.c
    built=_output/pause
  else
    built=_output/bin/$name
  fi
  install -m 0755 "$built" "$cache/$name.tmp"
  mv "$cache/$name.tmp" "$cache/$name"
  step "cached $cache/$name"
done
