# Sourced by the other .ci scripts: repo root, step headers, and the Rust toolchain on PATH.
# (Executable only so that every file here is; running it does nothing.)

# The oldest toolchain the workspace builds with (rust-version in Cargo.toml).
CI_MIN_RUST=1.85

ci_root() {
    cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd
}

ci_header() {
    printf '\n==> %s\n' "$*"
}

# version_ge A B: true when version A >= version B (A and B like 1.85.0).
version_ge() {
    printf '%s\n%s\n' "$2" "$1" | sort -V -C
}

# cargo_version [CARGO]: prints the version of that cargo (1.95.0), fails when there is none.
cargo_version() {
    local out
    out=$("${1:-cargo}" --version 2>/dev/null) || return 1
    out=${out#cargo }
    printf '%s\n' "${out%% *}"
}

# cargo_recent_enough [CARGO]: true when that cargo exists and is at least CI_MIN_RUST.
cargo_recent_enough() {
    local v
    v=$(cargo_version "${1:-cargo}") || return 1
    version_ge "$v" "$CI_MIN_RUST"
}

# Puts a recent enough cargo first on PATH: rustup's (sudo drops ~/.cargo/bin from PATH), else
# Debian's cargo-web in /usr/bin. Harmless when PATH is already right.
ci_use_toolchain() {
    local dir
    for dir in ${CARGO_HOME:+"$CARGO_HOME/bin"} "${HOME:-/root}/.cargo/bin" /root/.cargo/bin /usr/bin; do
        if [ -x "$dir/cargo" ] && cargo_recent_enough "$dir/cargo"; then
            case ":$PATH:" in
                ":$dir:"*) ;;
                *) PATH="$dir:$PATH" ;;
            esac
            export PATH
            return 0
        fi
    done
    # Whatever cargo is on PATH (it may be recent enough without living in a usual place).
    cargo_recent_enough cargo
}

# Like ci_use_toolchain, but exits with a message when there is no such cargo.
ci_require_toolchain() {
    if ! ci_use_toolchain; then
        echo "no cargo >= $CI_MIN_RUST on PATH (found: $(cargo_version cargo || echo none)); run .ci/setup as root" >&2
        exit 1
    fi
}

export DEBIAN_FRONTEND=noninteractive
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
