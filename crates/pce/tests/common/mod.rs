//! Shared by the PCE's end-to-end tests: a temporary data directory, a running `pce serve` on
//! 127.0.0.1 with free ports, and the admin CLI against it.
#![allow(dead_code)] // each test file uses its own part of this module

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const PCE: &str = env!("CARGO_BIN_EXE_pce");
pub const STARTUP: Duration = Duration::from_secs(30);
/// A temporary data directory, removed on drop.
pub struct DataDir(pub PathBuf);

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `pce serve`; killed on drop if the test did not stop it.
pub struct Server {
    pub child: Child,
    /// stdout lines up to and including "listening: ...".
    pub lines: Vec<String>,
}

impl Server {
    pub fn start(dir: &Path, api: u16, events: u16) -> Server {
        Server::start_with(dir, api, events, &["--heartbeat-interval", "7"])
    }

    pub fn start_with(dir: &Path, api: u16, events: u16, extra: &[&str]) -> Server {
        let mut child = Command::new(PCE)
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args([
                "--listen",
                "127.0.0.1",
                "--api-port",
                &api.to_string(),
                "--event-port",
                &events.to_string(),
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn pce serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server { child, lines: Vec::new() };
        let deadline = Instant::now() + STARTUP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("pce serve printed no listening line in time");
            let done = line.starts_with("listening: ");
            server.lines.push(line);
            if done {
                break;
            }
        }
        server
    }

    pub fn line(&self, prefix: &str) -> Option<String> {
        self.lines.iter().find_map(|line| line.strip_prefix(prefix).map(str::to_string))
    }

    /// SIGTERM, then expect a clean exit.
    pub fn stop(mut self) {
        let status =
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for pce") {
                assert!(status.success(), "pce serve exited with {status}");
                return;
            }
            assert!(Instant::now() < deadline, "pce serve ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// Runs the admin CLI against the server; returns its output.
pub fn cli(dir: &Path, api: u16, args: &[&str]) -> Output {
    Command::new(PCE)
        .arg("--data-dir")
        .arg(dir)
        .args(["--server", &format!("127.0.0.1:{api}")])
        .args(args)
        .output()
        .expect("run pce")
}

/// Runs the admin CLI and expects success; returns stdout, trimmed.
pub fn cli_ok(dir: &Path, api: u16, args: &[&str]) -> String {
    let output = cli(dir, api, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pce {args:?} failed: {stderr}");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}
