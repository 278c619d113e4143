#!/usr/bin/env bash
# The newcomer path, checked: clone this repository into an empty folder and run the README's
# quick-start commands exactly as written there (the bash block between the quick-start
# markers), with nothing from this machine's checkout: a new .venv, and an empty CAPS cache
# (tiny model, router tables). ../shared is linked beside the clone when present, as CI has it.
# `--list` only prints the commands of this checkout's README.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)

quick_start() {  # the commands of the bash block between the markers, comments stripped
  awk '/<!-- quick-start:begin -->/{on=1; next} /<!-- quick-start:end -->/{on=0} on' "$1" \
    | awk '/^```bash/{in_block=1; next} /^```/{in_block=0} in_block' | sed -e 's/[[:space:]]*#.*$//' -e '/^[[:space:]]*$/d'
}
if [ "${1:-}" = --list ]; then quick_start "$repo/README.md"; exit 0; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/caps-vllm-fresh.XXXXXX")
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/caps-vllm"
if [ -d "$repo/../shared" ]; then ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"; fi

commands=$(quick_start "$work/caps-vllm/README.md")
n=$(printf '%s\n' "$commands" | grep -c . || true)
if [ "$n" != 2 ]; then
  echo "fresh-clone check: the README's quick start must hold exactly two commands, found $n:" >&2
  printf '%s\n' "$commands" >&2
  exit 1
fi

export CAPS_VLLM_CACHE="$work/cache"
cd "$work/caps-vllm"
while IFS= read -r cmd; do
  echo "fresh-clone check: \$ $cmd" >&2
  bash -c "$cmd" < /dev/null
done <<< "$commands"
echo "fresh-clone check: both README commands passed in a fresh clone" >&2
