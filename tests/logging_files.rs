//! The application log files (src/logging.rs) on a real file system: exact sizes through
//! rotation, a restart appending, a full disk (a tiny tmpfs, root only), and the installed
//! `log` backend sending each component to its file.

use std::fs;
use std::path::Path;
use std::time::Duration;

use ven::logdir::{LogCaps, backup_path};
use ven::logging::{self, Component, LogFiles, LoggingError, Outcome, REOPEN_INTERVAL};
use ven_lab::workdir::{Tmpfs, scratch};

const CAPS: LogCaps = LogCaps { file_max_bytes: 4096, total_max_bytes: 1 << 20 };
const CAP: u64 = 4096;

/// Line `n`: exactly 100 bytes, newline included.
fn line(n: usize) -> String {
    let head = format!("line {n:04} ");
    format!("{head}{}\n", "x".repeat(99 - head.len()))
}

fn written(outcome: Outcome) {
    assert!(matches!(outcome, Outcome::Written), "{outcome:?}");
}

fn len(path: &Path) -> u64 {
    fs::metadata(path).unwrap().len()
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path).unwrap().lines().map(str::to_owned).collect()
}

#[test]
fn the_test_caps_give_a_4096_byte_file() {
    assert_eq!(CAPS.per_file_bytes(), CAP);
}

#[test]
fn rotation_keeps_every_file_under_the_cap() {
    let dir = scratch("logging-rotation");
    let files = LogFiles::open(dir.path(), CAPS).unwrap();
    assert_eq!(files.cap(), CAP);
    let path = files.path(Component::Platform);
    let backup = backup_path(&path);

    // 40 lines fill 4000 bytes; the 41st would pass 4096, so it starts a new file.
    for n in 0..40 {
        written(files.write(Component::Platform, &line(n)));
    }
    assert_eq!(len(&path), 4000);
    assert!(!backup.exists());
    written(files.write(Component::Platform, &line(40)));
    assert_eq!(len(&backup), 4000);
    assert_eq!(len(&path), 100);
    assert_eq!(lines(&backup).last().unwrap(), line(39).trim_end());
    assert_eq!(lines(&path), [line(40).trim_end()]);

    // Twice more round: the backup is replaced, never appended to.
    for n in 41..100 {
        written(files.write(Component::Platform, &line(n)));
    }
    assert_eq!(len(&backup), 4000);
    assert_eq!(len(&path), 2000);
    assert_eq!(lines(&backup).first().unwrap(), line(40).trim_end());
    assert_eq!(lines(&backup).last().unwrap(), line(79).trim_end());
    assert_eq!(lines(&path).first().unwrap(), line(80).trim_end());
    assert_eq!(lines(&path).last().unwrap(), line(99).trim_end());

    // A line longer than the cap rotates and fills one file exactly, cut and marked.
    let long = "y".repeat(10_000);
    written(files.write(Component::Platform, &long));
    assert_eq!(len(&path), CAP);
    assert_eq!(len(&backup), 2000);
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.ends_with("y [truncated]\n"), "{}", &text[text.len() - 40..]);
    written(files.write(Component::Platform, &line(100)));
    assert_eq!(len(&backup), CAP);
    assert_eq!(lines(&path), [line(100).trim_end()]);

    // No file of log/ is past the cap, and only the platform files grew.
    for entry in fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        let size = entry.metadata().unwrap().len();
        assert!(size <= CAP, "{}: {size}", entry.path().display());
        let name = entry.file_name().into_string().unwrap();
        if !name.starts_with("platform.log") {
            assert_eq!(size, 0, "{name}");
        }
    }
    assert_eq!(files.dropped(), 0);
}

#[test]
fn a_restart_appends_and_counts_what_the_file_already_holds() {
    let dir = scratch("logging-restart");
    let path;
    {
        let files = LogFiles::open(dir.path(), CAPS).unwrap();
        path = files.path(Component::Evsync);
        for n in 0..30 {
            written(files.write(Component::Evsync, &line(n)));
        }
    }
    let files = LogFiles::open(dir.path(), CAPS).unwrap();
    assert_eq!(len(&path), 3000);
    for n in 30..40 {
        written(files.write(Component::Evsync, &line(n)));
    }
    assert_eq!(len(&path), 4000);
    assert_eq!(lines(&path).len(), 40);
    assert!(!backup_path(&path).exists());
    // The length read at start counts: the 41st line rotates.
    written(files.write(Component::Evsync, &line(40)));
    assert_eq!(len(&backup_path(&path)), 4000);
    assert_eq!(lines(&path), [line(40).trim_end()]);
}

