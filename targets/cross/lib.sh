# shellcheck shell=bash
# Shared by targets/build, targets/check-size and .ci/arm: the Debian cross toolchain (install) and
# the environment cargo needs per target triple (cross_env). Sourced, never run.
#
# Why Debian's toolchain and not rustup's: there are no rustup targets to download here, while
# Debian ships the standard library of each architecture as a package (libstd-rust-web-dev:arm64,
# :armhf) and the library's source (rust-web-src) for the musl targets, which we build with
# -Zbuild-std. The host build keeps rustup's cargo; only the cross builds use /usr/bin/cargo, and
# only through environment variables (no .cargo/config.toml: ordinary `cargo build` is unchanged).

CROSS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# The Rust series the cross builds use: the newest Debian version of it that exists for amd64
# (rustc-web, cargo-web, rust-web-src) AND for arm64 and armhf (libstd-rust-web-dev) is picked.
# 1.85 is the workspace's rust-version, so these builds also prove the MSRV, and OpenWrt 24.10's
# feed ships 1.85 too. VEN_RUST_VERSION=<exact Debian version> overrides the pick.
VEN_RUST_SERIES=${VEN_RUST_SERIES:-1.85}
CROSS_TARGET_DIR=${CROSS_TARGET_DIR:-$CROSS_ROOT/target/cross}
DIST_DIR=${DIST_DIR:-$CROSS_ROOT/target/dist}
RUSTLIB=/usr/lib/rustlib

# Every triple the build knows, in build order; the first three are the issue's, the musl ones
# are what the boards (OpenWrt) run.
CROSS_ALL_TRIPLES=(
    x86_64-unknown-linux-gnu
    aarch64-unknown-linux-gnu
    armv7-unknown-linux-gnueabihf
    aarch64-unknown-linux-musl
    armv7-unknown-linux-musleabihf
)

cross_log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
cross_die() { echo "error: $*" >&2; exit 1; }

cross_known_triple() {
    local t
    for t in "${CROSS_ALL_TRIPLES[@]}"; do [ "$t" = "$1" ] && return 0; done
    return 1
}

# Per-triple facts: Debian architecture, gcc cross prefix, qemu binary, musl or not.
cross_facts() {
    case $1 in
        x86_64-unknown-linux-gnu) DEB_ARCH=amd64 GCC_PREFIX="" QEMU="" LIBC=gnu ;;
        aarch64-unknown-linux-gnu) DEB_ARCH=arm64 GCC_PREFIX=aarch64-linux-gnu QEMU=qemu-aarch64-static LIBC=gnu ;;
        armv7-unknown-linux-gnueabihf) DEB_ARCH=armhf GCC_PREFIX=arm-linux-gnueabihf QEMU=qemu-arm-static LIBC=gnu ;;
        aarch64-unknown-linux-musl) DEB_ARCH=arm64 GCC_PREFIX=aarch64-linux-gnu QEMU=qemu-aarch64-static LIBC=musl MUSL_TRIPLET=aarch64-linux-musl ;;
        armv7-unknown-linux-musleabihf) DEB_ARCH=armhf GCC_PREFIX=arm-linux-gnueabihf QEMU=qemu-arm-static LIBC=musl MUSL_TRIPLET=arm-linux-musleabihf ;;
        *) cross_die "unknown target triple '$1' (known: ${CROSS_ALL_TRIPLES[*]})" ;;
    esac
}

# The triple of a board profile: its `board.target = ...` line.
cross_board_triple() {
    local conf=$CROSS_ROOT/board-configs/$1.conf triple
    [ -f "$conf" ] || cross_die "no board profile $conf (boards: $(cd "$CROSS_ROOT/board-configs" && ls ./*.conf | sed 's|^\./||; s|\.conf$||' | tr '\n' ' '))"
    triple=$(sed -n 's/^[[:space:]]*board\.target[[:space:]]*=[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$conf" | tail -n 1)
    [ -n "$triple" ] || cross_die "$conf has no board.target line"
    echo "$triple"
}

cross_installed() {
    local status
    status=$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) || return 1
    [ "$status" = "install ok installed" ]
}
cross_installed_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || true; }

