#!/usr/bin/env bash
# Make a real redis-server available for the optional shared cache tier and its tests, without
# installing anything system-wide: Debian's packages are downloaded (`apt-get download`, no root
# needed while the package lists are present) and unpacked with `dpkg -x` under the git-ignored
# .cache/redis/. A redis-server already on PATH is used as it is.
#
# Result (ignored by git):
#   .cache/redis/bin/redis-server   runs the server (a wrapper, or a link to the system one)
#   .cache/redis/bin/redis-cli      the client, when it comes from the same place
#   .cache/redis/root/              the unpacked packages (with the libraries they need)
#
# Idempotent: a second run checks that the server starts (`--version`) and returns at once.
# Needs the network on the first run only (deb.debian.org), and root only when apt's package
# lists are missing (a fresh image): then it runs `apt-get update` first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/redis"
BIN="$DEST/bin"
# The packages holding the server, and the libraries it links that a slim image may lack.
PACKAGES=(redis-tools redis-server)
LIBRARIES=(libjemalloc2 liblzf1 libatomic1)

say() { echo "fetch_redis.sh: $*" >&2; }
fail() { say "error: $*"; exit 1; }

works() { [[ -x "$BIN/redis-server" ]] && "$BIN/redis-server" --version >/dev/null 2>&1; }

version() { "$BIN/redis-server" --version | grep -o 'v=[0-9.]*' | cut -c3-; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

if works; then
    exit 0
fi

system_server="$(command -v redis-server || true)"
if [[ -n "$system_server" && "$system_server" != "$BIN/redis-server" ]]; then
    rm -rf "$DEST"
    mkdir -p "$BIN"
    ln -s "$system_server" "$BIN/redis-server"
    system_cli="$(command -v redis-cli || true)"
    [[ -n "$system_cli" ]] && ln -s "$system_cli" "$BIN/redis-cli"
    if works; then
        say "using the system redis-server: $system_server ($(version))"
        exit 0
    fi
    say "the system redis-server ($system_server) does not run; fetching Debian's instead"
    rm -rf "$DEST"
fi

command -v apt-get >/dev/null && command -v dpkg >/dev/null \
    || fail "no redis-server on PATH and no apt-get/dpkg to fetch one; install Redis >= 6 yourself"

wanted=("${PACKAGES[@]}")
for lib in "${LIBRARIES[@]}"; do
    installed "$lib" || wanted+=("$lib")
done

# Download and unpack into a temporary sibling, then swap it in, so an interrupted run never
# leaves a half-made tree that looks complete.
tmp="$DEST.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp/debs" "$tmp/root" "$tmp/bin"

apt_opts=(-qq)
# As root apt drops to the _apt user, which cannot write here; stay root instead (no warning).
[[ $(id -u) -eq 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
download() { (cd "$tmp/debs" && apt-get "${apt_opts[@]}" download "${wanted[@]}") >/dev/null 2>"$tmp/apt.log"; }

say "downloading ${wanted[*]} (Debian packages, ~1 MB)"
if ! download; then
    if [[ $(id -u) -eq 0 ]]; then
        say "apt-get download failed; refreshing the package lists (apt-get update) and trying again"
        apt-get -qq update >/dev/null 2>>"$tmp/apt.log" || true
        download || { cat "$tmp/apt.log" >&2; fail "apt-get download ${wanted[*]} failed"; }
    else
        cat "$tmp/apt.log" >&2
        fail "apt-get download ${wanted[*]} failed; the package lists may be missing: run 'sudo apt-get update' once"
    fi
fi
for deb in "$tmp"/debs/*.deb; do
    dpkg -x "$deb" "$tmp/root"
done

# Debian's redis-server is a link to redis-check-rdb: one binary that picks its role from the name
# it is run by, so the wrapper runs it under the name redis-server.
server="$(readlink -f "$tmp/root/usr/bin/redis-server" || true)"
[[ -f "$server" && -x "$server" ]] || fail "the downloaded packages hold no usr/bin/redis-server"
libs="$(find "$tmp/root" -name '*.so*' -printf '%h\n' | sort -u | paste -sd:)"

write_wrapper() {  # name, binary (relative to root/), argv0
    cat >"$tmp/bin/$1" <<EOF
#!/usr/bin/env bash
# Made by scripts/fetch_redis.sh: runs Debian's $1 unpacked beside this folder.
here="\$(dirname "\$(dirname "\$(readlink -f "\${BASH_SOURCE[0]}")")")"
export LD_LIBRARY_PATH="${libs//$tmp/\$here}\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec -a $3 "\$here/root/$2" "\$@"
EOF
    chmod +x "$tmp/bin/$1"
}
write_wrapper redis-server "${server#"$tmp/root/"}" redis-server
[[ -x "$tmp/root/usr/bin/redis-cli" ]] && write_wrapper redis-cli usr/bin/redis-cli redis-cli
rm -rf "$tmp/debs" "$tmp/apt.log"

rm -rf "$DEST"
mv "$tmp" "$DEST"
if ! works; then
    "$BIN/redis-server" --version >&2 || true
    fail "the unpacked redis-server does not run (a library missing? see above)"
fi
say "redis-server ready: $BIN/redis-server ($(version))"
