#!/bin/sh
# Devcontainer Feature: install the wsagent binary at /usr/local/bin/wsagent and its
# default config (images/base/config.toml) at /etc/wsagent/config.toml, adapted to the
# user wsagent will run as. Runs as root at image build time, in the Feature's directory.
# POSIX sh: envbuilder runs `./install.sh` directly, and not every image has bash.
#
# The Feature spec passes the options as upper-cased variables (USERNAME, BINARYURL) and
# the users as _CONTAINER_USER / _REMOTE_USER. Nothing here starts wsagent: the
# container's init command does (see README.md).
set -eu

die() {
  echo "wsagent feature: $*" >&2
  exit 1
}

HERE=$(cd "$(dirname "$0")" && pwd)
# Only for tests (integration/tests/it/template.rs): install under this scratch root.
ROOT=${WSAGENT_FEATURE_DESTDIR:-}
BIN=$ROOT/usr/local/bin/wsagent
ETC=$ROOT/etc/wsagent
RUN_AS=${USERNAME:-${_CONTAINER_USER:-${_REMOTE_USER:-root}}}
RUN_AS=${RUN_AS:-root}
getent passwd "$RUN_AS" >/dev/null || die "no user $RUN_AS in this image"
HOME_DIR=$(getent passwd "$RUN_AS" | cut -d: -f6)
[ -n "$HOME_DIR" ] || die "user $RUN_AS has no home directory"

# The binary: packaged next to this script, else downloaded.
mkdir -p "$(dirname "$BIN")"
if [ -f "$HERE/wsagent" ]; then
  install -m 0755 "$HERE/wsagent" "$BIN"
elif [ -n "${BINARYURL:-}" ]; then
  tmp=$(mktemp)
  if command -v curl >/dev/null; then
    curl -fsSL -o "$tmp" "$BINARYURL"
  elif command -v wget >/dev/null; then
    wget -qO "$tmp" "$BINARYURL"
  else
    die "binaryUrl is set but neither curl nor wget is installed"
  fi
  install -m 0755 "$tmp" "$BIN"
  rm -f "$tmp"
else
  die "no wsagent binary next to install.sh and no binaryUrl option"
fi
"$BIN" --version >/dev/null || die "$BIN does not run here"

# The config: images/base/config.toml, packaged next to this script as config.toml.
[ -f "$HERE/config.toml" ] || die "config.toml (images/base/config.toml) is not packaged next to install.sh"
mkdir -p "$ETC"
# wsagent runs as $RUN_AS itself (envbuilder drops to the devcontainer's user before it
# execs the init command), so it never switches users: the base config's `user = "coder"`
# lines go, and its paths and names become $RUN_AS's. dockerd is turned off (it needs root,
# and a devcontainer that wants Docker has its own way) and nothing waits for it. Not root: the socket cannot go to
# /run/wsagent, so it goes to the state dir.
socket=/run/wsagent/wsagent.sock
[ "$RUN_AS" = root ] || socket=$HOME_DIR/.local/state/wsagent/wsagent.sock
{
  echo "# Installed by the wsagent devcontainer Feature for user $RUN_AS (home $HOME_DIR),"
  echo "# from images/base/config.toml (its comments speak of root and /home/coder)."
  sed -e "s|/run/wsagent/wsagent.sock|$socket|g" \
    -e "s|/home/coder|$HOME_DIR|g" \
    -e "s|^api_user = \"coder\"|api_user = \"$RUN_AS\"|" \
    -e "s|USER = \"coder\"|USER = \"$RUN_AS\"|g" \
    -e '/^user = "coder"$/d' \
    -e 's|^\[services.coder-agent\]$|[services.coder-agent]\ndepends_on = []|' \
    "$HERE/config.toml"
  printf '\n[services.dockerd]\nenabled = false\n\n[services.code-server]\ndepends_on = []\n'
} >"$ETC/config.toml.new"
mv "$ETC/config.toml.new" "$ETC/config.toml"
echo "wsagent feature: installed $BIN and $ETC/config.toml for $RUN_AS"
