#!/usr/bin/env bash
# The classic Coder `shutdown_script` that wsagent replaces, as the baseline of the
# stop-save benchmark: for every git repository directly under ROOT, serially, with the
# git CLI: add everything, commit, put the token into the remote URL, push, put the old
# URL back. Usage: shutdown-loop.sh ROOT TOKEN
set -euo pipefail

root=$1
token=$2
for dir in "$root"/*/; do
  [ -d "$dir/.git" ] || continue
  cd "$dir"
  git add -A
  git commit -q -m "workspace stop: save work in progress" || true
  old=$(git remote get-url origin)
  git remote set-url origin "${old/http:\/\//http://x:$token@}"
  git push -q origin HEAD || echo "push failed in $dir" >&2
  git remote set-url origin "$old"
done
