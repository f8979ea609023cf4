#!/bin/sh
# Fetches Debian's mimalloc source package into $1 (for a static link; Debian
# ships only libmimalloc.so). Needs a deb-src entry; adds one beside the
# existing deb entries when run as root.
set -e
dest=$1
[ -f "$dest/src/src/static.c" ] && exit 0
if ! apt-get source --print-uris mimalloc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && [ -f /etc/apt/sources.list.d/debian.sources ]; then
    sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources > /etc/apt/sources.list.d/debian-src.sources
    apt-get update -qq
  else
    echo "get_mimalloc: no deb-src entry for apt; add one (or run as root), then make again" >&2
    exit 1
  fi
fi
tmp=$(mktemp -d)
(cd "$tmp" && apt-get source -qq mimalloc >/dev/null 2>&1) || { echo "get_mimalloc: apt-get source mimalloc failed" >&2; exit 1; }
mkdir -p "$dest"
rm -rf "$dest/src"
mv "$tmp"/mimalloc-*/ "$dest/src"
rm -rf "$tmp"