CROSS_APT_UPDATED=0
cross_apt_update() {
    if [ "$CROSS_APT_UPDATED" -eq 0 ]; then
        cross_log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=600 update -q </dev/null >/dev/null
        CROSS_APT_UPDATED=1
    fi
}
cross_apt_install() {
    cross_log "apt-get install $*"
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends "$@" </dev/null
}

# Versions of a package (arch-qualified or not) in the apt indexes, one per line.
cross_versions() { apt-cache madison "$1" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -u; }

# Picks the Debian Rust version (see VEN_RUST_SERIES) and prints it.
cross_pick_rust_version() {
    if [ -n "${VEN_RUST_VERSION:-}" ]; then
        echo "$VEN_RUST_VERSION"
        return
    fi
    local candidates=() v best=""
    mapfile -t candidates < <(cross_versions libstd-rust-web-dev:arm64 | grep -F "$VEN_RUST_SERIES." || true)
    for v in "${candidates[@]}"; do
        case $v in "$VEN_RUST_SERIES".*) ;; *) continue ;; esac
        cross_versions libstd-rust-web-dev:armhf | grep -qxF "$v" || continue
        cross_versions rustc-web | grep -qxF "$v" || continue
        cross_versions cargo-web | grep -qxF "$v" || continue
        cross_versions rust-web-src | grep -qxF "$v" || continue
        if [ -z "$best" ] || dpkg --compare-versions "$v" gt "$best"; then best=$v; fi
    done
    [ -n "$best" ] || return 1
    echo "$best"
}

# Installs everything the cross builds and the qemu tests need; idempotent (does nothing when all
# of it is there). Root only.
cross_install() {
    local triples=("$@")
    [ "$(id -u)" -eq 0 ] || cross_die "installing the cross toolchain needs root (run as root)"
    local need_arm=0 need_musl=0 t
    for t in "${triples[@]}"; do
        cross_facts "$t"
        [ "$DEB_ARCH" != amd64 ] && need_arm=1
        [ "$LIBC" = musl ] && need_musl=1
    done

    # 1. Foreign architectures, so that apt knows the arm64/armhf packages (index only: nothing
    #    of those architectures is installed except musl-dev, which is Multi-Arch: same).
    local arch foreign
    foreign=$(dpkg --print-foreign-architectures)
    for arch in arm64 armhf; do
        if ! grep -qx "$arch" <<<"$foreign"; then
            cross_log "dpkg --add-architecture $arch"
            dpkg --add-architecture "$arch"
            CROSS_APT_UPDATED=0
            cross_apt_update
        fi
    done
    if [ -z "$(cross_versions libstd-rust-web-dev:arm64)" ] || [ -z "$(cross_versions rustc-web)" ]; then
        cross_apt_update
    fi

    # 2. The Rust toolchain, pinned: rustc-web, cargo-web, rust-web-src and the arm libstd must be
    #    one version. Debian's clippy/rustfmt, when present, follow the pin (they depend on it).
    local version
    version=$(cross_pick_rust_version) || {
        cross_apt_update
        version=$(cross_pick_rust_version) || cross_die "no Debian Rust $VEN_RUST_SERIES.x exists for amd64, arm64 and armhf in the apt indexes (apt-cache madison libstd-rust-web-dev:arm64)"
    }
    RUST_DEB_VERSION=$version
    local rust_pkgs=(rustc-web cargo-web libstd-rust-web-dev rust-web-src) p todo=()
    cross_installed rust-web-clippy && rust_pkgs+=(rust-web-clippy)
    cross_installed rustfmt-web && rust_pkgs+=(rustfmt-web)
    for p in "${rust_pkgs[@]}"; do
        if ! cross_installed "$p" || [ "$(cross_installed_version "$p")" != "$version" ]; then
            todo+=("$p=$version")
        fi
    done
    if [ "${#todo[@]}" -gt 0 ]; then
        cross_log "pinning Debian's Rust to $version (the newest $VEN_RUST_SERIES.x that exists for amd64, arm64 and armhf)"
        cross_apt_install --allow-downgrades "${todo[@]}"
    fi

    # 3. C cross compilers (linkers, and ring's C code), qemu-user, and what .ci/arm's smoke run
    #    uses: the agent's kernel tools (iptables, ipset, conntrack), ip netns, python3 for JSON.
    local tools=(gcc binutils libc6-dev file qemu-user-static ca-certificates
        iptables ipset conntrack iproute2 python3)
    if [ "$need_arm" -eq 1 ]; then
        tools+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross)
    fi
    [ "$need_musl" -eq 1 ] && tools+=(musl-dev:arm64 musl-dev:armhf)
    todo=()
    for p in "${tools[@]}"; do cross_installed "$p" || todo+=("$p"); done
    if [ "${#todo[@]}" -gt 0 ]; then
        cross_apt_update
        cross_apt_install "${todo[@]}"
    fi

    # 4. The standard library of each arm architecture, unpacked into the compiler's rustlib
    #    (installing libstd-rust-web-dev:arm64 itself would pull the whole arm64 libc in).
    [ "$need_arm" -eq 1 ] && for arch in arm64 armhf; do cross_install_libstd "$arch" "$version"; done

    # 5. The musl targets' self-contained link objects (see cross_install_musl).
    for t in "${triples[@]}"; do
        cross_facts "$t"
        [ "$LIBC" = musl ] && cross_install_musl "$t"
    done
    return 0
}

