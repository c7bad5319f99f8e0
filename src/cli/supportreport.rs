//! `ven gen-supportreport`: one bounded tar file for the people who support this host; the
//! running agent builds the same in memory ([`build`]) when the PCE asks for it
//! (`agent/supportreport.rs`).
//!
//! Parts (under one directory `ven-supportreport-HOST-TIME/`): `version.txt`, `status.txt` and
//! `status.json` (`status --all`), `history.json` and each change's ruleset, `config.txt` (the
//! configuration with secret values redacted), `identity.txt` (the pairing without its token),
//! the tails of the application logs, our chains in `iptables-save`/`ip6tables-save`, our sets in
//! `ipset list`, `check-env.txt`, and `MANIFEST.txt` saying what each part holds and what was cut.
//!
//! Bounds: every part has a cap ([`MAX_PART_BYTES`], logs [`MAX_LOG_TAIL_BYTES`]), the archive
//! one ([`MAX_REPORT_BYTES`]); whatever is cut or left out is said in the manifest. Commands run
//! with a time limit and a cap on what is read from them.
//!
//! INVARIANT: no agent token, key or activation code goes into the report. The identity's token
//! and the values of secret-looking configuration keys are known secrets: every part is scrubbed
//! of their bytes after it is built, whatever put them there; log lines are also cleared of the
//! word after a secret's name (`activation code X`, `token=X`), for secrets we do not know.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use super::tar::{TarError, TarWriter};
use crate::config::Config;
use crate::history::{self, History, Listed};
use crate::state::{self, DataDir, Identity, RecordKind};

/// The whole report, end blocks included.
pub const MAX_REPORT_BYTES: usize = 4 * 1024 * 1024;
/// Any one part but the logs.
pub const MAX_PART_BYTES: usize = 512 * 1024;
/// The tail kept of each application log (with its backup when the log itself is shorter).
pub const MAX_LOG_TAIL_BYTES: usize = 256 * 1024;
/// Kept free for the manifest, which is written last.
const MANIFEST_RESERVE: usize = 16 * 1024;
/// How long one command may run, and how much of its output is read.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_COMMAND_OUTPUT: usize = 16 * 1024 * 1024;
const MAX_COMMAND_STDERR: usize = 16 * 1024;
/// Most bytes of the host name that go into the directory name.
const MAX_HOST_IN_NAME: usize = 32;
/// Secrets shorter than this are not scrubbed byte for byte (they would match everywhere); the
/// configuration's line redaction still hides them.
const MIN_SCRUBBED_SECRET: usize = 4;
const REDACTED: &str = "[redacted]";
/// Names of secrets: a configuration key containing one has its value redacted; in logs the word
/// after one is.
const SECRET_NAMES: [&str; 8] = [
    "token",
    "secret",
    "password",
    "passphrase",
    "private",
    "activation_code",
    "activation-code",
    "activation code",
];

