//! The packages and init integration (targets/): the .ipk and .deb that targets/package/ipk and
//! targets/package/deb make from this build's `ven`, unpacked and checked the way opkg and dpkg
//! read them; the .deb installed, removed and purged in a scratch root with the real dpkg;
//! the real `dpkg -r` (scripts chrooted) against an enforced firewall in a namespace of our own; the init scripts
//! parsed by `sh -n` (and shellcheck when installed), the systemd units by
//! `systemd-analyze verify` when it is there; the OpenWrt UCI translation fed to the agent's own
//! configuration parser.
//!
//! The tools are the Debian packages .ci/setup installs (tar, gzip, dpkg, coreutils, libc-bin,
//! iproute2, iptables, ipset; shellcheck, lintian and systemd's systemd-analyze when present). Without them a test skips loudly; under `CI` it fails instead. Nothing is installed
//! on this machine: dpkg works on a scratch root (`--root` with `--force-script-chrootless`).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use ven::config::{BackendChoice, Config};
use ven::state::{self, Identity, RecordKind};
use ven_lab::firewall::{self, FirewallDump};
use ven_lab::netns::Netns;
use ven_proto::PolicyState;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const VERSION: &str = env!("CARGO_PKG_VERSION");
const HOST_TRIPLE: &str = "x86_64-unknown-linux-gnu";
/// The OpenWrt feed names the .ipk must depend on (OpenWrt 23.05/24.10).
const OPENWRT_DEPENDS: &[&str] = &[
    "iptables-nft",
    "ip6tables-nft",
    "ipset",
    "kmod-ipt-ipset",
    "kmod-ipt-conntrack",
    "kmod-nfnetlink-log",
    "kmod-ipt-nflog",
    "iptables-mod-nflog",
    "kmod-nf-conntrack-netlink",
];

/// A fresh directory under the target directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "packages-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("creating a scratch directory");
        Self(dir)
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.0.join(relative)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Whether `tools` are all here; skips loudly, or fails under CI.
fn require(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: prerequisite missing under CI: {}", missing.join(", "));
    }
    eprintln!("SKIPPED {test}: needs {}", missing.join(", "));
    false
}

fn run(command: &mut Command) -> Output {
    let output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(command: &mut Command) -> String {
    String::from_utf8(run(command).stdout).expect("utf-8 output")
}

fn script(relative: &str) -> PathBuf {
    Path::new(REPO).join(relative)
}

/// This build's `ven`, stripped when `strip` is here (a debug build is ~60 MB; packing it would
/// cost most of the test's time), in `dir`.
fn host_binary(dir: &Scratch) -> PathBuf {
    let copy = dir.path("ven");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&copy)
        .arg(env!("CARGO_BIN_EXE_ven"))
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        fs::copy(env!("CARGO_BIN_EXE_ven"), &copy).expect("copying ven");
    }
    copy
}

/// An ELF header for `machine` and `class` (1: 32-bit, 2: 64-bit), then padding: what the
/// package scripts read to tell architectures apart.
fn elf_file(dir: &Scratch, name: &str, class: u8, machine: u16) -> PathBuf {
    let mut bytes = vec![0x7f, b'E', b'L', b'F', class, 1, 1, 0];
    bytes.resize(18, 0);
    bytes.extend_from_slice(&machine.to_le_bytes());
    bytes.resize(4096, 0);
    let path = dir.path(name);
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Runs targets/package/KIND and returns the package's path and the script's stderr.
fn package(kind: &str, bin: &Path, triple: &str, out: &Path, env: &[(&str, &str)]) -> (PathBuf, String) {
    let mut command = Command::new(script(&format!("targets/package/{kind}")));
    command.arg(bin).arg(triple).arg(out).envs(env.iter().copied());
    let output = run(&mut command);
    let printed = String::from_utf8(output.stdout).unwrap();
    let path = PathBuf::from(printed.trim());
    assert!(path.is_file(), "{kind} printed {printed:?}, which is not a file");
    (path, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// `Key: value` fields of a control file (continuation lines joined).
fn control_fields(text: &str) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut last = String::new();
    for line in text.lines() {
        if line.starts_with(' ') {
            fields.entry(last.clone()).and_modify(|v: &mut String| {
                v.push('\n');
                v.push_str(line.trim());
            });
        } else if let Some((key, value)) = line.split_once(':') {
            last = key.to_string();
            fields.insert(last.clone(), value.trim().to_string());
        }
    }
    fields
}

/// `tar tv` listing: path -> (mode string, owner/group).
fn tar_listing(listing: &str) -> BTreeMap<String, (String, String)> {
    listing
        .lines()
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let path = parts.get(5)?.trim_end_matches('/').trim_start_matches("./").to_string();
            Some((path, (parts[0].to_string(), parts[1].to_string())))
        })
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode()
        & 0o7777
}

/// `sh -n`, and shellcheck (warnings and errors) when it is installed. `local` is busybox ash's
/// and dash's, not POSIX's, hence dash; files sourced from the target system (OpenWrt's
/// /lib/functions.sh) cannot be followed here (SC1091).
fn assert_sh_parses(path: &Path) {
    run(Command::new("sh").arg("-n").arg(path));
    if Command::new("shellcheck").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success()) {
        run(Command::new("shellcheck")
            .args(["-x", "-s", "dash", "-S", "warning", "-e", "SC1091"])
            .arg(path)
            .current_dir(REPO));
    }
}

