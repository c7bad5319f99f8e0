//! Network namespaces as RAII guards, for kernel tests and the lab.
//!
//! A [`Netns`] is created with a unique name (prefix, process id, counter), has its loopback up,
//! and is deleted when dropped, together with every process started through it. Code that must run
//! inside it (creating sockets, spawning `iptables-restore`) runs on a thread that has entered the
//! namespace with `setns`: sockets keep the namespace they were made in, and children spawned from
//! that thread inherit it.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sched::{CloneFlags, setns};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("entering network namespace {name}: {cause}")]
    Enter { name: String, cause: String },
}

/// Runs a command to completion; fails with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output, NetnsError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| NetnsError::Command { command: command.clone(), detail: e.to_string() })?;
    if !output.status.success() {
        return Err(NetnsError::Command {
            command,
            detail: format!("{}: {}", output.status, String::from_utf8_lossy(&output.stderr).trim()),
        });
    }
    Ok(output)
}

/// Whether this process can make network namespaces (root with iproute2 installed).
pub fn available() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("not running as root".into());
    }
    run("ip", &["-V"]).map_err(|e| format!("iproute2 missing: {e}"))?;
    Ok(())
}

/// A uniquely named network namespace, deleted on drop.
pub struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    /// Creates `<prefix>-<pid>-<n>` (at most 15 characters of prefix are kept so that interface
    /// names derived from it stay valid) with its loopback up.
    pub fn new(prefix: &str) -> Result<Self, NetnsError> {
        let prefix: String = prefix.chars().take(15).collect();
        let name = format!("{prefix}-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        run("ip", &["netns", "add", &name])?;
        let netns = Self { name, children: Vec::new() };
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <name> ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<Output, NetnsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs inside the namespace (`ip netns exec <name> PROGRAM`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    /// Runs a command inside the namespace to completion; fails with its stderr on a non-zero exit.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, NetnsError> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Starts a long-running process inside the namespace; it is killed when the namespace drops.
    pub fn spawn(&mut self, mut command: Command) -> Result<&mut Child, NetnsError> {
        let child = command
            .spawn()
            .map_err(|e| NetnsError::Command { command: format!("{command:?}"), detail: e.to_string() })?;
        self.children.push(child);
        Ok(self.children.last_mut().expect("just pushed"))
    }

    /// Runs `work` on a fresh thread that has entered this namespace, and returns its result.
    pub fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T, NetnsError> {
        let path = self.path();
        let name = self.name.clone();
        std::thread::spawn(move || {
            let file = File::open(&path)
                .map_err(|e| NetnsError::Enter { name: name.clone(), cause: e.to_string() })?;
            setns(&file, CloneFlags::CLONE_NEWNET)
                .map_err(|e| NetnsError::Enter { name: name.clone(), cause: e.to_string() })?;
            Ok(work())
        })
        .join()
        .unwrap_or_else(|_| {
            Err(NetnsError::Enter { name: self.name.clone(), cause: "thread panicked".into() })
        })
    }

    /// Path of the namespace's bind mount.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Stops the processes started with [`Netns::spawn`]: SIGTERM, then SIGKILL after `grace`.
    pub fn stop_children(&mut self, grace: std::time::Duration) {
        for child in &mut self.children {
            terminate(child, grace);
        }
        self.children.clear();
    }
}

/// Sends SIGTERM to a child, waits up to `grace`, then kills it.
pub fn terminate(child: &mut Child, grace: std::time::Duration) {
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop_children(std::time::Duration::from_secs(3));
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Joins namespaces with veth pairs on one /24, through a bridge in a namespace of its own.
pub struct Segment {
    switch: Netns,
}

impl Segment {
    /// A new, empty segment (a namespace holding bridge `br0`).
    pub fn new(prefix: &str) -> Result<Self, NetnsError> {
        let switch = Netns::new(prefix)?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        Ok(Self { switch })
    }

    /// The name of the namespace holding the bridge.
    pub fn name(&self) -> &str {
        self.switch.name()
    }

    /// Plugs `host` into the segment as interface `eth0` with address `cidr` (e.g. 198.18.0.2/24).
    pub fn attach(&self, host: &Netns, cidr: &str) -> Result<(), NetnsError> {
        let port = format!("p{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
        self.switch.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host.name(),
        ])?;
        self.switch.ip(&["link", "set", &port, "master", "br0", "up"])?;
        host.ip(&["addr", "add", cidr, "dev", "eth0"])?;
        host.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn require_netns() -> bool {
        match available() {
            Ok(()) => true,
            Err(why) if std::env::var_os("CI").is_some() => panic!("kernel test cannot run under CI: {why}"),
            Err(why) => {
                eprintln!("SKIPPED: kernel test needs network namespaces: {why}");
                false
            }
        }
    }

    #[test]
    fn two_hosts_on_a_segment_talk_and_vanish_on_drop() {
        if !require_netns() {
            return;
        }
        let segment = Segment::new("labtest-sw").unwrap();
        let a = Netns::new("labtest-a").unwrap();
        let b = Netns::new("labtest-b").unwrap();
        segment.attach(&a, "198.18.9.1/24").unwrap();
        segment.attach(&b, "198.18.9.2/24").unwrap();
        let listener = b.run(|| TcpListener::bind("198.18.9.2:7000")).unwrap().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut word = [0u8; 5];
            stream.read_exact(&mut word).unwrap();
            word
        });
        a.run(|| TcpStream::connect("198.18.9.2:7000").unwrap().write_all(b"hello").unwrap()).unwrap();
        assert_eq!(&server.join().unwrap(), b"hello");
        let path = a.path();
        drop(a);
        assert!(!path.exists(), "namespace bind mount should be gone after drop");
    }
}