#[derive(Debug, thiserror::Error)]
pub enum SupportError {
    #[error("cannot write the support report {path}: {cause}")]
    Write { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    Tar(#[from] TarError),
}

/// One file of the report before it is bounded and scrubbed.
struct Part {
    name: String,
    content: Vec<u8>,
    /// Keep the end rather than the start when it must be cut (logs).
    keep_tail: bool,
    cap: usize,
    /// Said in the manifest (how it was made, what failed, what was cut reading it).
    note: String,
    /// Already cut while it was read (a log's tail).
    cut: bool,
}

impl Part {
    fn text(name: impl Into<String>, content: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            content: content.into().into_bytes(),
            keep_tail: false,
            cap: MAX_PART_BYTES,
            note: note.into(),
            cut: false,
        }
    }
}

/// What was written, for the command's output.
pub struct Written {
    pub path: PathBuf,
    pub bytes: usize,
    pub parts: usize,
    pub cut: usize,
}

/// The default report path: in the temporary directory, named after the host and the time.
pub fn default_path(now: u64) -> PathBuf {
    std::env::temp_dir().join(format!("{}.tar", base_name(now)))
}

fn base_name(now: u64) -> String {
    let host: String = crate::agent::host::system_hostname()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(MAX_HOST_IN_NAME)
        .collect();
    let stamp: String = crate::clock::rfc3339(now).chars().filter(char::is_ascii_alphanumeric).collect();
    format!("ven-supportreport-{}-{stamp}", if host.is_empty() { "host" } else { &host })
}

/// Builds the report and writes it to `path` (mode 0600, replacing nothing half-written).
pub fn generate(data: &DataDir, path: &Path, now: u64) -> Result<Written, SupportError> {
    let (archive, parts, cut) = build_counted(data, now)?;
    write_private(path, &archive)?;
    Ok(Written { path: path.to_path_buf(), bytes: archive.len(), parts, cut })
}

/// Builds the report in memory (at most [`MAX_REPORT_BYTES`]): what the agent uploads when the
/// PCE asks for one.
pub fn build(data: &DataDir, now: u64) -> Result<Vec<u8>, SupportError> {
    build_counted(data, now).map(|(archive, _, _)| archive)
}

/// The archive, its number of parts and how many were cut or left out.
fn build_counted(data: &DataDir, now: u64) -> Result<(Vec<u8>, usize, usize), SupportError> {
    let scrubber = Scrubber::for_host(data);
    let parts = gather(data, now);
    Ok(assemble(&base_name(now), parts, &scrubber, now)?)
}

/// Bounds and scrubs each part, tars them with the manifest; returns the archive, the number of
/// parts and how many were cut or left out.
fn assemble(
    dir: &str,
    parts: Vec<Part>,
    scrubber: &Scrubber,
    now: u64,
) -> Result<(Vec<u8>, usize, usize), TarError> {
    let mut tar = TarWriter::new(MAX_REPORT_BYTES, now);
    let mut manifest = format!(
        "ven support report, {} (ven {} {})\nlimits: {MAX_REPORT_BYTES} bytes in all, {MAX_PART_BYTES} a part, \
         {MAX_LOG_TAIL_BYTES} a log tail\nsecrets: {} known secret(s) (the agent token, secret configuration \
         values) scrubbed from every part; words after a secret's name redacted\n\n",
        crate::clock::rfc3339(now),
        env!("CARGO_PKG_VERSION"),
        super::TARGET,
        scrubber.secrets.len(),
    );
    let (mut count, mut cut) = (0, 0);
    for part in parts {
        let name = format!("{dir}/{}", part.name);
        let mut content = scrubber.scrub(&part.content);
        let full = content.len();
        let cap = part.cap.min(tar.room().saturating_sub(MANIFEST_RESERVE));
        let mut said = String::new();
        if part.cut && full <= cap {
            cut += 1;
        }
        if full > cap {
            cut += 1;
            if part.keep_tail {
                content.drain(..full - cap);
                said = format!("cut: the last {cap} of {full} bytes kept");
            } else {
                content.truncate(cap);
                said = format!("cut: the first {cap} of {full} bytes kept");
            }
        }
        if content.is_empty() && full > 0 {
            manifest.push_str(&format!("{:<40} left out: no room ({full} bytes)\n", part.name));
            continue;
        }
        tar.add(&name, &content)?;
        count += 1;
        let note =
            [part.note.as_str(), said.as_str()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>();
        manifest.push_str(&format!("{:<40} {:>8} bytes  {}\n", part.name, content.len(), note.join("; ")));
    }
    // Notes carry error messages, which may quote a configuration line.
    let mut manifest = scrubber.scrub(redact_markers(&manifest).as_bytes());
    manifest.truncate(MANIFEST_RESERVE.min(tar.room()));
    tar.add(&format!("{dir}/MANIFEST.txt"), &manifest)?;
    Ok((tar.finish(), count + 1, cut))
}

/// Writes `bytes` to a temporary file beside `path` (mode 0600 from creation) and renames it.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SupportError> {
    use std::io::Write;
    let write_error = |cause| SupportError::Write { path: path.to_path_buf(), cause };
    let mut temp = path.as_os_str().to_owned();
    temp.push(format!(".tmp{}", std::process::id()));
    let temp = PathBuf::from(temp);
    let _ = std::fs::remove_file(&temp);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written.map_err(write_error)
}

/// Every part, in the order of the archive.
fn gather(data: &DataDir, now: u64) -> Vec<Part> {
    let (config, config_note) = match Config::load() {
        Ok(config) => (config, String::new()),
        Err(e) => (Config::default(), format!("the configuration does not load ({e}); defaults used")),
    };
    let mut parts = vec![version_part(data, now)];
    match super::status_report(data) {
        Ok(report) => {
            parts.push(Part::text("status.txt", report.to_human_all(now), "ven status --all"));
            parts.push(Part::text("status.json", report.to_json_all(), "ven status --all --json"));
        }
        Err(e) => parts.push(Part::text("status.txt", format!("no status: {e}\n"), "failed")),
    }
    parts.extend(history_parts(data));
    parts.push(config_part(&config_note));
    parts.push(identity_part(data));
    parts.extend(log_parts(data));
    parts.extend(firewall_parts(&config));
    let checks = super::check_env::run(data, &config);
    parts.push(Part::text("check-env.txt", super::check_env::render(&checks), "ven check-env"));
    parts
}

fn version_part(data: &DataDir, now: u64) -> Part {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let os = read("/etc/os-release")
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|name| name.trim_matches('"').to_string())
        .unwrap_or_else(|| "unknown".to_string());
    let text = format!(
        "ven {} ({})\nreport time: {}\nhostname: {}\nos: {os}\nkernel: {}\ndata directory: {}\n",
        env!("CARGO_PKG_VERSION"),
        super::TARGET,
        crate::clock::rfc3339(now),
        crate::agent::host::system_hostname(),
        read("/proc/version").trim(),
        data.root().display(),
    );
    Part::text("version.txt", text, "ven version, /etc/os-release, /proc/version")
}

