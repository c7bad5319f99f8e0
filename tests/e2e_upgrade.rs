//! Signed self-upgrade with rollback (issue 16), end to end with the real binaries in the lab's
//! namespaces. The releases are the test's own `ven` with bytes appended (an ELF runs the same
//! with a trailer, and its digest differs), `/bin/false` (a binary that fails at start), signed
//! with `pce release sign` and added with `pce release add`; `pce upgrade VERSION db` orders them.
//!
//! - A good release replaces db's agent: the installed file becomes the release, the agent
//!   reports the release's version to the PCE, the PCE records the steps, and web's connections
//!   to db never fail while it happens (the firewall is not touched).
//! - A release signed with a key the VEN did not pin, and one altered in the PCE's store, are
//!   refused: the binary stays, the agent keeps running, the refusal is an event. An order for a
//!   release the PCE does not hold is refused by `pce upgrade`.
//! - A release that fails at start is rolled back by its guardian, which starts the old agent;
//!   the PCE's repeated order does not start a loop.
//! - Power loss (SIGKILL of every process of the agent, through the test-only switch
//!   `test_upgrade_kill`) at each step leaves an agent that starts and ends on the release.
//!
//! The test's `ven` is stripped first: a debug build is larger than a release may be.
//!
//! Agents run detached (`ven start --direct`): an upgrade replaces the process image and a
//! guardian may start the agent again, so they are not the lab's children. Every process whose
//! environment names one of the lab's data directories is killed at the end.
//!
//! Needs root, iproute2, iptables and ipset; skipped loudly without them, a failure under CI=true.
//! All traffic stays inside the lab's namespaces (198.18.0.0/24).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ven_lab::probe::Verdict;
use ven_lab::scenario::{Host, VEN_CONFIG_FILE};
use ven_lab::{Binaries, Lab, LabOptions};

const DB_PORT: u16 = 5432;
const HEARTBEAT_S: u32 = 5;
/// The release every good upgrade here installs.
const RELEASE: &str = "9.9.9-e2e";

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &["iptables-save", "ipset"])
}

/// A scratch directory with a copy of the test's `ven` that upgrades may replace, the release
/// signing key and the releases.
struct Scratch {
    dir: PathBuf,
    ven: PathBuf,
    /// The untouched copy, to compare against and to reset from.
    pristine: PathBuf,
    key: PathBuf,
    public_key: String,
    target: String,
}

