//! `ven-lab`: the README's demo. Builds three network namespaces on one segment, starts the real
//! `pce` and two real `ven` agents, provisions "web may reach db on 5432/tcp", enforces it and
//! proves it with TCP probes. Exits non-zero when a probe is not as expected.
//!
//! SIGINT, SIGTERM and SIGHUP are blocked in every thread and taken by one signal thread with
//! `sigwait`, which tears the lab down (once: [`Teardown::run`] is idempotent) and exits.
#![forbid(unsafe_code)]

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use nix::sys::signal::{SigSet, Signal};
use ven_lab::scenario::{self, Host, Lab, LabOptions, Teardown};
use ven_lab::{Binaries, netns};

const USAGE: &str = "\
Usage: ven-lab [--keep] [--keep-workdir]

Runs the ven demo in network namespaces (needs root and iproute2): a PCE and two agents, web and
db; provisions \"web may reach db on 5432/tcp\", enforces it and probes it with real TCP.

Options:
  --keep          leave the lab running after the probes, until Ctrl-C, to explore it
  --keep-workdir  keep the work dir (data dirs and logs) after tear-down
  -h, --help      print this help

Environment:
  VEN_BIN, PCE_BIN  the binaries to run (default: next to ven-lab, or one directory up)
";

/// Exit status when a prerequisite is missing or the lab could not be built.
const EXIT_SETUP: u8 = 2;
/// Exit status when a probe was not as expected or a step failed.
const EXIT_FAILED: u8 = 1;