fn history_parts(data: &DataDir) -> Vec<Part> {
    let history = History::new(data);
    let entries = match history.list() {
        Ok(entries) => entries,
        Err(e) => {
            return vec![Part::text(
                "history.json",
                format!("{{\"error\":{:?}}}\n", e.to_string()),
                "failed",
            )];
        }
    };
    let mut parts = vec![Part::text("history.json", history::render_json(&entries), "ven history --json")];
    for entry in &entries {
        if let Listed::Entry(entry) = entry {
            parts.push(Part::text(
                format!("history/{:08}.txt", entry.seq),
                history::render_entry(entry),
                format!("ven history --show {}", entry.seq),
            ));
        }
    }
    parts
}

fn config_path() -> PathBuf {
    std::env::var_os("VEN_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::config::DEFAULT_CONFIG_PATH.into())
}

/// The configuration file as it is, each secret-looking key's value redacted.
fn config_part(load_note: &str) -> Part {
    let path = config_path();
    let text = match read_capped(&path, MAX_PART_BYTES) {
        // Lines that are not KEY = VALUE are kept as they are, so they get the log treatment.
        Ok((bytes, _)) => redact_markers(&redact_config(&String::from_utf8_lossy(&bytes)).0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "(no configuration file: defaults)\n".into(),
        Err(e) => format!("(cannot read it: {e})\n"),
    };
    let mut note = format!("{}, secret values redacted", path.display());
    if !load_note.is_empty() {
        note.push_str("; ");
        note.push_str(load_note);
    }
    Part::text("config.txt", text, note)
}

/// The pairing, without the agent token.
fn identity_part(data: &DataDir) -> Part {
    let text = match state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity) {
        Ok(Some(identity)) => format!(
            "agent id: {}\nhostname: {}\nmanagement server: {}\nevent port: {}\nCA fingerprint: {}\n\
             heartbeat interval: {} s\nactivated at: {}\nagent token: {REDACTED}\n",
            identity.agent_id,
            identity.hostname,
            identity.management_server,
            identity.event_port,
            crate::agent::tls::fingerprint(&identity.ca_cert_der),
            identity.heartbeat_interval_s,
            crate::clock::rfc3339(identity.activated_at),
        ),
        Ok(None) => "not activated\n".to_string(),
        Err(e) => format!("unreadable: {e}\n"),
    };
    Part::text("identity.txt", text, "state/identity without the agent token")
}

fn log_parts(data: &DataDir) -> Vec<Part> {
    let dir = data.log_dir();
    crate::logdir::LOG_FILES
        .iter()
        .map(|name| {
            let current = dir.join(name);
            let backup = crate::logdir::backup_path(&current);
            // The backup's end first when the current file alone is shorter than the tail.
            let mut content = Vec::new();
            let mut note = format!("log/{name}");
            let current_len = std::fs::metadata(&current).map_or(0, |m| m.len() as usize);
            if current_len < MAX_LOG_TAIL_BYTES {
                if let Ok((bytes, _)) = tail(&backup, MAX_LOG_TAIL_BYTES - current_len) {
                    if !bytes.is_empty() {
                        note = format!("the end of log/{name}.1, then log/{name}");
                        content = bytes;
                    }
                }
            }
            let mut cut = false;
            match tail(&current, MAX_LOG_TAIL_BYTES) {
                Ok((bytes, more)) => {
                    if more {
                        cut = true;
                        note.push_str(&format!(
                            "; cut: the last {} of {current_len} bytes kept",
                            bytes.len()
                        ));
                    }
                    content.extend_from_slice(&bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => note.push_str(" (none)"),
                Err(e) => note.push_str(&format!(" (unreadable: {e})")),
            }
            let text = redact_markers(&String::from_utf8_lossy(&content));
            Part {
                name: format!("log/{name}"),
                content: text.into_bytes(),
                keep_tail: true,
                cap: MAX_LOG_TAIL_BYTES,
                note,
                cut,
            }
        })
        .collect()
}

/// Our chains from each family's save tool, our sets from `ipset list`.
fn firewall_parts(config: &Config) -> Vec<Part> {
    let tools = crate::firewall::backend::select(config.firewall_backend);
    let mut parts = Vec::new();
    for (file, program) in [
        ("firewall/iptables-save.txt", &tools.iptables_save),
        ("firewall/ip6tables-save.txt", &tools.ip6tables_save),
    ] {
        let note = format!("{}, ven's chains and jumps only", program.display());
        parts.push(match run_capped(program, &[]) {
            Ok(out) => Part::text(file, ours_in_save(&out), note),
            Err(e) => Part::text(file, format!("({e})\n"), format!("{} failed", program.display())),
        });
    }
    parts.push(match run_capped(&tools.ipset, &["list"]) {
        Ok(out) => {
            Part::text("firewall/ipset-list.txt", ours_in_ipset_list(&out), "ipset list, ven's sets only")
        }
        Err(e) => Part::text("firewall/ipset-list.txt", format!("({e})\n"), "ipset list failed"),
    });
    parts
}

/// The tables of an `iptables-save` output that hold something of ours, with only our lines.
pub(crate) fn ours_in_save(text: &str) -> String {
    let mut out = String::new();
    let mut table = "";
    let mut lines: Vec<&str> = Vec::new();
    for line in text.lines() {
        if line.starts_with('*') {
            table = line;
            lines.clear();
        } else if line == "COMMIT" {
            if !lines.is_empty() {
                out.push_str(table);
                out.push('\n');
                for line in &lines {
                    out.push_str(line);
                    out.push('\n');
                }
                out.push_str("COMMIT\n");
            }
        } else if line.contains("VEN-") || line.contains("ven:") {
            lines.push(line);
        }
    }
    if out.is_empty() {
        out.push_str("(nothing of ven's)\n");
    }
    out
}

/// The blocks of an `ipset list` output whose set is ours (`ven-...`).
pub(crate) fn ours_in_ipset_list(text: &str) -> String {
    let mut out = String::new();
    let mut ours = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("Name: ") {
            ours = name.trim().starts_with("ven-");
        }
        if ours {
            out.push_str(line);
            out.push('\n');
        }
    }
    if out.is_empty() {
        out.push_str("(no set of ven's)\n");
    }
    out
}

/// The first `cap` bytes of a file, and whether there was more.
fn read_capped(path: &Path, cap: usize) -> std::io::Result<(Vec<u8>, bool)> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.take(cap as u64 + 1).read_to_end(&mut bytes)?;
    let more = bytes.len() > cap;
    bytes.truncate(cap);
    Ok((bytes, more))
}

/// The last `cap` bytes of a file, from the start of a line; and whether there was more.
fn tail(path: &Path, cap: usize) -> std::io::Result<(Vec<u8>, bool)> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let start = len.saturating_sub(cap as u64);
    file.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    file.take(cap as u64).read_to_end(&mut bytes)?;
    if start > 0 {
        // Drop the partial first line.
        let cut = bytes.iter().position(|&b| b == b'\n').map_or(bytes.len(), |at| at + 1);
        bytes.drain(..cut);
    }
    Ok((bytes, start > 0))
}

