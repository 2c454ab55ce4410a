# Shared set-up for scripts/test and scripts/run: a virtualenv built from
# pyproject.toml, and the Debian packages the tests and the demo use.
# Sourced, not run. Safe to run again: it only installs what is missing.

CSNAP_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${CSNAP_VENV:-$CSNAP_ROOT/.venv}"

log() { printf '==> %s\n' "$*" >&2; }

find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    echo "csnap needs Python 3.11 or newer; none found on PATH" >&2
    return 1
}

# ensure_venv: create $VENV and install csnap with its test tools, unless an
# install newer than pyproject.toml is already there.
ensure_venv() {
    local stamp="$VENV/.csnap-installed"
    if [ -f "$stamp" ] && [ "$stamp" -nt "$CSNAP_ROOT/pyproject.toml" ]; then
        return 0
    fi
    local python
    python="$(find_python)"
    if [ ! -x "$VENV/bin/python" ]; then
        log "creating virtualenv $VENV with $python"
        "$python" -m venv "$VENV"
    fi
    log "installing csnap and its test tools into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$CSNAP_ROOT[test]"
    touch "$stamp"
}

# ensure_debian_packages PKG...: apt-get install the packages that are not
# installed yet (as root, or through sudo when it needs no password).
ensure_debian_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        log "missing Debian packages ${missing[*]} and no apt-get to install them"
        return 1
    fi
    local sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if sudo -n true 2>/dev/null; then sudo=(sudo -n); else
            log "missing Debian packages ${missing[*]}: install them as root"
            return 1
        fi
    fi
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >/dev/null 2>&1 || true
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