/// `println!` that ignores write errors: `ven-lab | head` must not panic, and the release profile
/// aborts on panic, which would skip tear-down and leave namespaces behind.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that ignores write errors (see `say!`).
macro_rules! warn {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Validated command line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Config {
    keep: bool,
    keep_workdir: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum Parsed {
    Run(Config),
    Help,
}

fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed, String> {
    let mut config = Config::default();
    for arg in args {
        match arg.as_str() {
            "--keep" => config.keep = true,
            "--keep-workdir" => config.keep_workdir = true,
            "-h" | "--help" => return Ok(Parsed::Help),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Parsed::Run(config))
}

/// What the signal thread should exit with: the demo's result once it has one, else 128+signal.
const NO_RESULT: i32 = -1;

fn main() -> ExitCode {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Parsed::Run(config)) => config,
        Ok(Parsed::Help) => {
            let _ = write!(std::io::stdout().lock(), "{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(why) => {
            warn!("ven-lab: {why}\n\n{USAGE}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    if let Err(why) = netns::available() {
        warn!("ven-lab: cannot build the lab: {why} (run as root with iproute2 installed)");
        return ExitCode::from(EXIT_SETUP);
    }
    let bins = match Binaries::locate() {
        Ok(bins) => bins,
        Err(e) => {
            warn!("ven-lab: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };

    // Before any other thread exists, so that all of them inherit the mask. Children get a clean
    // mask from std::process, and a process group of their own (a Ctrl-C reaches only us).
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        signals.add(signal);
    }
    if let Err(e) = signals.thread_block() {
        warn!("ven-lab: cannot block signals: {e}");
        return ExitCode::from(EXIT_SETUP);
    }
    let teardown = Teardown::new();
    let result = Arc::new(AtomicI32::new(NO_RESULT));
    // Set by the signal thread alone. The lab's own tear-down also cancels `teardown` (the Lab's
    // Drop runs it at the end of `run`), so cancellation does not say a signal came.
    let signalled = Arc::new(AtomicBool::new(false));
    let spawned = {
        let teardown = teardown.clone();
        let result = Arc::clone(&result);
        let signalled = Arc::clone(&signalled);
        std::thread::Builder::new().name("ven-lab-signals".into()).spawn(move || {
            // Ends only by exiting the process; the main thread's own exit ends it otherwise.
            let signal = signals.wait();
            signalled.store(true, Ordering::SeqCst);
            let name = signal.map(|s| s.as_str()).unwrap_or("a signal");
            say!("\nven-lab: {name} received, tearing down");
            teardown.run();
            say!("ven-lab: torn down");
            let code = match (result.load(Ordering::SeqCst), signal) {
                (NO_RESULT, Ok(signal)) => 128 + signal as i32,
                (NO_RESULT, Err(_)) => 130,
                (code, _) => code,
            };
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        })
    };
    if let Err(e) = spawned {
        warn!("ven-lab: cannot start the signal thread: {e}");
        return ExitCode::from(EXIT_SETUP);
    }

    let code = run(&config, bins, &teardown, &result);
    if signalled.load(Ordering::SeqCst) {
        // The signal thread is tearing down and exits with 128+signal.
        loop {
            std::thread::park();
        }
    }
    // A signal arriving during this tear-down exits with the demo's result, not 128+signal.
    result.store(i32::from(code), Ordering::SeqCst);
    teardown.run();
    let _ = std::io::stdout().flush();
    ExitCode::from(code)
}

fn run(config: &Config, bins: Binaries, teardown: &Teardown, result: &AtomicI32) -> u8 {
    say!("ven-lab: the ven demo in network namespaces");
    say!("  ven: {}", bins.ven.display());
    say!("  pce: {}", bins.pce.display());
    let opts = LabOptions { keep_workdir: config.keep_workdir, ..LabOptions::default() };
    let mut lab = match Lab::with_teardown(bins, opts, teardown.clone()) {
        Ok(lab) => lab,
        Err(e) => {
            warn!("ven-lab: building the lab failed: {e}");
            return EXIT_SETUP;
        }
    };
    say!("  work dir: {}", lab.workdir().display());
    let mut narrate = |line: &str| say!("{line}");
    let report = match scenario::run_demo(&mut lab, &mut narrate) {
        Ok(report) => report,
        Err(e) => {
            if teardown.is_cancelled() {
                return EXIT_FAILED;
            }
            warn!("\nven-lab: FAILED: {e}");
            let _ = write!(std::io::stderr().lock(), "{}", lab.diagnostics());
            if config.keep_workdir {
                warn!("ven-lab: work dir kept: {}", lab.workdir().display());
            }
            return EXIT_FAILED;
        }
    };
    let unexpected = report.baseline.iter().chain(&report.probes).filter(|p| !p.ok()).count();
    let code = if unexpected == 0 {
        say!("\nRESULT: PASS: every probe was as expected");
        0
    } else {
        say!("\nRESULT: FAIL: {unexpected} probe(s) not as expected");
        let _ = write!(std::io::stderr().lock(), "{}", lab.diagnostics());
        EXIT_FAILED
    };
    if config.keep_workdir {
        say!("work dir kept after tear-down: {}", lab.workdir().display());
    }
    if config.keep {
        result.store(i32::from(code), Ordering::SeqCst);
        print_exploration_hints(&lab);
        let _ = std::io::stdout().flush();
        // The signal thread tears down and exits; nothing else is left to do here.
        loop {
            std::thread::park();
        }
    }
    code
}

fn print_exploration_hints(lab: &Lab) {
    let bins = lab.binaries();
    say!("\nThe lab stays up until Ctrl-C. To look around (as root, in another terminal):");
    for host in Host::ALL {
        say!("  ip netns exec {} bash          # a shell on {host}", lab.ns_name(host));
    }
    for host in Host::AGENTS {
        say!(
            "  ip netns exec {} env VEN_DATA_DIR={} {} status",
            lab.ns_name(host),
            lab.data_dir(host).display(),
            bins.ven.display()
        );
    }
    say!("  ip netns exec {} iptables-save         # db's firewall", lab.ns_name(Host::Db));
    say!(
        "  ip netns exec {} {} --data-dir {} --server {} workload list",
        lab.ns_name(Host::Pce),
        bins.pce.display(),
        lab.data_dir(Host::Pce).display(),
        scenario::management_server()
    );
    say!("  logs: {}", lab.workdir().display());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Parsed, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn no_arguments_run_the_demo_and_tear_down() {
        assert_eq!(parse(&[]), Ok(Parsed::Run(Config { keep: false, keep_workdir: false })));
    }

    #[test]
    fn keep_flags() {
        assert_eq!(parse(&["--keep"]), Ok(Parsed::Run(Config { keep: true, keep_workdir: false })));
        assert_eq!(
            parse(&["--keep-workdir", "--keep"]),
            Ok(Parsed::Run(Config { keep: true, keep_workdir: true }))
        );
    }

    #[test]
    fn help_wins_and_unknown_arguments_are_refused() {
        assert_eq!(parse(&["--keep", "--help"]), Ok(Parsed::Help));
        assert_eq!(parse(&["-h"]), Ok(Parsed::Help));
        let err = parse(&["--kep"]).unwrap_err();
        assert!(err.contains("--kep"), "{err}");
        assert!(parse(&["keep"]).is_err());
    }

    #[test]
    fn usage_names_every_option() {
        for option in ["--keep", "--keep-workdir", "--help", "VEN_BIN", "PCE_BIN"] {
            assert!(USAGE.contains(option), "{option}");
        }
    }
}