/// Runs `program` with a time limit ([`COMMAND_TIMEOUT`]) and reads at most
/// [`MAX_COMMAND_OUTPUT`] of its output; a failure is the command's status and stderr.
fn run_capped(program: &Path, args: &[&str]) -> Result<String, String> {
    let shown = program.display().to_string();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{shown}: {e}"))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (done, finished) = mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let timed_out = finished.recv_timeout(COMMAND_TIMEOUT) == Err(mpsc::RecvTimeoutError::Timeout);
        if timed_out {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        timed_out
    });
    let stderr = child.stderr.take().map(|stderr| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut stderr = stderr;
            let _ = (&mut stderr).take(MAX_COMMAND_STDERR as u64).read_to_end(&mut bytes);
            // Drain the rest so the command never blocks on a full pipe.
            let _ = std::io::copy(&mut stderr, &mut std::io::sink());
            bytes
        })
    });
    let mut out = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        let _ = stdout.take(MAX_COMMAND_OUTPUT as u64).read_to_end(&mut out);
    }
    if out.len() >= MAX_COMMAND_OUTPUT {
        let _ = child.kill();
    }
    let status = child.wait();
    let _ = done.send(());
    let timed_out = watchdog.join().unwrap_or(false);
    let stderr = stderr.and_then(|reader| reader.join().ok()).unwrap_or_default();
    if timed_out {
        return Err(format!("{shown} did not finish within {} s", COMMAND_TIMEOUT.as_secs()));
    }
    match status {
        Ok(status) if status.success() || out.len() >= MAX_COMMAND_OUTPUT => {
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        Ok(status) => Err(format!("{shown}: {status}: {}", String::from_utf8_lossy(&stderr).trim())),
        Err(e) => Err(format!("{shown}: {e}")),
    }
}