#[test]
fn ipk_unpacks_as_opkg_reads_it() {
    if !require("ipk_unpacks_as_opkg_reads_it", &["tar", "gzip", "od"]) {
        return;
    }
    let dir = Scratch::new("ipk");
    let bin = host_binary(&dir);
    let (ipk, stderr) = package("ipk", &bin, HOST_TRIPLE, &dir.path("out"), &[]);
    assert_eq!(ipk.file_name().unwrap(), format!("ven_{VERSION}-1_x86_64.ipk").as_str());
    assert!(
        stderr.contains("linked dynamically against glibc"),
        "the host's glibc build must be flagged as not running on OpenWrt: {stderr}"
    );

    // The outer archive is a gzip'd tar (opkg rejects `ar`), members in ipkg-build's order.
    let magic = fs::read(&ipk).unwrap();
    assert_eq!(&magic[..2], &[0x1f, 0x8b], "the .ipk must be gzip'd");
    let members = stdout(Command::new("tar").arg("tzf").arg(&ipk));
    assert_eq!(members.lines().collect::<Vec<_>>(), ["./debian-binary", "./data.tar.gz", "./control.tar.gz"]);
    let outer = dir.path("outer");
    fs::create_dir(&outer).unwrap();
    run(Command::new("tar").arg("xzf").arg(&ipk).arg("-C").arg(&outer));
    assert_eq!(fs::read_to_string(outer.join("debian-binary")).unwrap(), "2.0\n");

    let control_dir = dir.path("control");
    let data_dir = dir.path("data");
    for (archive, into) in [("control.tar.gz", &control_dir), ("data.tar.gz", &data_dir)] {
        fs::create_dir(into).unwrap();
        run(Command::new("tar").arg("xzf").arg(outer.join(archive)).arg("-C").arg(into));
    }

    let control = control_fields(&fs::read_to_string(control_dir.join("control")).unwrap());
    assert_eq!(control["Package"], "ven");
    assert_eq!(control["Version"], format!("{VERSION}-1"));
    assert_eq!(control["Architecture"], "x86_64");
    let depends: Vec<&str> = control["Depends"].split(", ").collect();
    for name in OPENWRT_DEPENDS {
        assert!(depends.contains(name), "Depends lacks {name}: {depends:?}");
    }
    for debian_only in ["iptables", "libc6", "conntrack"] {
        assert!(!depends.contains(&debian_only), "{debian_only} is not an OpenWrt feed package: {depends:?}");
    }
    let data_bytes: u64 =
        walk(&data_dir).iter().filter(|p| p.is_file()).map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!(control["Installed-Size"], data_bytes.to_string(), "OpenWrt's Installed-Size is in bytes");
    assert!(control["Description"].starts_with("Virtual Enforcement Node"), "{:?}", control["Description"]);
    assert_eq!(
        fs::read_to_string(control_dir.join("conffiles")).unwrap(),
        "/etc/config/ven\n/etc/ven/ven.conf\n"
    );

    // The wrappers OpenWrt generates, and our parts from the feed Makefile.
    let postinst = fs::read_to_string(control_dir.join("postinst")).unwrap();
    assert!(
        postinst.contains("IPKG_NO_SCRIPT") && postinst.contains("default_postinst \"$0\" \"$@\""),
        "{postinst}"
    );
    let prerm = fs::read_to_string(control_dir.join("prerm")).unwrap();
    assert!(prerm.contains("default_prerm \"$0\" \"$@\""), "{prerm}");
    let postinst_pkg = fs::read_to_string(control_dir.join("postinst-pkg")).unwrap();
    assert!(postinst_pkg.contains("\"${IPKG_INSTROOT}/etc/ven/data\"") && !postinst_pkg.contains("$$"));
    let prerm_pkg = fs::read_to_string(control_dir.join("prerm-pkg")).unwrap();
    assert!(prerm_pkg.contains("PKG_UPGRADE") && prerm_pkg.contains("/usr/lib/ven/uninstall-firewall"));
    for name in ["postinst", "prerm", "postinst-pkg", "prerm-pkg"] {
        assert_eq!(mode(&control_dir.join(name)), 0o755, "{name}");
        assert_sh_parses(&control_dir.join(name));
    }

    // The data: owners root, modes, the binary unchanged, the board profile for x86_64.
    let listing = tar_listing(&stdout(Command::new("tar").arg("tzvf").arg(outer.join("data.tar.gz"))));
    assert!(listing.values().all(|(_, owner)| owner == "0/0"), "every entry root-owned: {listing:?}");
    let expected = [
        ("usr/sbin/ven", "-rwxr-xr-x"),
        ("etc/init.d/ven", "-rwxr-xr-x"),
        ("etc/init.d/ven-firewall", "-rwxr-xr-x"),
        ("etc/config/ven", "-rw-------"),
        ("etc/ven/ven.conf", "-rw-------"),
        ("etc/ven/data", "drwx------"),
        ("lib/functions/ven.sh", "-rw-r--r--"),
        ("lib/upgrade/keep.d/ven", "-rw-r--r--"),
        ("usr/lib/ven/uninstall-firewall", "-rwxr-xr-x"),
    ];
    for (path, mode) in expected {
        assert_eq!(listing.get(path).map(|(m, _)| m.as_str()), Some(mode), "{path} in {listing:?}");
    }
    assert_eq!(fs::read(data_dir.join("usr/sbin/ven")).unwrap(), fs::read(&bin).unwrap());
    assert_eq!(
        fs::read_to_string(data_dir.join("etc/ven/ven.conf")).unwrap(),
        fs::read_to_string(script("board-configs/generic-x86_64.conf")).unwrap()
    );
    let keep = fs::read_to_string(data_dir.join("lib/upgrade/keep.d/ven")).unwrap();
    assert!(keep.lines().any(|l| l == "/etc/ven/data/state/"), "{keep}");
    for path in [
        "etc/init.d/ven",
        "etc/init.d/ven-firewall",
        "lib/functions/ven.sh",
        "usr/lib/ven/uninstall-firewall",
    ] {
        assert_sh_parses(&data_dir.join(path));
    }
    let init = fs::read_to_string(data_dir.join("etc/init.d/ven")).unwrap();
    for needed in [
        "USE_PROCD=1",
        "procd_set_param respawn",
        "procd_add_reload_trigger \"ven\"",
        "procd_set_param watchdog 1",
    ] {
        assert!(init.contains(needed), "ven.init lacks {needed}");
    }
    let start = |text: &str| -> u32 {
        text.lines().find_map(|l| l.strip_prefix("START=")).and_then(|n| n.parse().ok()).expect("START=")
    };
    let firewall_init = fs::read_to_string(data_dir.join("etc/init.d/ven-firewall")).unwrap();
    assert!(
        start(&firewall_init) < 19,
        "the boot-time firewall must come before firewall (19) and network (20)"
    );
    assert!(firewall_init.contains("ven restore"));
}

