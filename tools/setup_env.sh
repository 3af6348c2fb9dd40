#!/usr/bin/env bash
# Create .venv (if missing) and install covenant with its dev extra, fast and reproducibly.
#
# * uv when it can be had (seconds), else plain pip (about two minutes): both honour
#   constraints.txt, the lock that makes a fresh install resolve the same way every time.
# * uv ignores pip's configuration, so the local wheel folder that pip's config names
#   (find-links: where the CPU build of torch lies on machines without a GPU) is passed to it.
# * Idempotent: a stamp records the hash of pyproject.toml + constraints.txt; nothing is
#   reinstalled while they are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}
stamp="$VENV/.covenant-installed"
want=$(cat pyproject.toml constraints.txt 2>/dev/null | sha256sum | cut -d' ' -f1)-$EXTRAS

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/covenant" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi

# pip's own config may name a local wheel folder (find-links) and extra local indexes.
find_links=$("$PYTHON" -m pip config list 2>/dev/null \
  | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | head -n1 || true)
constraints=()
[ -f constraints.txt ] && constraints=(-c constraints.txt)

uv_cmd=()
if command -v uv >/dev/null 2>&1; then
  uv_cmd=(uv)
else
  # a venv made by uv has no pip; ensurepip brings it back for the fallback path
  "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$VENV/bin/python" -m ensurepip -q >/dev/null 2>&1 || true
  if "$VENV/bin/python" -m pip install -q --disable-pip-version-check uv >/dev/null 2>&1; then
    uv_cmd=("$VENV/bin/python" -m uv)
  fi
fi

if [ ${#uv_cmd[@]} -gt 0 ]; then
  uv_args=()
  [ -n "$find_links" ] && uv_args+=(--find-links "$find_links")
  echo "setup: installing with uv${find_links:+ (find-links $find_links)}" >&2
  # --compile-bytecode: uv does not write .pyc files by default, and where the environment sets
  # PYTHONDONTWRITEBYTECODE (CI images do) every process would then compile megatron and torch
  # from source at each start (minutes for a swarm of fresh processes on 2 cores).
  "${uv_cmd[@]}" pip install -q --compile-bytecode -p "$VENV/bin/python" "${uv_args[@]}" \
    "${constraints[@]}" -e ".[$EXTRAS]"
else
  echo "setup: uv unavailable, installing with pip (slower)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${constraints[@]}" -e ".[$EXTRAS]"
fi
# a .venv set up before bytecode was compiled at install time: compile it once now
"$VENV/bin/python" -m compileall -q -j 0 "$VENV/lib" >/dev/null 2>&1 || true
echo "$want" > "$stamp"