/// Whether a configuration key names a secret.
fn secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|name| key.contains(name)) || key.ends_with("_key") || key == "key"
}

/// The configuration text with the value of every secret-looking key replaced; and the values
/// taken out (to scrub from the other parts).
fn redact_config(text: &str) -> (String, Vec<String>) {
    let mut out = String::with_capacity(text.len());
    let mut values = Vec::new();
    for line in text.lines() {
        let body = line.split('#').next().unwrap_or("");
        match body.split_once('=') {
            Some((key, value)) if secret_key(key.trim()) => {
                if !value.trim().is_empty() {
                    values.push(value.trim().to_string());
                }
                out.push_str(&format!("{} = {REDACTED}\n", key.trim()));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    (out, values)
}

/// Each line with the word after a secret's name (`token=X`, `activation code: X`) replaced.
fn redact_markers(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let lower = line.to_ascii_lowercase();
        let mut redact: Vec<(usize, usize)> = Vec::new();
        for name in SECRET_NAMES {
            let mut from = 0;
            while let Some(found) = lower[from..].find(name) {
                let after = from + found + name.len();
                let bytes = line.as_bytes();
                let mut start = after;
                while start < bytes.len() && matches!(bytes[start], b' ' | b':' | b'=' | b'"' | b'\'') {
                    start += 1;
                }
                let mut end = start;
                while end < bytes.len()
                    && !matches!(bytes[end], b' ' | b'"' | b'\'' | b',' | b';' | b'\n' | b'\r')
                {
                    end += 1;
                }
                if end > start && start > after {
                    redact.push((start, end));
                }
                from = after;
            }
        }
        redact.sort_unstable();
        let mut at = 0;
        for (start, end) in redact {
            if start < at {
                continue;
            }
            out.push_str(&line[at..start]);
            out.push_str(REDACTED);
            at = end;
        }
        out.push_str(&line[at..]);
    }
    out
}

/// The secrets this host holds, scrubbed byte for byte from every part.
struct Scrubber {
    secrets: Vec<Vec<u8>>,
}

impl Scrubber {
    fn for_host(data: &DataDir) -> Self {
        let mut secrets = Vec::new();
        if let Ok(Some(identity)) =
            state::read_record::<Identity>(&data.identity_path(), RecordKind::Identity)
        {
            secrets.push(identity.agent_token.into_bytes());
        }
        if let Ok((bytes, _)) = read_capped(&config_path(), MAX_PART_BYTES) {
            let (_, values) = redact_config(&String::from_utf8_lossy(&bytes));
            secrets.extend(values.into_iter().map(String::into_bytes));
        }
        Self::new(secrets)
    }

    fn new(mut secrets: Vec<Vec<u8>>) -> Self {
        secrets.retain(|secret| secret.len() >= MIN_SCRUBBED_SECRET);
        // Longest first, so that a secret containing another is replaced whole.
        secrets.sort_by_key(|secret| std::cmp::Reverse(secret.len()));
        Self { secrets }
    }

    fn scrub(&self, content: &[u8]) -> Vec<u8> {
        let mut out = content.to_vec();
        for secret in &self.secrets {
            let mut scrubbed = Vec::with_capacity(out.len());
            let mut at = 0;
            while at < out.len() {
                if out[at..].starts_with(secret) {
                    scrubbed.extend_from_slice(REDACTED.as_bytes());
                    at += secret.len();
                } else {
                    scrubbed.push(out[at]);
                    at += 1;
                }
            }
            out = scrubbed;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_scrubbed_and_named_secrets_redacted() {
        let scrubber = Scrubber::new(vec![b"tok-123456".to_vec(), b"ab".to_vec()]);
        assert_eq!(scrubber.scrub(b"x tok-123456 y tok-123456"), b"x [redacted] y [redacted]");
        assert_eq!(scrubber.scrub(b"ab stays"), b"ab stays", "too short to scrub blindly");
        let line = "2026 activation code ABC123 used; agent_token=zz9 \"password\": \"hunter2\"\n";
        let redacted = redact_markers(line);
        for secret in ["ABC123", "zz9", "hunter2"] {
            assert!(!redacted.contains(secret), "{redacted}");
        }
        assert!(redacted.starts_with("2026 activation code [redacted] used;"), "{redacted}");
        let (config, values) =
            redact_config("nflog_group = 7\nactivation_code = s3cret # x\nrelease_key=k\n");
        assert_eq!(config, "nflog_group = 7\nactivation_code = [redacted]\nrelease_key = [redacted]\n");
        assert_eq!(values, ["s3cret", "k"]);
        let malformed = redact_markers(&redact_config("api_token: zz9-secret\n").0);
        assert!(!malformed.contains("zz9-secret"), "{malformed}");
    }

    #[test]
    fn only_our_chains_and_sets_are_kept() {
        let save = "# Generated\n*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j DNAT --to 1.2.3.4\nCOMMIT\n\
                    *filter\n:INPUT ACCEPT [0:0]\n:VEN-INPUT - [0:0]\n-A INPUT -m comment --comment ven:jump -j VEN-INPUT\n\
                    -A INPUT -p tcp --dport 80 -j ACCEPT\n-A VEN-INPUT -i lo -j ACCEPT\nCOMMIT\n";
        assert_eq!(
            ours_in_save(save),
            "*filter\n:VEN-INPUT - [0:0]\n-A INPUT -m comment --comment ven:jump -j VEN-INPUT\n\
             -A VEN-INPUT -i lo -j ACCEPT\nCOMMIT\n"
        );
        let list = "Name: other\nType: hash:ip\nMembers:\n10.0.0.1\n\nName: ven-3\nType: hash:net\nMembers:\n198.18.0.2\n";
        assert_eq!(ours_in_ipset_list(list), "Name: ven-3\nType: hash:net\nMembers:\n198.18.0.2\n");
    }

    #[test]
    fn parts_are_capped_and_the_manifest_says_so() {
        let scrubber = Scrubber::new(vec![b"SECRET-TOKEN".to_vec()]);
        let big = Part {
            name: "log/agent.log".into(),
            content: format!("{}SECRET-TOKEN end\n", "x".repeat(MAX_LOG_TAIL_BYTES)).into_bytes(),
            keep_tail: true,
            cap: MAX_LOG_TAIL_BYTES,
            note: String::new(),
            cut: false,
        };
        let small = Part::text("version.txt", "ven\n", "");
        let (archive, parts, cut) = assemble("r", vec![big, small], &scrubber, 0).unwrap();
        assert_eq!((parts, cut), (3, 1));
        assert!(archive.len() <= MAX_REPORT_BYTES);
        assert!(!archive.windows(12).any(|w| w == b"SECRET-TOKEN"));
        let text = String::from_utf8_lossy(&archive);
        assert!(text.contains("[redacted] end"), "the tail is kept");
        assert!(text.contains("cut: the last"), "the manifest says what was cut");
    }
}