#[test]
fn packages_follow_the_binary_s_architecture() {
    if !require("packages_follow_the_binary_s_architecture", &["tar", "gzip", "od", "dpkg-deb"]) {
        return;
    }
    let dir = Scratch::new("arch");
    let out = dir.path("out");
    let aarch64 = elf_file(&dir, "ven-aarch64", 2, 183);
    let armv7 = elf_file(&dir, "ven-armv7", 1, 40);
    let ipk_field = |ipk: &Path, field: &str| -> String {
        let control = stdout(
            Command::new("sh")
                .arg("-c")
                .arg(format!("tar xzOf '{}' ./control.tar.gz | tar xzOf - ./control", ipk.display())),
        );
        control_fields(&control)[field].clone()
    };
    let ipk_conf = |ipk: &Path| -> String {
        stdout(
            Command::new("sh")
                .arg("-c")
                .arg(format!("tar xzOf '{}' ./data.tar.gz | tar xzOf - ./etc/ven/ven.conf", ipk.display())),
        )
    };
    let board = |name: &str| fs::read_to_string(script(&format!("board-configs/{name}.conf"))).unwrap();

    let (ipk, stderr) = package("ipk", &aarch64, "aarch64-unknown-linux-musl", &out, &[]);
    assert_eq!(ipk_field(&ipk, "Architecture"), "aarch64_cortex-a53");
    assert_eq!(ipk_conf(&ipk), board("openwrt-aarch64"));
    assert!(!stderr.contains("glibc"), "a binary without glibc's loader is not flagged: {stderr}");
    let (ipk, _) =
        package("ipk", &aarch64, "aarch64-unknown-linux-musl", &out, &[("VEN_IPK_ARCH", "aarch64_generic")]);
    assert_eq!(ipk_field(&ipk, "Architecture"), "aarch64_generic");
    let (ipk, _) = package("ipk", &armv7, "armv7-unknown-linux-musleabihf", &out, &[]);
    assert_eq!(ipk_field(&ipk, "Architecture"), "arm_cortex-a7_neon-vfpv4");
    assert_eq!(ipk_conf(&ipk), board("armhf-appliance"));

    let (deb, _) =
        package("deb", &aarch64, "aarch64-unknown-linux-gnu", &out, &[("VEN_DEB_COMPRESSION", "gzip")]);
    assert_eq!(stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Architecture")).trim(), "arm64");
    // Without glibc's loader there is no libc6 dependency, and lintian is told why.
    assert_eq!(stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends")).trim(), "iptables, ipset");
    assert!(lintian_overrides(&deb).contains("ven: statically-linked-binary [usr/sbin/ven]"));
    // The same inputs make the same bytes (timestamps from SOURCE_DATE_EPOCH, sorted, root-owned).
    // The same inputs (SOURCE_DATE_EPOCH among them) make the same bytes.
    let epoch = [("SOURCE_DATE_EPOCH", "1700000000"), ("VEN_DEB_COMPRESSION", "gzip")];
    let twice = |kind: &str, triple: &str| -> [Vec<u8>; 2] {
        ["first", "second"].map(|build| {
            let (path, _) = package(kind, &aarch64, triple, &dir.path(build), &epoch);
            fs::read(path).unwrap()
        })
    };
    let [one, two] = twice("ipk", "aarch64-unknown-linux-musl");
    assert!(one == two, "the .ipk is not reproducible");
    let [one, two] = twice("deb", "aarch64-unknown-linux-gnu");
    assert!(one == two, "the .deb is not reproducible");
    let (deb, _) =
        package("deb", &armv7, "armv7-unknown-linux-gnueabihf", &out, &[("VEN_DEB_COMPRESSION", "gzip")]);
    assert_eq!(stdout(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Architecture")).trim(), "armhf");

    // A binary for another machine, an unknown triple or architecture: refused, nothing written.
    let refused = |kind: &str, bin: &Path, triple: &str, env: &[(&str, &str)]| -> String {
        let output = Command::new(script(&format!("targets/package/{kind}")))
            .arg(bin)
            .arg(triple)
            .arg(dir.path("refused"))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{kind} {triple} should refuse {}", bin.display());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let err = refused("ipk", &aarch64, HOST_TRIPLE, &[]);
    assert!(err.contains("ELF machine 183") && err.contains("machine 62"), "{err}");
    let err = refused("deb", &armv7, "aarch64-unknown-linux-gnu", &[]);
    assert!(err.contains("ELF machine 40"), "{err}");
    let err = refused("ipk", &aarch64, "mips-unknown-linux-musl", &[]);
    assert!(err.contains("unsupported target"), "{err}");
    let err = refused("ipk", &aarch64, "aarch64-unknown-linux-musl", &[("VEN_IPK_ARCH", "arm64")]);
    assert!(err.contains("not an OpenWrt aarch64 architecture"), "{err}");
    assert!(!dir.path("refused").join("ven_0.1.0-1_x86_64.ipk").exists());
}

/// The package's lintian overrides (what lintian is told is deliberate).
fn lintian_overrides(deb: &Path) -> String {
    stdout(Command::new("sh").arg("-c").arg(format!(
        "dpkg-deb --fsys-tarfile '{}' | tar xOf - ./usr/share/lintian/overrides/ven",
        deb.display()
    )))
}

/// The .deb's install, removal and purge with the real dpkg in a scratch root: maintainer
/// scripts run outside a chroot with DPKG_ROOT set, as when an image is built, so they must
/// change only that root (no service is started, no firewall touched).
#[test]
fn deb_installs_removes_and_purges_in_a_scratch_root() {
    if !require(
        "deb_installs_removes_and_purges_in_a_scratch_root",
        &["tar", "gzip", "od", "dpkg", "dpkg-deb"],
    ) {
        return;
    }
    let dir = Scratch::new("deb");
    let bin = host_binary(&dir);
    let (deb, _) = package("deb", &bin, HOST_TRIPLE, &dir.path("out"), &[("VEN_DEB_COMPRESSION", "gzip")]);
    assert_eq!(deb.file_name().unwrap(), format!("ven_{VERSION}-1_amd64.deb").as_str());

    let fields = control_fields(&stdout(Command::new("dpkg-deb").arg("-f").arg(&deb)));
    assert_eq!(fields["Package"], "ven");
    assert_eq!(fields["Version"], format!("{VERSION}-1"));
    assert_eq!(fields["Architecture"], "amd64");
    assert!(fields["Depends"].starts_with("libc6 (>= 2."), "{}", fields["Depends"]);
    assert!(fields["Depends"].ends_with(", iptables, ipset"), "{}", fields["Depends"]);
    let synopsis = fields["Description"].lines().next().unwrap().to_string();
    assert!(
        !synopsis.to_lowercase().starts_with("ven"),
        "the synopsis must not start with the name: {synopsis}"
    );
    assert!(fields["Installed-Size"].parse::<u64>().unwrap() * 1024 >= bin.metadata().unwrap().len());
    let info = stdout(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for script in ["postinst", "prerm", "postrm", "conffiles", "md5sums"] {
        assert!(info.contains(script), "control archive lacks {script}: {info}");
    }
    assert_eq!(
        stdout(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles")),
        "/etc/init.d/ven\n/etc/init.d/ven-firewall\n/etc/ven/ven.conf\n"
    );
    let listing = tar_listing(&stdout(Command::new("dpkg-deb").arg("-c").arg(&deb)));
    assert!(listing.values().all(|(_, owner)| owner == "root/root"), "{listing:?}");
    assert!(!lintian_overrides(&deb).contains("statically-linked"), "this build is dynamic");
    // lintian, when installed: errors fail, warnings are printed.
    if let Ok(output) = Command::new("lintian").args(["--tag-display-limit", "0"]).arg(&deb).output() {
        let report = String::from_utf8_lossy(&output.stdout);
        eprintln!("lintian:\n{report}");
        let errors: Vec<&str> = report.lines().filter(|l| l.starts_with("E: ")).collect();
        assert!(errors.is_empty(), "lintian errors: {errors:#?}");
    }

    // A scratch dpkg database.
    let root = dir.path("root");
    for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
        fs::create_dir_all(root.join(sub)).unwrap();
    }
    fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    fs::write(root.join("var/lib/dpkg/available"), "").unwrap();
    let dpkg = |args: &[&str]| -> String {
        let mut command = Command::new("dpkg");
        command
            .arg(format!("--root={}", root.display()))
            .args(["--log=/dev/null", "--force-script-chrootless"])
            .args(args)
            .env_remove("DPKG_ROOT");
        stdout(&mut command)
    };
    // iptables, ipset and libc6 are not in the scratch database: their absence is expected.
    dpkg(&["--force-depends", "-i", deb.to_str().unwrap()]);
    assert!(dpkg(&["-s", "ven"]).contains("Status: install ok installed"));
    assert_eq!(
        fs::read_to_string(root.join("var/lib/dpkg/info/ven.conffiles")).unwrap(),
        "/etc/init.d/ven\n/etc/init.d/ven-firewall\n/etc/ven/ven.conf\n"
    );
    let installed = [
        ("usr/sbin/ven", 0o755),
        ("usr/lib/ven/uninstall-firewall", 0o755),
        ("lib/systemd/system/ven.service", 0o644),
        ("lib/systemd/system/ven-firewall.service", 0o644),
        ("etc/init.d/ven", 0o755),
        ("etc/init.d/ven-firewall", 0o755),
        ("etc/ven/ven.conf", 0o644),
        ("var/lib/ven", 0o700),
        ("usr/share/doc/ven/copyright", 0o644),
        ("usr/share/doc/ven/changelog.Debian.gz", 0o644),
    ];
    for (path, expected) in installed {
        assert_eq!(mode(&root.join(path)), expected, "{path}");
        let meta = fs::metadata(root.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (0, 0), "{path} must be root's");
    }
    assert_eq!(fs::read(root.join("usr/sbin/ven")).unwrap(), fs::read(&bin).unwrap());
    let changelog =
        stdout(Command::new("gzip").arg("-dc").arg(root.join("usr/share/doc/ven/changelog.Debian.gz")));
    assert!(changelog.starts_with(&format!("ven ({VERSION}-1) ")), "{changelog}");
    assert!(
        fs::read_to_string(root.join("usr/share/doc/ven/copyright")).unwrap().contains("License: Apache-2.0")
    );
    // Enabled the way deb-systemd-helper does, in the scratch root only.
    for (wants, unit) in
        [("multi-user.target.wants", "ven.service"), ("sysinit.target.wants", "ven-firewall.service")]
    {
        let link = root.join("etc/systemd/system").join(wants).join(unit);
        assert_eq!(
            fs::read_link(&link).unwrap(),
            Path::new("/lib/systemd/system").join(unit),
            "{}",
            link.display()
        );
    }

    // Remove: the program goes, configuration and data stay.
    fs::write(root.join("var/lib/ven/kept"), "state").unwrap();
    dpkg(&["-r", "ven"]);
    assert!(dpkg(&["-s", "ven"]).contains("Status: deinstall ok config-files"));
    assert!(!root.join("usr/sbin/ven").exists() && !root.join("lib/systemd/system/ven.service").exists());
    assert!(root.join("etc/ven/ven.conf").is_file(), "a conffile stays until purge");
    assert!(root.join("var/lib/ven/kept").is_file(), "the data directory stays until purge");

    // Purge: nothing of ven is left.
    dpkg(&["-P", "ven"]);
    let status =
        Command::new("dpkg").arg(format!("--root={}", root.display())).args(["-s", "ven"]).output().unwrap();
    assert!(!status.status.success(), "ven is still known to dpkg after purge");
    let left: Vec<PathBuf> = walk(&root)
        .into_iter()
        .filter(|p| !p.starts_with(root.join("var/lib/dpkg")))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains("ven")))
        .collect();
    assert!(left.is_empty(), "left after purge: {left:?}");
}

/// A root a chroot can run the package's scripts and `ven` in: merged /usr, /bin/sh and the
/// few tools the maintainer scripts use, the nft variant of iptables with its extensions, ipset,
/// `ven`'s shared libraries and /dev/null, each copied from this machine with its libraries.
fn chroot_root(root: &Path, ven: &Path) {
    let script = r#"
set -eu
R=$1 VEN=$2
mkdir -p "$R/usr/bin" "$R/usr/sbin" "$R/usr/lib" "$R/usr/lib64" "$R/dev" "$R/run" "$R/tmp" \
	"$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates" "$R/var/log"
for d in bin sbin lib lib64; do ln -s "usr/$d" "$R/$d"; done
: >"$R/var/lib/dpkg/status"
: >"$R/var/lib/dpkg/available"
put() { mkdir -p "$R$(dirname "$1")" && cp -L "$1" "$R$1"; }
with_libs() {
	ldd "$1" | awk '/=>/ { print $3 } /^\t\// { print $1 }' | while read -r lib; do
		[ -e "$R$lib" ] || put "$lib"
	done
}
xtables=$(readlink -f "$(command -v iptables-nft-restore)")
for tool in /bin/sh /bin/mkdir /bin/chmod /bin/rm /bin/rmdir "$xtables" "$(command -v ipset)"; do
	put "$tool"
	with_libs "$tool"
done
for name in iptables-nft-save iptables-nft-restore ip6tables-nft-save ip6tables-nft-restore; do
	ln -s "$(basename "$xtables")" "$R$(dirname "$xtables")/$name"
done
extensions=$(dirname "$(ldd "$xtables" | awk '/libxtables/ { print $3 }')")/xtables
mkdir -p "$R$(dirname "$extensions")"
cp -a "$extensions" "$R$extensions"
with_libs "$VEN"
mknod -m 666 "$R/dev/null" c 1 3
"#;
    run(Command::new("sh").arg("-c").arg(script).arg("chroot-root").arg(root).arg(ven));
}

/// Removing the package is the spec's uninstall, like `ven deactivate`: ven's rules and sets
/// go, the host's own stay, the VEN is unpaired. The real `dpkg -r` runs the real prerm in a
/// chroot (so DPKG_ROOT is not set and the scripts act as on a live system) inside a network
/// namespace of our own, against an enforced policy the packaged `ven restore` put in force.
/// Also: an upgrade leaves the firewall alone, `VEN_UNINSTALL_FIREWALL=keep` too, and a
/// firewall that cannot be changed fails the removal and keeps the package.
#[test]
fn removal_leaves_the_firewall_as_deactivate_does() {
    let test = "removal_leaves_the_firewall_as_deactivate_does";
    if !require(
        test,
        &["tar", "gzip", "od", "dpkg", "dpkg-deb", "chroot", "ldd", "mknod", "iptables-nft-restore"],
    ) || !common::require_kernel()
    {
        return;
    }
    let dir = Scratch::new("removal");
    let bin = host_binary(&dir);
    let (deb, _) = package("deb", &bin, HOST_TRIPLE, &dir.path("out"), &[("VEN_DEB_COMPRESSION", "gzip")]);
    let root = dir.path("root");
    chroot_root(&root, &bin);

    let ns = Netns::new("venpkg").expect("creating a namespace");
    // The host's own rules, which deactivation must keep.
    common::sh(&ns, "iptables -A INPUT -p tcp --dport 9 -m comment --comment host-rule -j ACCEPT");
    common::sh(&ns, "ip6tables -A INPUT -p tcp --dport 9 -m comment --comment host-rule -j ACCEPT");
    let before = dump(&ns);

    // dpkg in the namespace; the scripts run chrooted into `root`.
    let dpkg = |args: &[&str], env: &[(&str, &str)]| -> Output {
        let mut command = ns.command("dpkg");
        command
            .arg(format!("--root={}", root.display()))
            .args(["--log=/dev/null", "--force-depends"])
            .args(args)
            .env_remove("DPKG_ROOT")
            .env_remove("VEN_UNINSTALL_FIREWALL")
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        command.output().unwrap()
    };
    let succeeded = |output: Output, what: &str| -> String {
        let text =
            format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "{what} failed:\n{text}");
        text
    };
    let status = || String::from_utf8_lossy(&dpkg(&["-s", "ven"], &[]).stdout).into_owned();
    let data = ven::state::DataDir::new(root.join("var/lib/ven"));
    let paired = || data.identity_path().exists();
    let install = || {
        succeeded(dpkg(&["-i", deb.to_str().unwrap()], &[]), "dpkg -i");
        assert!(status().contains("Status: install ok installed"), "{}", status());
    };
    // Paired with a PCE that has no route from the namespace (the goodbye fails at once), and
    // its enforced policy put in force by the installed `ven restore`.
    let pair_and_restore = || -> FirewallDump {
        let identity = Identity {
            agent_id: 7,
            agent_token: "token".into(),
            hostname: "board".into(),
            management_server: "198.18.0.250:8443".into(),
            event_port: 8444,
            ca_cert_der: vec![0x30, 0x00],
            heartbeat_interval_s: 300,
            activated_at: 1,
        };
        data.ensure().unwrap();
        state::write_record(&data.identity_path(), RecordKind::Identity, &identity, 0o600).unwrap();
        let policy = common::policy(3, PolicyState::Enforced, &["198.18.0.1"]);
        state::write_record(&data.policy_path(), RecordKind::Policy, &policy, 0o600).unwrap();
        let mut restore = ns.command("chroot");
        restore
            .arg(&root)
            .args(["/usr/sbin/ven", "restore"])
            .env_remove("VEN_DATA_DIR")
            .env_remove("VEN_CONFIG");
        let restored = stdout(&mut restore);
        assert!(restored.starts_with("Restored policy version 3 (enforced)"), "{restored}");
        let enforced = dump(&ns);
        assert!(!enforced.ven_objects().is_empty(), "ven restore put nothing in force");
        enforced
    };

    install();
    assert_eq!(mode(&root.join("var/lib/ven")), 0o700, "postinst, in the chroot");
    let enforced = pair_and_restore();

    // An upgrade (the same package again: prerm upgrade) leaves the pairing and the firewall.
    install();
    assert!(paired());
    assert_eq!(comparable(&dump(&ns)), comparable(&enforced), "an upgrade changed the firewall");

    // `keep` removes the package and leaves the pairing and the firewall.
    let said = succeeded(dpkg(&["-r", "ven"], &[("VEN_UNINSTALL_FIREWALL", "keep")]), "dpkg -r (keep)");
    assert!(said.contains("left as they are"), "{said}");
    assert!(paired());
    assert_eq!(comparable(&dump(&ns)), comparable(&enforced));

    // A firewall the tools cannot change: prerm fails, dpkg keeps the package, nothing changes.
    install();
    let restore_tool = root.join("usr/sbin/iptables-nft-restore");
    let hidden = root.join("usr/sbin/iptables-nft-restore.hidden");
    fs::rename(&restore_tool, &hidden).unwrap();
    let failed = dpkg(&["-r", "ven"], &[]);
    fs::rename(&hidden, &restore_tool).unwrap();
    let said =
        format!("{}{}", String::from_utf8_lossy(&failed.stdout), String::from_utf8_lossy(&failed.stderr));
    assert!(!failed.status.success(), "dpkg -r succeeded although the firewall could not be opened:\n{said}");
    assert!(said.contains("the package stays installed"), "{said}");
    // Still installed (the selection says it was asked to go: "deinstall ok installed").
    assert!(status().contains(" ok installed\n"), "{}", status());
    assert!(root.join("usr/sbin/ven").is_file() && paired());
    assert_eq!(comparable(&dump(&ns)), comparable(&enforced));

    // The default: ven's rules and sets gone, the host's kept, the pairing forgotten.
    let said = succeeded(dpkg(&["-r", "ven"], &[]), "dpkg -r");
    assert!(said.contains("Deactivated") && said.contains("the firewall is open"), "{said}");
    let after = dump(&ns);
    assert_eq!(after.ven_objects(), Vec::<String>::new(), "ven objects left:\n{}", after.v4);
    assert_eq!(comparable(&after), comparable(&before), "the host's own rules must stay as they were");
    assert!(!paired(), "the VEN must be unpaired");
    assert!(status().contains("Status: deinstall ok config-files"), "{}", status());
    assert!(!root.join("usr/sbin/ven").exists());
    succeeded(dpkg(&["-P", "ven"], &[]), "dpkg -P");
    assert!(!root.join("var/lib/ven").exists(), "purge removes the data directory");
}

fn dump(ns: &Netns) -> FirewallDump {
    let save =
        |tool: &str, args: &[&str]| String::from_utf8(ns.exec(tool, args).expect(tool).stdout).unwrap();
    FirewallDump {
        v4: save("iptables-save", &[]),
        v6: save("ip6tables-save", &[]),
        ipsets: save("ipset", &["save"]),
    }
}

fn comparable(dump: &FirewallDump) -> (String, String, String) {
    (
        firewall::normalize_save(&dump.v4),
        firewall::normalize_save(&dump.v6),
        firewall::normalize_ipsets(&dump.ipsets),
    )
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        for entry in fs::read_dir(&next).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path.clone());
            }
            found.push(path);
        }
    }
    found
}

