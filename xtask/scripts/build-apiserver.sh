#!/usr/bin/env bash
# Builds kube-apiserver v1.20.2 from Debian's `kubernetes` source package and
# caches it. Called by `cargo xtask controlplane up` when the cache is empty.
# Usage: build-apiserver.sh <cache-dir>   (result: <cache-dir>/kube-apiserver)
set -euo pipefail
cache=${1:?usage: build-apiserver.sh <cache-dir>}
mkdir -p "$cache"
if [ -x "$cache/kube-apiserver" ]; then exit 0; fi

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
apt-get install -y -qq golang-go rsync make golang-github-modern-go-reflect2-dev \
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
step "building kube-apiserver (about 4 minutes on 2 cores)"
make WHAT=cmd/kube-apiserver
install -m 0755 _output/bin/kube-apiserver "$cache/kube-apiserver.tmp"
mv "$cache/kube-apiserver.tmp" "$cache/kube-apiserver"
step "cached $cache/kube-apiserver"