cross_install_libstd() {
    local arch=$1 version=$2 triple
    case $arch in arm64) triple=aarch64-unknown-linux-gnu ;; armhf) triple=armv7-unknown-linux-gnueabihf ;; esac
    local stamp=$RUSTLIB/$triple/ven-cross-version
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ] && compgen -G "$RUSTLIB/$triple/lib/libstd-*.rlib" >/dev/null; then
        return 0
    fi
    cross_log "unpacking libstd-rust-web-dev:$arch=$version into $RUSTLIB/$triple"
    local tmp
    tmp=$(mktemp -d)
    # apt-get download writes into the current directory; _apt cannot read a root-only mktemp dir.
    chmod 755 "$tmp"
    chown _apt "$tmp" 2>/dev/null || true
    (cd "$tmp" && apt-get download -q "libstd-rust-web-dev:$arch=$version" </dev/null >/dev/null 2>&1) \
        || { cross_apt_update; (cd "$tmp" && apt-get download -q "libstd-rust-web-dev:$arch=$version" </dev/null); }
    dpkg-deb -x "$tmp"/libstd-rust-web-dev_*_"$arch".deb "$tmp/root"
    [ -d "$tmp/root$RUSTLIB/$triple/lib" ] || cross_die "libstd-rust-web-dev:$arch has no $RUSTLIB/$triple/lib"
    rm -rf "${RUSTLIB:?}/$triple"
    cp -a "$tmp/root$RUSTLIB/$triple" "$RUSTLIB/$triple"
    echo "$version" >"$stamp"
    rm -rf "$tmp"
}