#[test]
fn a_full_disk_drops_and_counts_lines_then_writing_resumes() {
    let Some(tmpfs) = Tmpfs::mount("logging-full", "64k") else { return };
    // A larger cap than the others, so agent.log spans a page boundary when the disk fills.
    let caps = LogCaps { file_max_bytes: 16_384, total_max_bytes: 1 << 20 };
    let files = LogFiles::open(&tmpfs.path().join("log"), caps).unwrap();
    let path = files.path(Component::Agent);
    for n in 0..40 {
        written(files.write(Component::Agent, &line(n)));
    }
    assert_eq!(len(&path), 4000);

    // Fill the rest of the file system.
    let filler = tmpfs.path().join("filler");
    {
        use std::io::Write;
        let mut file = fs::File::create(&filler).unwrap();
        let block = [0u8; 4096];
        let mut filled = 0;
        while file.write_all(&block).is_ok() {
            filled += 1;
            assert!(filled < 64, "a 64k tmpfs took more than 64 blocks");
        }
    }

    // Line 40 spans bytes 4000..4100: its first 96 bytes fit in the file's page, the rest does
    // not (4 KiB pages: x86_64 and the ARM boards). The partial line is taken back; the file holds whole lines only.
    match files.write(Component::Agent, &line(40)) {
        Outcome::Failed(LoggingError::Write { path: failed, cause }) => {
            assert_eq!(failed, path);
            assert_eq!(cause.raw_os_error(), Some(nix::libc::ENOSPC), "{cause}");
        }
        other => panic!("expected the first failure to be reported, got {other:?}"),
    }
    assert_eq!(len(&path), 4000);
    // Later lines are dropped without a try until the interval passes.
    for n in 41..46 {
        assert!(matches!(files.write(Component::Agent, &line(n)), Outcome::Dropped));
    }
    assert_eq!(files.dropped(), 6);
    // Another component fails on its own, reported once too.
    assert!(matches!(files.write(Component::Platform, &line(0)), Outcome::Failed(_)));
    assert!(matches!(files.write(Component::Platform, &line(1)), Outcome::Dropped));
    assert_eq!(files.dropped(), 8);
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 40);
    assert!(text.ends_with(&line(39)));

    // Space again: the next line after the interval is written, after saying what is missing.
    fs::remove_file(&filler).unwrap();
    std::thread::sleep(REOPEN_INTERVAL + Duration::from_millis(50));
    written(files.write(Component::Agent, &line(46)));
    let all = lines(&path);
    assert_eq!(all.len(), 42, "{all:?}");
    assert!(
        all[40].ends_with("WARN  agent: 6 lines were dropped while agent.log could not be written"),
        "{}",
        all[40]
    );
    assert_eq!(all[41], line(46).trim_end());
    written(files.write(Component::Platform, &line(2)));
    assert_eq!(lines(&files.path(Component::Platform)).len(), 2);
    assert_eq!(files.dropped(), 8);
}

#[test]
fn the_installed_logger_sends_each_component_to_its_file() {
    let dir = scratch("logging-installed");
    let log_dir = dir.path().join("log");
    logging::init();
    log::set_max_level(log::LevelFilter::Info); // whatever VEN_LOG says here
    logging::init_daemon(&log_dir, CAPS, false).unwrap();
    assert!(matches!(logging::init_daemon(&log_dir, CAPS, false), Err(LoggingError::AlreadyStarted)));

    log::error!(target: "ven::firewall::iptables", "restore failed");
    log::info!(target: "ven::agent::evsync", "connected");
    log::warn!(target: "ven::flows::pipeline", "loss");
    log::info!(target: "ven::agent::uploader", "uploaded");
    log::info!(target: "rustls::client", "handshake");
    log::info!(target: "platform", "applied policy version 4");
    log::debug!(target: "ven::agent::manager", "below the level: not written");
    for n in 0..25 {
        ven::log_limited!(target: "ven::flows::packet", log::Level::Warn, "bad packet {n}");
    }

    let read = |name: &str| fs::read_to_string(log_dir.join(name)).unwrap();
    let platform = read("platform.log");
    assert!(platform.contains(" ERROR platform: restore failed\n"), "{platform}");
    assert!(platform.contains(" INFO  platform: applied policy version 4\n"), "{platform}");
    assert!(read("evsync.log").contains(" INFO  evsync: connected\n"));
    assert!(read("logmgr.log").contains(" INFO  logmgr: uploaded\n"));
    assert_eq!(read("agent.log").lines().collect::<Vec<_>>().len(), 1);
    assert!(read("agent.log").ends_with(" INFO  agent: rustls::client: handshake\n"));
    let vtap = read("vtap.log");
    assert!(vtap.contains(" WARN  vtap: loss\n"));
    let limited = vtap.lines().filter(|l| l.contains("bad packet")).count() as u32;
    assert_eq!(limited, logging::RATE_LIMIT_BUDGET, "{vtap}");
    assert!(vtap.contains("bad packet 9\n") && !vtap.contains("bad packet 10\n"));
    assert_eq!(logging::dropped_lines(), 0);
}