#[test]
fn systemd_units_declare_what_the_agent_and_the_boot_need() {
    let unit = |name: &str| -> BTreeMap<String, Vec<String>> {
        let text = fs::read_to_string(script(&format!("targets/systemd/{name}"))).unwrap();
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            if line.starts_with('[') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            } else {
                let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("{name}: {line:?}"));
                keys.entry(format!("{section}.{key}")).or_default().push(value.to_string());
            }
        }
        keys
    };
    let one = |keys: &BTreeMap<String, Vec<String>>, key: &str| -> String {
        keys.get(key).map(|v| v.join(" ")).unwrap_or_else(|| panic!("{key} missing"))
    };
    let agent = unit("ven.service");
    assert_eq!(one(&agent, "Service.Type"), "notify");
    assert_eq!(one(&agent, "Service.ExecStart"), "/usr/sbin/ven agent");
    assert_eq!(one(&agent, "Service.Restart"), "on-failure");
    let watchdog: u64 = one(&agent, "Service.WatchdogSec").parse().expect("WatchdogSec in seconds");
    // One manager step waits at most two 15 s PCE requests; the ping comes at half the timeout.
    assert!(watchdog / 2 > 30, "WatchdogSec={watchdog} leaves no margin over a slow manager step");
    assert!(one(&agent, "Service.RestartSec").parse::<u64>().is_ok());
    assert!(one(&agent, "Unit.After").contains("ven-firewall.service"));
    let boot = unit("ven-firewall.service");
    assert_eq!(one(&boot, "Unit.DefaultDependencies"), "no");
    assert!(one(&boot, "Unit.Before").split_whitespace().any(|u| u == "network-pre.target"));
    assert!(one(&boot, "Unit.Wants").split_whitespace().any(|u| u == "network-pre.target"));
    assert_eq!(one(&boot, "Service.Type"), "oneshot");
    assert_eq!(one(&boot, "Service.ExecStart"), "/usr/sbin/ven restore");

    // systemd's own parser, when it is installed: a root holding the units, the binary they
    // run and systemd's standard targets. It reports problems on stderr without failing.
    if Command::new("systemd-analyze").arg("--version").stdout(Stdio::null()).status().is_err() {
        eprintln!("systemd-analyze is not installed: the units were checked key by key only");
        return;
    }
    let dir = Scratch::new("units");
    let units = dir.path("lib/systemd/system");
    fs::create_dir_all(&units).unwrap();
    fs::create_dir_all(dir.path("usr/sbin")).unwrap();
    if fs::hard_link(env!("CARGO_BIN_EXE_ven"), dir.path("usr/sbin/ven")).is_err() {
        fs::copy(env!("CARGO_BIN_EXE_ven"), dir.path("usr/sbin/ven")).unwrap();
    }
    for entry in fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "target") {
            fs::copy(entry.path(), units.join(entry.file_name())).unwrap();
        }
    }
    for name in ["ven.service", "ven-firewall.service"] {
        fs::copy(script(&format!("targets/systemd/{name}")), units.join(name)).unwrap();
    }
    let output = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", dir.0.display()))
        .arg(units.join("ven.service"))
        .arg(units.join("ven-firewall.service"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
}

#[test]
fn init_scripts_parse() {
    for path in [
        "targets/openwrt/files/ven.init",
        "targets/openwrt/files/ven-firewall.init",
        "targets/openwrt/files/ven.sh",
        "targets/sysvinit/ven",
        "targets/sysvinit/ven-firewall",
        "targets/debian/postinst",
        "targets/debian/prerm",
        "targets/debian/postrm",
        "targets/package/uninstall-firewall",
        "targets/package/common.sh",
        "targets/package/ipk",
        "targets/package/deb",
        "targets/rootfs/assemble",
    ] {
        assert_sh_parses(&script(path));
    }
}

/// OpenWrt's UCI options reach the agent: `uci show` output as OpenWrt prints it, translated by
/// the init scripts' shared functions, merged after the board profile and read by the agent's
/// own configuration parser.
#[test]
fn uci_settings_override_the_board_profile() {
    let dir = Scratch::new("uci");
    // What `uci -q show ven.settings` prints for the section (values quoted, lists space-separated).
    let uci_show = "ven.settings=settings\n\
                    ven.settings.firewall_backend='nft'\n\
                    ven.settings.failsafe_services='tcp/22' 'out:udp/53' 'tcp/8080'\n\
                    ven.settings.flow_flush_interval_s='600'\n\
                    ven.settings.Bad-Key='x'\n\
                    ven.settings.ignored_interfaces='wg0'\\''; reboot'\n";
    // A `uci` on PATH that prints it, so that ven_write_config runs unchanged.
    let bin = dir.path("bin");
    fs::create_dir(&bin).unwrap();
    fs::write(dir.path("uci-show"), uci_show).unwrap();
    fs::write(
        bin.join("uci"),
        format!(
            "#!/bin/sh\n[ \"$*\" = '-q show ven.settings' ] && cat '{}'\n",
            dir.path("uci-show").display()
        ),
    )
    .unwrap();
    fs::set_permissions(bin.join("uci"), fs::Permissions::from_mode(0o755)).unwrap();
    let merged = dir.path("run/ven.conf");
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            ". '{}'; VEN_BOARD_CONFIG='{}'; VEN_RUN_CONFIG='{}'; ven_write_config",
            script("targets/openwrt/files/ven.sh").display(),
            script("board-configs/openwrt-aarch64.conf").display(),
            merged.display()
        ))
        .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let warnings = String::from_utf8_lossy(&output.stderr);
    assert!(warnings.contains("'Bad-Key'") && warnings.contains("'ignored_interfaces'"), "{warnings}");
    assert_eq!(mode(&merged), 0o600);

    let config =
        Config::read(&merged).unwrap_or_else(|e| panic!("{e}\n{}", fs::read_to_string(&merged).unwrap()));
    let profile = Config::read(&script("board-configs/openwrt-aarch64.conf")).unwrap();
    assert_eq!(config.firewall_backend, BackendChoice::Nft, "UCI overrides the profile's auto");
    let services: Vec<String> = config.failsafe_services.iter().map(ToString::to_string).collect();
    assert_eq!(services, ["tcp/22", "tcp/8080", "out:udp/53"]);
    assert_eq!(config.flows.flush_interval.as_secs(), 600);
    // Untouched keys keep the profile's values; the rejected option changed nothing.
    assert_eq!(config.caps, profile.caps);
    assert_eq!(config.ignored_interfaces, profile.ignored_interfaces);
    assert!(config.routes);

    // The CLI's default data directory points at the one on flash, made again at each boot;
    // someone's real directory there is left alone.
    let link = dir.path("var/lib/ven");
    let flash = dir.path("etc/ven/data");
    let link_data_dir = || -> Output {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                ". '{}'; VEN_CLI_DATA_DIR='{}'; ven_link_data_dir '{}'",
                script("targets/openwrt/files/ven.sh").display(),
                link.display(),
                flash.display()
            ))
            .output()
            .unwrap()
    };
    assert!(link_data_dir().status.success());
    assert_eq!(fs::read_link(&link).unwrap(), flash);
    assert!(link_data_dir().status.success(), "again, over its own link");
    assert_eq!(fs::read_link(&link).unwrap(), flash);
    fs::remove_file(&link).unwrap();
    fs::create_dir(&link).unwrap();
    let refused = link_data_dir();
    assert!(String::from_utf8_lossy(&refused.stderr).contains("is a directory"));
    assert!(fs::symlink_metadata(&link).unwrap().is_dir(), "a real directory must stay");
}