impl Scratch {
    fn new(name: &str, bins: &Binaries) -> Self {
        let dir = std::env::temp_dir().join(format!("ven-e2e-upgrade-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let ven = dir.join("bin/ven");
        let pristine = dir.join("ven.pristine");
        std::fs::copy(&bins.ven, &pristine).unwrap();
        // A debug build's symbols make it larger than any release may be (16 MiB).
        run_ok(Path::new("strip"), &[pristine.to_str().unwrap()]);
        std::fs::copy(&pristine, &ven).unwrap();
        let key = dir.join("release.key");
        let public_key = run_ok(&bins.pce, &["release-key", "generate", "--output", key.to_str().unwrap()]);
        // `ven version`: "ven 0.1.0 (x86_64-unknown-linux-gnu)".
        let version = run_ok(&ven, &["version"]);
        let target = version.trim().rsplit_once('(').unwrap().1.trim_end_matches(')').to_string();
        Scratch { dir, ven, pristine, key, public_key: public_key.trim().to_string(), target }
    }

    /// The test's `ven` with `trailer` appended: another binary that runs the same.
    fn release_of_ven(&self, name: &str, trailer: &str) -> PathBuf {
        let path = self.dir.join(name);
        let mut bytes = std::fs::read(&self.pristine).unwrap();
        bytes.extend_from_slice(trailer.as_bytes());
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn sign(&self, pce: &Path, binary: &Path, version: &str, key: &Path) -> String {
        let args = ["release", "sign", binary.to_str().unwrap(), "--key", key.to_str().unwrap()];
        let signature = run_ok(pce, &[&args[..], &["--version", version, "--target", &self.target]].concat());
        signature.trim().to_string()
    }

    fn installed_is(&self, other: &Path) -> bool {
        std::fs::read(&self.ven).unwrap() == std::fs::read(other).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run_ok(program: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{} {args:?}: {}", program.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// SIGKILLs every process whose environment names one of `data_dirs` (agents, guardians): a
/// power loss, and the cleanup.
fn kill_every_process_of(data_dirs: &[PathBuf]) -> usize {
    let wanted: Vec<Vec<u8>> =
        data_dirs.iter().map(|d| format!("VEN_DATA_DIR={}", d.display()).into_bytes()).collect();
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else { continue };
        if environ.split(|b| *b == 0).any(|var| wanted.iter().any(|w| var == w.as_slice())) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

/// Kills the lab's agents (started detached) when the test ends, even by a panic; declared after
/// the lab, so it runs before the lab's teardown.
struct Reaper(Vec<PathBuf>);

impl Drop for Reaper {
    fn drop(&mut self) {
        kill_every_process_of(&self.0);
    }
}

fn options(prefix: &str, config: String) -> LabOptions {
    LabOptions {
        name_prefix: prefix.into(),
        heartbeat_interval: Some(HEARTBEAT_S),
        ven_config: Some(config),
        ..LabOptions::default()
    }
}

fn config(release_key: &str, extra: &str) -> String {
    format!("release_key = {release_key}\nupgrade_mode = self\nupgrade_health_deadline_s = 60\n{extra}")
}

/// The lab with both agents enforcing web -> db 5432 and db listening.
fn enforcing_lab(bins: Binaries, scratch: &Scratch, opts: LabOptions) -> (Lab, Reaper) {
    let bins = Binaries { ven: scratch.ven.clone(), pce: bins.pce };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    let reaper = Reaper(vec![lab.data_dir(Host::Web), lab.data_dir(Host::Db)]);
    lab.start_pce().expect("start the PCE");
    for host in [Host::Web, Host::Db] {
        lab.activate(host).expect("activate");
        start(&lab, host);
    }
    lab.configure_policy().expect("policy");
    for host in [Host::Web, Host::Db] {
        lab.set_state(host, "enforced").expect("enforce");
    }
    lab.wait_for_policy(&[Host::Web, Host::Db], "enforced", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
    lab.listen(Host::Db, DB_PORT).expect("listen on db");
    assert_eq!(lab.probe(Host::Web, Host::Db, DB_PORT).unwrap(), Verdict::Allowed);
    (lab, reaper)
}

fn start(lab: &Lab, host: Host) {
    let started = lab.ven(host, &["start", "--direct"]).expect("ven start --direct");
    assert!(started.success(), "{}{}\n{}", started.stdout, started.stderr, diagnostics(lab));
}

fn add_release(lab: &Lab, scratch: &Scratch, binary: &Path, version: &str, key: &Path) {
    let signature = scratch.sign(&lab.binaries().pce, binary, version, key);
    let binary = binary.to_str().unwrap();
    let added = lab.pce(&[
        "release",
        "add",
        binary,
        "--version",
        version,
        "--target",
        &scratch.target,
        "--signature",
        &signature,
    ]);
    let added = added.expect("pce release add");
    assert!(added.success(), "{}{}", added.stdout, added.stderr);
}

fn trust(lab: &Lab, public_key: &str) {
    let trusted = lab.pce(&["release-key", "trust", public_key]).expect("pce release-key trust");
    assert!(trusted.success(), "{}{}", trusted.stdout, trusted.stderr);
}

fn order(lab: &Lab, version: &str) {
    let ordered = lab.pce(&["upgrade", version, "db"]).expect("pce upgrade");
    assert!(ordered.success(), "{}{}", ordered.stdout, ordered.stderr);
}

/// db's `ven status --json`, or the error.
fn db_status(lab: &Lab) -> Result<String, String> {
    let status = lab.ven(Host::Db, &["status", "--json"]).map_err(|e| e.to_string())?;
    if status.success() { Ok(status.stdout) } else { Err(status.stderr) }
}

/// Upgrade events the PCE recorded for db: their steps, oldest first.
fn upgrade_steps(lab: &Lab) -> Vec<String> {
    let events = lab.events().expect("pce events");
    events
        .into_iter()
        .filter(|e| e.event_type == "agent_upgrade" && e.hostname.as_deref() == Some("db"))
        .map(|e| e.details["step"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Waits for `condition` on db's status JSON while web keeps connecting to db; returns the
/// failed probes (none expected: the firewall is never touched).
fn wait_probing(lab: &Lab, what: &str, limit: Duration, condition: impl Fn(&str) -> bool) -> Vec<String> {
    let started = Instant::now();
    let mut failed = Vec::new();
    let mut probes = 0;
    // Bounded: at most one probe and one status per 300 ms, for `limit`.
    loop {
        probes += 1;
        match lab.probe(Host::Web, Host::Db, DB_PORT) {
            Ok(Verdict::Allowed) => {}
            other => failed.push(format!("{:?}: {other:?}", started.elapsed())),
        }
        let status = db_status(lab);
        if status.as_deref().is_ok_and(&condition) {
            eprintln!(
                "{what}: after {:.1} s, {probes} probes web -> db, {} failed",
                started.elapsed().as_secs_f64(),
                failed.len()
            );
            return failed;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; last status {status:?}\n{}",
            diagnostics(lab)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn diagnostics(lab: &Lab) -> String {
    let mut text = lab.diagnostics();
    for host in [Host::Db] {
        for log in ["agent.log", "firewall.log", "pce.log"] {
            let path = lab.data_dir(host).join("log").join(log);
            if let Ok(contents) = std::fs::read_to_string(&path) {
                let tail: Vec<&str> = contents.lines().rev().take(40).collect();
                text.push_str(&format!("\n--- {} (last 40 lines)\n", path.display()));
                for line in tail.into_iter().rev() {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    text
}

fn running_release(version: &str) -> impl Fn(&str) -> bool + '_ {
    move |json: &str| {
        json.contains(&format!(r#""version":"{version}""#)) && json.contains(r#""agent_running":true"#)
    }
}

#[test]
fn a_signed_release_replaces_the_agent_while_the_firewall_stays() {
    let test = "a_signed_release_replaces_the_agent_while_the_firewall_stays";
    let Some(bins) = prerequisites(test) else { return };
    let scratch = Scratch::new("good", &bins);
    let opts = options("venupg", config(&scratch.public_key, ""));
    let (lab, _reaper) = enforcing_lab(bins, &scratch, opts);
    trust(&lab, &scratch.public_key);
    let release = scratch.release_of_ven("ven-release", "\nrelease 9.9.9-e2e\n");
    add_release(&lab, &scratch, &release, RELEASE, &scratch.key);

    order(&lab, RELEASE);
    let failed = wait_probing(&lab, "db running the release", Duration::from_secs(120), |json| {
        running_release(RELEASE)(json) && json.contains("committed")
    });
    assert!(failed.is_empty(), "web -> db failed during the upgrade: {failed:?}");
    assert!(scratch.installed_is(&release), "the installed binary is the release");
    assert!(!scratch.ven.with_file_name("ven.new").exists(), "nothing staged is left");
    // The PCE sees the new version, and recorded the trial's start and its commit.
    lab.wait_until("the PCE to know db runs the release", Duration::from_secs(30), |lab| {
        let shown = lab.pce(&["workload", "show", "db"])?.stdout;
        Ok((!shown.contains(RELEASE)).then_some(shown))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
    lab.wait_until("staged and committed events", Duration::from_secs(30), |lab| {
        let steps = upgrade_steps(lab);
        let done = steps.contains(&"staged".to_string()) && steps.contains(&"committed".to_string());
        Ok((!done).then(|| format!("{steps:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
    // The agent that committed keeps enforcing: db's other ports stay closed to web.
    assert_eq!(lab.probe(Host::Web, Host::Db, DB_PORT).unwrap(), Verdict::Allowed);
    assert_ne!(lab.probe(Host::Web, Host::Db, DB_PORT + 1).unwrap(), Verdict::Allowed);
    // Stopped, the installed binary still says which release it is.
    let stopped = lab.ven(Host::Db, &["stop", "--direct"]).unwrap();
    assert!(stopped.success(), "{stopped:?}");
    let status = db_status(&lab).unwrap();
    assert!(
        status.contains(&format!(r#""version":"{RELEASE}""#)) && status.contains(r#""agent_running":false"#),
        "{status}"
    );
}

#[test]
fn releases_that_do_not_verify_are_refused_and_nothing_changes() {
    let test = "releases_that_do_not_verify_are_refused_and_nothing_changes";
    let Some(bins) = prerequisites(test) else { return };
    let scratch = Scratch::new("refused", &bins);
    // db pins a key of its own: whatever the PCE's key signs does not verify there.
    let other_key = scratch.dir.join("other.key");
    let other_public =
        run_ok(&bins.pce, &["release-key", "generate", "--output", other_key.to_str().unwrap()]);
    let opts = options("venupr", config(other_public.trim(), ""));
    let (lab, _reaper) = enforcing_lab(bins, &scratch, opts);

    // Nothing to order yet: a clear refusal, nothing ordered.
    let missing = lab.run(lab.pce_command(&["upgrade", "0.0.404", "db"])).expect("pce upgrade");
    assert!(!missing.success(), "an order for a release the PCE does not hold: {}", missing.stdout);
    assert!(missing.stderr.contains("0.0.404"), "the error names it: {}", missing.stderr);

    trust(&lab, &scratch.public_key);
    let release = scratch.release_of_ven("ven-wrong-key", "\nrelease wrong key\n");
    add_release(&lab, &scratch, &release, "9.9.9-wrongkey", &scratch.key);
    order(&lab, "9.9.9-wrongkey");
    lab.wait_until("a refused upgrade event", Duration::from_secs(60), |lab| {
        let steps = upgrade_steps(lab);
        Ok((!steps.contains(&"refused".to_string())).then(|| format!("{steps:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
    let refusal = lab.events().unwrap().into_iter().find(|e| e.event_type == "agent_upgrade").unwrap();
    assert!(refusal.message.contains("signature"), "says why: {}", refusal.message);

    // A release altered in the PCE's store, signed with the key db pins: the PCE does not serve
    // it, and db would not take it.
    let altered = scratch.release_of_ven("ven-altered", "\nrelease altered\n");
    trust_instead_and_add_altered(&lab, &scratch, &altered, &other_key, other_public.trim());
    let stored =
        lab.data_dir(Host::Pce).join("releases").join(&scratch.target).join("9.9.9-altered").join("binary");
    let mut bytes = std::fs::read(&stored).expect("the stored release");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&stored, bytes).unwrap();
    order(&lab, "9.9.9-altered");
    lab.wait_until("a second refused upgrade event", Duration::from_secs(60), |lab| {
        let steps = upgrade_steps(lab);
        Ok((steps.iter().filter(|s| *s == "refused").count() < 2).then(|| format!("{steps:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
    let messages: Vec<String> = lab.events().unwrap().into_iter().map(|e| e.message).collect();
    assert!(
        messages.iter().any(|m| m.contains("altered")),
        "the PCE's refusal reaches the event: {messages:?}"
    );

    // Nothing changed on db: its binary, its version, its enforcement.
    assert!(scratch.installed_is(&scratch.pristine));
    assert!(!scratch.ven.with_file_name("ven.new").exists());
    let status = db_status(&lab).expect("db answers");
    assert!(running_release(env!("CARGO_PKG_VERSION"))(&status), "{status}");
    assert_eq!(lab.probe(Host::Web, Host::Db, DB_PORT).unwrap(), Verdict::Allowed);
    assert!(!upgrade_steps(&lab).contains(&"staged".to_string()));
}

/// Trusts `public` instead (the PCE holds one key) and adds `binary` as 9.9.9-altered signed
/// with `key`.
fn trust_instead_and_add_altered(lab: &Lab, scratch: &Scratch, binary: &Path, key: &Path, public: &str) {
    let replaced = lab.pce(&["release-key", "trust", "--replace", public]).expect("pce release-key trust");
    assert!(replaced.success(), "{}{}", replaced.stdout, replaced.stderr);
    add_release(lab, scratch, binary, "9.9.9-altered", key);
}

#[test]
fn a_release_that_fails_at_start_is_rolled_back_and_not_tried_again() {
    let test = "a_release_that_fails_at_start_is_rolled_back_and_not_tried_again";
    let Some(bins) = prerequisites(test) else { return };
    let scratch = Scratch::new("crash", &bins);
    let opts = options("venupc", config(&scratch.public_key, ""));
    let (lab, _reaper) = enforcing_lab(bins, &scratch, opts);
    trust(&lab, &scratch.public_key);
    // An ELF binary for this machine that exits with status 1 whatever it is asked.
    let failing = scratch.dir.join("ven-false");
    std::fs::copy("/bin/false", &failing).unwrap();
    add_release(&lab, &scratch, &failing, "9.9.9-false", &scratch.key);

    order(&lab, "9.9.9-false");
    // The trial dies at once; the guardian rolls back and starts the old agent.
    let failed = wait_probing(&lab, "db rolled back and running again", Duration::from_secs(120), |json| {
        running_release(env!("CARGO_PKG_VERSION"))(json) && json.contains("rolled back")
    });
    assert!(failed.is_empty(), "web -> db failed while db's agent was down: {failed:?}");
    assert!(scratch.installed_is(&scratch.pristine), "the old binary stays installed");
    assert!(!scratch.ven.with_file_name("ven.new").exists());
    lab.wait_until("a rolled-back event", Duration::from_secs(30), |lab| {
        let steps = upgrade_steps(lab);
        Ok((!steps.contains(&"rolled-back".to_string())).then(|| format!("{steps:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
    // The PCE keeps ordering it at every heartbeat; the agent does not try it again.
    std::thread::sleep(Duration::from_secs(u64::from(HEARTBEAT_S) * 3));
    let steps = upgrade_steps(&lab);
    assert_eq!(steps, ["rolled-back"], "one trial only, which never ran long enough to say so");
    let pce_log = std::fs::read_to_string(lab.log_path(Host::Pce)).unwrap();
    let downloads = pce_log.matches("release 9.9.9-false for").count();
    assert_eq!(downloads, 1, "downloaded once:\n{pce_log}");
    let status = db_status(&lab).expect("db answers");
    assert!(running_release(env!("CARGO_PKG_VERSION"))(&status), "{status}");

    // The operator may insist: `ven upgrade` tries it again, and it is rolled back again.
    let said = lab.ven(Host::Db, &["upgrade", "--status"]).unwrap();
    assert!(said.stdout.contains("9.9.9-false rolled back"), "{}{}", said.stdout, said.stderr);
    let retried = lab.ven(Host::Db, &["upgrade"]).unwrap();
    assert!(retried.success() && retried.stdout.contains("downloading release 9.9.9-false"), "{retried:?}");
    lab.wait_until("a second rolled-back event", Duration::from_secs(60), |lab| {
        let steps = upgrade_steps(lab);
        Ok((steps.len() < 2).then(|| format!("{steps:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
    let failed = wait_probing(
        &lab,
        "db running again",
        Duration::from_secs(60),
        running_release(env!("CARGO_PKG_VERSION")),
    );
    assert!(failed.is_empty(), "web -> db failed: {failed:?}");
    assert_eq!(upgrade_steps(&lab), ["rolled-back", "rolled-back"]);
}

#[test]
fn a_release_not_healthy_by_its_deadline_is_rolled_back() {
    let test = "a_release_not_healthy_by_its_deadline_is_rolled_back";
    let Some(bins) = prerequisites(test) else { return };
    let scratch = Scratch::new("deadline", &bins);
    // The release runs (it is ven), but the test-only switch keeps it from counting as healthy.
    let settings = "upgrade_health_deadline_s = 10\ntest_upgrade_unhealthy = true\n";
    let opts = options("venupd", config(&scratch.public_key, settings));
    let (lab, _reaper) = enforcing_lab(bins, &scratch, opts);
    trust(&lab, &scratch.public_key);
    let release = scratch.release_of_ven("ven-unhealthy", "\nrelease unhealthy\n");
    add_release(&lab, &scratch, &release, "9.9.9-unhealthy", &scratch.key);
    order(&lab, "9.9.9-unhealthy");
    let failed = wait_probing(&lab, "db rolled back at the deadline", Duration::from_secs(120), |json| {
        running_release(env!("CARGO_PKG_VERSION"))(json) && json.contains("rolled back")
    });
    assert!(failed.is_empty(), "web -> db failed: {failed:?}");
    assert!(scratch.installed_is(&scratch.pristine), "the old binary stays installed");
    assert!(!scratch.ven.with_file_name("ven.new").exists());
    let status = db_status(&lab).unwrap();
    assert!(status.contains("did not report healthy within 10 s"), "{status}");
    lab.wait_until("staged and rolled-back events", Duration::from_secs(30), |lab| {
        let steps = upgrade_steps(lab);
        let done = steps == ["staged", "rolled-back"];
        Ok((!done).then(|| format!("{steps:?}")))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", diagnostics(&lab)));
}

#[test]
fn power_loss_at_any_upgrade_step_leaves_a_working_agent() {
    let test = "power_loss_at_any_upgrade_step_leaves_a_working_agent";
    let Some(bins) = prerequisites(test) else { return };
    let scratch = Scratch::new("power", &bins);
    let opts = options("venupp", config(&scratch.public_key, ""));
    let (lab, _reaper) = enforcing_lab(bins, &scratch, opts);
    trust(&lab, &scratch.public_key);
    let config_path = lab.workdir().join(VEN_CONFIG_FILE);
    let db_data = lab.data_dir(Host::Db);
    for (index, step) in
        ["downloaded", "staged", "recorded", "launching", "healthy", "renamed"].iter().enumerate()
    {
        // A fresh release per step, so that each upgrade is one the agent has not run.
        let version = format!("9.9.{index}-{step}");
        let release = scratch.release_of_ven(&format!("ven-{step}"), &format!("\nrelease {version}\n"));
        add_release(&lab, &scratch, &release, &version, &scratch.key);

        // The agent restarts with the switch set, then the order comes.
        kill_every_process_of(std::slice::from_ref(&db_data));
        std::fs::write(&config_path, config(&scratch.public_key, &format!("test_upgrade_kill = {step}\n")))
            .unwrap();
        start(&lab, Host::Db);
        order(&lab, &version);
        let died = Instant::now();
        // The switch kills the agent at the step; the rest of its processes die with the power.
        while db_status(&lab).is_ok_and(|json| json.contains(r#""agent_running":true"#)) {
            assert!(
                died.elapsed() < Duration::from_secs(90),
                "{step}: the agent never reached the step\n{}",
                diagnostics(&lab)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        kill_every_process_of(std::slice::from_ref(&db_data));
        assert_eq!(
            lab.probe(Host::Web, Host::Db, DB_PORT).unwrap(),
            Verdict::Allowed,
            "{step}: the firewall stays"
        );

        // Power back, without the switch: the agent starts and ends on the release.
        std::fs::write(&config_path, config(&scratch.public_key, "")).unwrap();
        start(&lab, Host::Db);
        let failed =
            wait_probing(&lab, &format!("{step}: db on {version}"), Duration::from_secs(120), |json| {
                running_release(&version)(json) && json.contains("committed")
            });
        assert!(failed.is_empty(), "{step}: web -> db failed: {failed:?}");
        assert!(scratch.installed_is(&release), "{step}: the installed binary is the release");
        assert!(!scratch.ven.with_file_name("ven.new").exists(), "{step}: nothing staged is left");
        let leftovers: Vec<String> = std::fs::read_dir(scratch.ven.parent().unwrap())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name != "ven")
            .collect();
        assert!(leftovers.is_empty(), "{step}: files left beside the binary: {leftovers:?}");
    }
}
