# shellcheck shell=sh disable=SC2034  # the variables set here are the callers'
# Shared by targets/package/ipk, targets/package/deb and targets/rootfs/assemble (sourced, POSIX sh).
#
# Facts every package of ven agrees on: the version (the workspace's), which board profile a
# target gets, which ELF machine a target's binary must be, and the tools a build may use.

# The repository root (this file lives in targets/package/).
VEN_REPO=$(cd "$(dirname "$0")/../.." && pwd)

die() {
	echo "${0##*/}: $*" >&2
	exit 1
}

# The workspace version: the first `version = "..."` after [workspace.package] in Cargo.toml.
ven_version() {
	sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\([^"]*\)".*/\1/p' "$VEN_REPO/Cargo.toml" | head -n 1
}

# Sets ELF_MACHINE, ELF_CLASS (1: 32-bit, 2: 64-bit), DEB_ARCH, IPK_ARCH and BOARD for a Rust
# target triple, or fails for a triple we do not package.
#
# OpenWrt names the package architecture after the CPU the whole image is built for:
# - aarch64: aarch64_cortex-a53 (MediaTek Filogic, Raspberry Pi 3/4, most aarch64 routers) by
#   default; the binary is generic ARMv8, so VEN_IPK_ARCH=aarch64_generic (Rockchip, Layerscape)
#   or aarch64_cortex-a72 packages the same file for those images.
# - armv7: arm_cortex-a7_neon-vfpv4 (ipq40xx, sunxi, mt7629...), the hard-float armv7 targets.
# - x86_64: x86_64.
# Debian: amd64, arm64, armhf.
ven_target() {
	case "$1" in
	x86_64-unknown-linux-gnu | x86_64-unknown-linux-musl)
		ELF_MACHINE=62 ELF_CLASS=2 DEB_ARCH=amd64 IPK_ARCH=x86_64
		IPK_BOARD=generic-x86_64 DEB_BOARD=generic-x86_64
		;;
	aarch64-unknown-linux-gnu | aarch64-unknown-linux-musl)
		ELF_MACHINE=183 ELF_CLASS=2 DEB_ARCH=arm64 IPK_ARCH=${VEN_IPK_ARCH:-aarch64_cortex-a53}
		# The OpenWrt profile routes and opens LuCI; a Debian arm64 host is a generic Linux host.
		IPK_BOARD=openwrt-aarch64 DEB_BOARD=generic-x86_64
		case "$IPK_ARCH" in
		aarch64_cortex-a53 | aarch64_cortex-a72 | aarch64_cortex-a76 | aarch64_generic) ;;
		*) die "VEN_IPK_ARCH=$IPK_ARCH is not an OpenWrt aarch64 architecture" ;;
		esac
		;;
	armv7-unknown-linux-gnueabihf | armv7-unknown-linux-musleabihf)
		ELF_MACHINE=40 ELF_CLASS=1 DEB_ARCH=armhf IPK_ARCH=arm_cortex-a7_neon-vfpv4
		IPK_BOARD=armhf-appliance DEB_BOARD=armhf-appliance
		;;
	*)
		die "unsupported target $1 (x86_64-unknown-linux-gnu, aarch64-unknown-linux-gnu, aarch64-unknown-linux-musl, armv7-unknown-linux-gnueabihf, armv7-unknown-linux-musleabihf)"
		;;
	esac
}

# Fails unless FILE is an ELF executable for the machine ven_target chose: packaging an x86_64
# binary as arm64 would make a package that installs and then cannot run.
ven_check_elf() {
	[ -f "$1" ] || die "$1: no such file"
	magic=$(od -An -tx1 -N4 "$1" | tr -d ' \n')
	[ "$magic" = 7f454c46 ] || die "$1 is not an ELF file"
	class=$(od -An -tu1 -j4 -N1 "$1" | tr -d ' \n')
	data=$(od -An -tu1 -j5 -N1 "$1" | tr -d ' \n')
	[ "$data" = 1 ] || die "$1 is not little-endian"
	# e_machine: two little-endian bytes at offset 18.
	# shellcheck disable=SC2046  # the two numbers become $2 and $3
	set -- "$1" $(od -An -tu1 -j18 -N2 "$1")
	machine=$(($2 + 256 * $3))
	if [ "$machine" != "$ELF_MACHINE" ] || [ "$class" != "$ELF_CLASS" ]; then
		die "$1 is built for ELF machine $machine (class $class), not for $TRIPLE (machine $ELF_MACHINE, class $ELF_CLASS)"
	fi
}

# The board profile installed as /etc/ven/ven.conf: $VEN_BOARD_CONFIG, or board-configs/NAME.conf.
ven_board_config() {
	config=${VEN_BOARD_CONFIG:-$VEN_REPO/board-configs/$1.conf}
	[ -f "$config" ] || die "board profile $config not found"
	echo "$config"
}

# Installs the Debian packages that provide the commands named, when one is missing.
# Arguments: pairs COMMAND PACKAGE.
ven_need_tools() {
	missing=
	while [ $# -ge 2 ]; do
		command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
		shift 2
	done
	[ -z "$missing" ] && return 0
	echo "${0##*/}: installing$missing" >&2
	# shellcheck disable=SC2086  # one argument per package
	apt-get install -y --no-install-recommends $missing >&2 || die "cannot install$missing"
}

# tar with every entry owned by root, in a stable order and with the given mtime, so that the
# same inputs make the same archive (no fakeroot needed).
ven_tar() {
	tar --format=gnu --owner=0 --group=0 --numeric-owner --sort=name --mtime="@$SOURCE_DATE_EPOCH" "$@"
}
