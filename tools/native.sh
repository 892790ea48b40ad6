#!/usr/bin/env bash
# Builds the project's one userspace C library (lb/native.c: whole Maglev
# tables and the pre-filter's bit counting), which lb/native.py opens
# through cffi.
# Usage: tools/native.sh [output.so]   (default: beside its source)
# Used by tools/setup.sh, deploy/Dockerfile and tools/cluster/images.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$repo/lb/native.c"
hash_h="$repo/bpf/lib/filter_hash.h"
out="${1:-$repo/lb/libnative.so}"
if [ -f "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$hash_h" ] \
        && [ "$out" -nt "${BASH_SOURCE[0]}" ]; then
    exit 0
fi
cc=${CC:-$(command -v cc || command -v clang)}
"$cc" -O2 -Wall -Wextra -Werror -shared -fPIC -o "$out.tmp" "$src"
mv "$out.tmp" "$out"