/// The agent as systemd runs it (`Type=notify`, `WatchdogSec=`): READY=1 once it is up,
/// WATCHDOG=1 every half of WATCHDOG_USEC from its manager loop, STOPPING=1 on SIGTERM, all on
/// a real datagram socket standing where systemd's would. Inside a namespace of our own.
#[test]
fn the_agent_notifies_its_supervisor() {
    if !common::require_kernel() {
        return;
    }
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    let dir = Scratch::new("notify");
    let socket_path = dir.path("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let next = || -> String {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a notification from the agent within 10 s");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    };

    let mut ns = Netns::new("vennotify").expect("creating a namespace");
    let mut agent = ns.command(env!("CARGO_BIN_EXE_ven"));
    agent
        .arg("agent")
        .env("VEN_DATA_DIR", dir.path("data"))
        .env("VEN_CONFIG", script("board-configs/generic-x86_64.conf"))
        .env("NOTIFY_SOCKET", &socket_path)
        // WatchdogSec=2: a ping every second.
        .env("WATCHDOG_USEC", "2000000")
        .env_remove("WATCHDOG_PID")
        .env("VEN_LOG_STDERR", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let started = Instant::now();
    let pid = ns.spawn(agent).expect("starting the agent").id();

    let ready = next();
    assert!(ready.starts_with("READY=1\nSTATUS=unpaired"), "{ready:?}");
    // The first ping comes with READY; then one a second, however idle the agent is.
    assert_eq!(next(), "WATCHDOG=1");
    let pings_from = Instant::now();
    for _ in 0..2 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    let spacing = pings_from.elapsed() / 2;
    assert!(
        spacing >= Duration::from_millis(800) && spacing <= Duration::from_millis(1800),
        "pings every {spacing:?}, expected every second (half of WATCHDOG_USEC)"
    );

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let mut last = next();
    while last == "WATCHDOG=1" {
        last = next();
    }
    assert_eq!(last, "STOPPING=1\nSTATUS=stopping", "after {:?}", started.elapsed());
    ns.stop_children(Duration::from_secs(10));
}