# rustc links a crt-static musl executable "self-contained": it takes crt1.o/rcrt1.o, crti.o,
# crtbegin*.o, crtend*.o, crtn.o, libc.a and libunwind.a from
# <sysroot>/lib/rustlib/<triple>/lib/self-contained/ and passes -nostartfiles -nodefaultlibs to the
# linker. rustup ships that directory; here it is put together from Debian's musl-dev:<arch> (musl's
# crt objects and libc.a), the gcc cross compiler (crtbegin/crtend) and, for libunwind.a, gcc's
# libgcc_eh.a (the same _Unwind_* ABI; the rust-web-src tree has no llvm libunwind source).
cross_install_musl() {
    local triple=$1
    cross_facts "$triple"
    local dir=$RUSTLIB/$triple/lib/self-contained
    local musl_lib=/usr/lib/$MUSL_TRIPLET gcc_lib
    gcc_lib=$(dirname "$("$GCC_PREFIX-gcc" -print-libgcc-file-name)")
    local stamp=$dir/ven-cross-sources want shim=$CROSS_ROOT/targets/cross/dl_find_object.c
    want="$(cross_installed_version "musl-dev:$DEB_ARCH") $("$GCC_PREFIX-gcc" -dumpfullversion) $(sha256sum <"$shim" | cut -c1-16)"
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return 0
    fi
    cross_log "assembling $dir (musl $(cross_installed_version "musl-dev:$DEB_ARCH"), gcc $("$GCC_PREFIX-gcc" -dumpfullversion))"
    mkdir -p "$dir"
    local f
    for f in crt1.o rcrt1.o Scrt1.o crti.o crtn.o libc.a; do
        cp "$musl_lib/$f" "$dir/$f"
    done
    for f in crtbegin.o crtbeginS.o crtbeginT.o crtend.o crtendS.o; do
        cp "$gcc_lib/$f" "$dir/$f"
    done
    cp "$gcc_lib/libgcc_eh.a" "$dir/libunwind.a"
    # gcc 12's libgcc_eh calls glibc's _dl_find_object; musl has none (see the file).
    local obj
    obj=$(mktemp --suffix=.o)
    "$MUSL_TRIPLET-gcc" -O2 -fPIC -c "$shim" -o "$obj"
    "$GCC_PREFIX-ar" rs "$dir/libunwind.a" "$obj" 2>/dev/null
    "$GCC_PREFIX-ar" t "$dir/libunwind.a" | grep -q "$(basename "$obj")" || cross_die "could not add _dl_find_object to $dir/libunwind.a"
    rm -f "$obj"
    # libc.a and libgcc_eh.a are C compiled by gcc: on armv7 they call libgcc's helpers.
    cp "$gcc_lib/libgcc.a" "$dir/libgcc.a"
    echo "$want" >"$stamp"
}

# Exports what cargo needs to build for TRIPLE (linker, C compiler for ring, runner, rustflags) and
# sets CARGO_ARGS (extra cargo arguments: -Zbuild-std for musl). Uses Debian's rustc and cargo.
# VEN_STD_FEATURES: -Zbuild-std-features for the musl builds (see ARCHITECTURE.md, "Cross builds
# and size"); empty builds std as shipped.
VEN_STD_FEATURES=${VEN_STD_FEATURES-optimize_for_size}
cross_env() {
    local triple=$1 up
    cross_facts "$triple"
    up=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    local low=${triple//-/_}
    export RUSTC=/usr/bin/rustc
    export CARGO_TARGET_DIR=$CROSS_TARGET_DIR
    CARGO=/usr/bin/cargo
    CARGO_ARGS=()
    [ -n "$GCC_PREFIX" ] || return 0
    export "CARGO_TARGET_${up}_LINKER=$GCC_PREFIX-gcc"
    export "AR_${low}=$GCC_PREFIX-ar"
    if [ "$LIBC" = gnu ]; then
        export "CC_${low}=$GCC_PREFIX-gcc"
        # Dynamic glibc executables: qemu finds the loader and libc in the cross sysroot.
        export "CARGO_TARGET_${up}_RUNNER=$QEMU -L /usr/$GCC_PREFIX"
    else
        # Debian's musl-dev wrapper: gcc with musl's headers (musl-gcc.specs), for ring's C.
        export "CC_${low}=$MUSL_TRIPLET-gcc"
        export "CARGO_TARGET_${up}_RUNNER=$QEMU"
        # The self-contained libgcc.a resolves the few libgcc helpers that musl's libc.a and
        # libgcc_eh.a call (the agent's own code needs none of it).
        export "CARGO_TARGET_${up}_RUSTFLAGS=-C target-feature=+crt-static -C link-arg=-lgcc"
        export RUSTC_BOOTSTRAP=1
        CARGO_ARGS=(-Zbuild-std=std,panic_abort)
        [ -n "$VEN_STD_FEATURES" ] && CARGO_ARGS+=("-Zbuild-std-features=$VEN_STD_FEATURES")
    fi
    return 0
}
