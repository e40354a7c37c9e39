# Sourced by scripts/test and scripts/run: installs the server binaries the tests and examples
# start (Debian/Ubuntu via apt-get; elsewhere it names the packages and stops).
need_bin() { # binary, Debian package
  command -v "$1" >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/"$1" >/dev/null 2>&1 && return 0
  return 1
}

missing=()
need_bin redis-server || missing+=(redis-server)
need_bin redis-cli || missing+=(redis-tools)
need_bin initdb || missing+=(postgresql)
need_bin pg_basebackup || missing+=(postgresql)
need_bin psql || missing+=(postgresql-client)
need_bin nats-server || missing+=(nats-server)
# Headless Chromium loads the storefront's status page in its test.
need_bin chromium || missing+=(chromium)
if ((${#missing[@]})); then
  # shellcheck disable=SC2207
  missing=($(printf '%s\n' "${missing[@]}" | sort -u))
  if command -v apt-get >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "scripts/test: installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "scripts/test: please install: ${missing[*]} (Debian package names)" >&2
    exit 1
  fi
fi