/// Kills the agent a pid file names, whatever happened to the test.
struct PidFileGuard(PathBuf);

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        if let Some(pid) = fs::read_to_string(&self.0).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The sysvinit script for images without systemd or procd, run for real inside a namespace of
/// our own: with start-stop-daemon (Debian) and without it (the busybox fallback).
#[test]
fn sysvinit_script_starts_and_stops_the_agent() {
    if !common::require_kernel() {
        return;
    }
    use std::time::{Duration, Instant};
    let dir = Scratch::new("sysv");
    let ns = Netns::new("vensysv").expect("creating a namespace");
    // A PATH without start-stop-daemon, for the fallback.
    let bare = dir.path("bare-path");
    fs::create_dir(&bare).unwrap();
    for tool in ["sh", "cat", "sleep", "rm"] {
        let found = stdout(Command::new("sh").args(["-c", &format!("command -v {tool}")]));
        std::os::unix::fs::symlink(found.trim(), bare.join(tool)).unwrap();
    }
    let has_ssd = Command::new("sh")
        .args(["-c", "command -v start-stop-daemon"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let ip = stdout(Command::new("sh").args(["-c", "command -v ip"])).trim().to_string();
    let mut paths = vec![("fallback", bare.display().to_string())];
    if has_ssd {
        paths.push(("start-stop-daemon", std::env::var("PATH").unwrap_or_default()));
    } else {
        eprintln!("start-stop-daemon is not installed: only the busybox fallback is run");
    }

    for (how, path) in paths {
        let data = dir.path(&format!("data-{how}"));
        let pid_file = dir.path(&format!("ven-{how}.pid"));
        let _guard = PidFileGuard(pid_file.clone());
        let init = |action: &str| -> Output {
            // By absolute path: the restricted PATH below is also where Command looks for it.
            Command::new(&ip)
                .args(["netns", "exec", ns.name(), "sh"])
                .arg(script("targets/sysvinit/ven"))
                .arg(action)
                .env("PATH", &path)
                .env("VEN_BIN", env!("CARGO_BIN_EXE_ven"))
                .env("VEN_PIDFILE", &pid_file)
                .env("VEN_DATA_DIR", &data)
                .env("VEN_CONFIG", script("board-configs/generic-x86_64.conf"))
                .stdin(Stdio::null())
                .output()
                .unwrap()
        };
        let status_json = || -> String {
            let output = Command::new(env!("CARGO_BIN_EXE_ven"))
                .args(["status", "--json"])
                .env("VEN_DATA_DIR", &data)
                .output()
                .unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        };

        let started = init("start");
        assert!(started.status.success(), "{how}: start: {}", String::from_utf8_lossy(&started.stderr));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !status_json().contains("\"agent_running\":true") {
            assert!(Instant::now() < deadline, "{how}: the agent did not come up: {}", status_json());
            std::thread::sleep(Duration::from_millis(100));
        }
        let pid: i32 = fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
        assert!(String::from_utf8_lossy(&init("start").stdout).contains("already running"), "{how}");
        let status = init("status");
        assert!(status.status.success(), "{how}: status must exit 0 while running");

        let stopped = init("stop");
        assert!(stopped.status.success(), "{how}: stop: {}", String::from_utf8_lossy(&stopped.stderr));
        assert!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
            "{how}: the agent (pid {pid}) still runs after stop"
        );
        assert!(!pid_file.exists(), "{how}: the pid file stays after stop");
        assert_eq!(init("status").status.code(), Some(3), "{how}: LSB status of a stopped service");
        assert!(status_json().contains("\"agent_running\":false"), "{how}");
    }
}

/// targets/rootfs/assemble lays out what an image builder copies, for each init system.
#[test]
fn rootfs_assemble_lays_out_each_init_system() {
    if !require("rootfs_assemble_lays_out_each_init_system", &["od"]) {
        return;
    }
    let dir = Scratch::new("rootfs");
    let bin = elf_file(&dir, "ven-armv7", 1, 40);
    let assemble = |out: &str, env: &[(&str, &str)]| -> PathBuf {
        let root = dir.path(out);
        run(Command::new(script("targets/rootfs/assemble"))
            .arg(&root)
            .arg(&bin)
            .arg("armv7-unknown-linux-musleabihf")
            .envs(env.iter().copied()));
        root
    };

    let root = assemble("busybox", &[("VEN_INIT", "busybox"), ("VEN_DATA_DIR", "/data/ven")]);
    assert_eq!(mode(&root.join("usr/sbin/ven")), 0o755);
    assert_eq!(mode(&root.join("data/ven")), 0o700, "the data directory on persistent storage");
    assert_eq!(
        fs::read_to_string(root.join("etc/ven/ven.conf")).unwrap(),
        fs::read_to_string(script("board-configs/armhf-appliance.conf")).unwrap()
    );
    for name in ["S35ven-firewall", "S90ven"] {
        assert_eq!(mode(&root.join("etc/init.d").join(name)), 0o755, "{name}");
    }
    assert!(fs::read_to_string(root.join("etc/default/ven")).unwrap().contains("VEN_DATA_DIR=/data/ven"));

    let root = assemble("sysvinit", &[]);
    assert_eq!(mode(&root.join("var/lib/ven")), 0o700);
    assert_eq!(
        fs::read_link(root.join("etc/rcS.d/S10ven-firewall")).unwrap(),
        Path::new("../init.d/ven-firewall")
    );
    assert_eq!(fs::read_link(root.join("etc/rc2.d/S90ven")).unwrap(), Path::new("../init.d/ven"));

    let root = assemble("systemd", &[("VEN_INIT", "systemd"), ("VEN_DATA_DIR", "/data/ven")]);
    assert_eq!(
        fs::read_link(root.join("etc/systemd/system/sysinit.target.wants/ven-firewall.service")).unwrap(),
        Path::new("/lib/systemd/system/ven-firewall.service")
    );
    let drop_in =
        fs::read_to_string(root.join("etc/systemd/system/ven-firewall.service.d/data-dir.conf")).unwrap();
    assert!(
        drop_in.contains("Environment=VEN_DATA_DIR=/data/ven")
            && drop_in.contains("RequiresMountsFor=/data/ven")
    );

    let refused = Command::new(script("targets/rootfs/assemble"))
        .arg(dir.path("refused"))
        .arg(&bin)
        .arg("aarch64-unknown-linux-musl")
        .output()
        .unwrap();
    assert!(!refused.status.success(), "an armv7 binary laid out as aarch64");
}

/// The .ipk's removal step (prerm-pkg, which OpenWrt's default_prerm sources before stopping
/// the services) does what the .deb's does: nothing on an upgrade (PKG_UPGRADE=1), the spec's
/// uninstall otherwise. Run chrooted into a root holding the ipk's files, inside a namespace of
/// our own; `uci` there answers as on a router whose /etc/config/ven sets nothing.
#[test]
fn ipk_removal_opens_the_firewall_but_not_on_upgrade() {
    let test = "ipk_removal_opens_the_firewall_but_not_on_upgrade";
    if !require(test, &["tar", "gzip", "od", "chroot", "ldd", "mknod", "iptables-nft-restore"])
        || !common::require_kernel()
    {
        return;
    }
    let dir = Scratch::new("ipk-removal");
    let bin = host_binary(&dir);
    let (ipk, _) = package("ipk", &bin, HOST_TRIPLE, &dir.path("out"), &[]);
    let root = dir.path("root");
    chroot_root(&root, &bin);
    let control = dir.path("control");
    fs::create_dir(&control).unwrap();
    run(Command::new("sh").arg("-c").arg(format!(
        "tar xzOf '{ipk}' ./data.tar.gz | tar xzf - -C '{root}' && tar xzOf '{ipk}' ./control.tar.gz | tar xzf - -C '{control}'",
        ipk = ipk.display(),
        root = root.display(),
        control = control.display()
    )));
    fs::copy(control.join("prerm-pkg"), root.join("prerm-pkg")).unwrap();
    // `uci -q get` of an option nobody set: no output, exit 1.
    fs::write(root.join("usr/bin/uci"), "#!/bin/sh\nexit 1\n").unwrap();
    fs::set_permissions(root.join("usr/bin/uci"), fs::Permissions::from_mode(0o755)).unwrap();

    let ns = Netns::new("venipk").expect("creating a namespace");
    // Both families hold a rule of the host's (an empty family has no table to compare).
    common::sh(&ns, "iptables -A INPUT -p tcp --dport 9 -m comment --comment host-rule -j ACCEPT");
    common::sh(&ns, "ip6tables -A INPUT -p tcp --dport 9 -m comment --comment host-rule -j ACCEPT");
    let before = dump(&ns);
    let data = ven::state::DataDir::new(root.join("etc/ven/data"));
    let identity = Identity {
        agent_id: 9,
        agent_token: "token".into(),
        hostname: "router".into(),
        management_server: "198.18.0.250:8443".into(),
        event_port: 8444,
        ca_cert_der: vec![0x30, 0x00],
        heartbeat_interval_s: 300,
        activated_at: 1,
    };
    data.ensure().unwrap();
    state::write_record(&data.identity_path(), RecordKind::Identity, &identity, 0o600).unwrap();
    let policy = common::policy(5, PolicyState::Enforced, &["198.18.0.1"]);
    state::write_record(&data.policy_path(), RecordKind::Policy, &policy, 0o600).unwrap();
    let in_root = |argv: &[&str], env: &[(&str, &str)]| -> String {
        let mut command = ns.command("chroot");
        command
            .arg(&root)
            .args(argv)
            .env_remove("PKG_UPGRADE")
            .env_remove("IPKG_INSTROOT")
            .env_remove("VEN_UNINSTALL_FIREWALL")
            .envs(env.iter().copied());
        stdout(&mut command)
    };
    let restored = in_root(&["/usr/sbin/ven", "restore"], &[("VEN_DATA_DIR", "/etc/ven/data")]);
    assert!(restored.starts_with("Restored policy version 5 (enforced)"), "{restored}");
    let enforced = dump(&ns);
    assert!(!enforced.ven_objects().is_empty());

    // opkg upgrading the package: nothing changes.
    in_root(&["/bin/sh", "/prerm-pkg"], &[("PKG_UPGRADE", "1")]);
    assert!(data.identity_path().exists());
    assert_eq!(comparable(&dump(&ns)), comparable(&enforced), "an upgrade changed the firewall");

    // opkg removing it: the spec's uninstall, with the data directory UCI defaults to.
    let said = in_root(&["/bin/sh", "/prerm-pkg"], &[]);
    assert!(said.contains("Deactivated"), "{said}");
    assert!(!data.identity_path().exists(), "the VEN must be unpaired");
    let after = dump(&ns);
    assert_eq!(after.ven_objects(), Vec::<String>::new(), "ven objects left:\n{}", after.v4);
    assert_eq!(comparable(&after), comparable(&before));
}
