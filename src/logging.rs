//! A minimal `log` backend: one line per record on stderr, which procd, systemd and the lab
//! capture. (Rotated log files under log/ come with the flow pipeline.)

use std::io::Write;

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let component = record.target().rsplit("::").next().unwrap_or("ven");
        let line = format!(
            "{} {:<5} {component}: {}\n",
            crate::clock::rfc3339(crate::clock::now()),
            record.level(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger; the level comes from VEN_LOG (error, warn, info, debug, trace), default info.
pub fn init() {
    let level = std::env::var("VEN_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(log::LevelFilter::Info);
    if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}
