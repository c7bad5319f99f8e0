//! The agent's configuration: one `key = value` file (default `/etc/ven/ven.conf`, or
//! `$VEN_CONFIG`), the same format as the board profiles in `board-configs/`, which are installed
//! as that file on their board.
//!
//! Format: one setting per line, `#` starts a comment, lists are comma-separated, durations are
//! seconds. Keys under `board.` describe the build (target triple, name) and are not read by the
//! agent. A bad value of a known key is an error naming the file and line: a typo in a value must
//! not silently leave a default in force on a device nobody watches. An unknown key is only a
//! warning (logged at start and shown by `ven status`): a rollback to an older binary, or a key
//! an operator added for a newer one, must never leave an appliance without its agent.
//!
//! A missing file means every default (a generic Linux host).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ven_proto::Protocol;

/// Where the configuration is read from unless `$VEN_CONFIG` names another file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ven/ven.conf";
/// Largest configuration file read (a board profile is a few hundred bytes).
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Which iptables implementation programs the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// Detect at start the way Calico Felix does (see `firewall::backend`).
    Auto,
    Legacy,
    Nft,
}

/// Direction of a fail-safe service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceDirection {
    /// The host serves it (e.g. SSH): new connections to this port are accepted.
    Inbound,
    /// The host uses it (e.g. DNS, DHCP): new connections to this port are allowed out.
    Outbound,
}

/// A service the board needs whatever the policy says (never lock the operator out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub direction: ServiceDirection,
    /// Tcp or Udp.
    pub protocol: Protocol,
    pub port: u16,
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let direction = match self.direction {
            ServiceDirection::Inbound => "",
            ServiceDirection::Outbound => "out:",
        };
        write!(f, "{direction}{}/{}", self.protocol.as_str(), self.port)
    }
}

impl std::str::FromStr for Service {
    type Err = String;
    /// `tcp/22` (inbound) or `out:udp/53`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (direction, rest) = match text.strip_prefix("out:") {
            Some(rest) => (ServiceDirection::Outbound, rest),
            None => (ServiceDirection::Inbound, text.strip_prefix("in:").unwrap_or(text)),
        };
        let (protocol, port) =
            rest.split_once('/').ok_or_else(|| format!("{text:?} is not PROTOCOL/PORT (e.g. tcp/22)"))?;
        let protocol = match protocol {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => return Err(format!("{text:?}: a service is tcp or udp")),
        };
        let port: u16 = port.parse().map_err(|_| format!("{text:?}: {port:?} is not a port"))?;
        if port == 0 {
            return Err(format!("{text:?}: port 0 is not a service"));
        }
        Ok(Self { direction, protocol, port })
    }
}

/// Largest policy the board accepts; a bigger one is rejected whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub max_rules: usize,
    pub max_sets: usize,
    pub max_set_members: usize,
    pub max_custom_rules: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Self { max_rules: 20_000, max_sets: 4096, max_set_members: 131_072, max_custom_rules: 256 }
    }
}

/// Every setting of the agent, with defaults for a generic Linux host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub firewall_backend: BackendChoice,
    /// Program ip6tables and `inet6` sets too.
    pub ipv6: bool,
    /// The host routes: FORWARD also jumps to our chain (custom forward rules live there).
    pub routes: bool,
    pub failsafe_services: Vec<Service>,
    /// Interfaces the policy does not apply to: their traffic returns to the host's own rules.
    pub ignored_interfaces: Vec<String>,
    /// NFLOG group of our log rules (the flow pipeline binds it).
    pub nflog_group: u16,
    pub caps: Caps,
    /// Full comparison of kernel and policy (rules and every set member): the spec's 10 minutes.
    pub tamper_check_interval: Duration,
    /// Cheap comparison of our rules and set sizes, to catch flushes and deletions fast.
    pub canary_interval: Duration,
    /// The full host report (interfaces and addresses) goes to the PCE at least this often,
    /// changed or not, so that the PCE's view heals (the spec's 5 minutes); changes go at once.
    pub interface_report_interval: Duration,
    /// How often the listening services are read; they go to the PCE when they changed (the
    /// spec's 30 seconds).
    pub service_report_interval: Duration,
    /// `nf_conntrack_tcp_timeout_established` set at start; `None` leaves the host's value.
    pub conntrack_established_timeout: Option<u32>,
    /// Turn `nf_conntrack_acct` on at start (`conntrack_accounting`, default on): accepted flows'
    /// bytes come from it. Off leaves the host's value.
    pub conntrack_accounting: bool,
    /// Delete the conntrack entries of connections a tightened policy no longer allows.
    pub conntrack_cut_on_tighten: bool,
    /// A copy of the agent the PCE takes for a clone (issue 16) re-pairs on its own as a new
    /// workload, from the pairing profile the original came from, when that profile allows it.
    /// Off: it keeps its last-known-good policy and `ven status` says what to do.
    pub clone_reactivate: bool,
    pub flows: FlowSettings,
    /// Sizes of the files in log/ ([`crate::logdir`]).
    pub logs: crate::logdir::LogCaps,
    /// Keys this version does not know, ignored: `key (line N)`, the first
    /// [`MAX_UNKNOWN_KEYS_KEPT`].
    pub unknown_keys: Vec<String>,
    /// Test-only fault switch (`test_fault`): makes a named thread fail at its start, to test
    /// the agent's supervision ([`crate::agent::monitor`]). Off unless set.
    pub test_fault: Option<crate::agent::monitor::Fault>,
    /// The Ed25519 public key agent releases must be signed with (`release_key`, 64 hex
    /// digits); unset: the one `ven activate --release-key` pinned, if any.
    pub release_key: Option<[u8; 32]>,
    /// Who installs new releases the PCE orders (`upgrade_mode`).
    pub upgrade_mode: UpgradeMode,
    /// How long a new release has to report healthy before it is rolled back
    /// (`upgrade_health_deadline_s`).
    pub upgrade_health_deadline: Duration,
    /// Test-only switch (`test_upgrade_kill`): SIGKILL at an upgrade step, as a power loss would.
    pub test_upgrade_kill: Option<crate::agent::upgrade::KillStep>,
    /// Test-only switch (`test_upgrade_unhealthy`): a release on trial never counts as healthy,
    /// so that tests can show the rollback at the deadline.
    pub test_upgrade_unhealthy: bool,
}

/// Who installs the releases the PCE orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeMode {
    /// `package` when a package manager (dpkg, opkg) installed the agent, else `self`.
    Auto,
    /// The agent upgrades itself: signed download, trial, commit or rollback.
    SelfUpgrade,
    /// The package manager does: the agent reports the order as deferred and changes nothing.
    Package,
}

/// Where dpkg and opkg list the files of the installed `ven` package.
const PACKAGE_FILE_LISTS: [&str; 2] = ["/var/lib/dpkg/info/ven.list", "/usr/lib/opkg/info/ven.list"];

impl UpgradeMode {
    /// `Auto` decided for this host.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if PACKAGE_FILE_LISTS.iter().any(|list| Path::new(list).exists()) => Self::Package,
            Self::Auto => Self::SelfUpgrade,
            decided => decided,
        }
    }
}

/// Unknown keys remembered for the warning (all of them are ignored).
pub const MAX_UNKNOWN_KEYS_KEPT: usize = 16;

/// The flow pipeline's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSettings {
    /// Most flows counted between two flushes (about 108 bytes of RAM each); beyond it, new flows
    /// fold into one overflow record per verdict.
    pub tracked_flows: usize,
    /// How often the counted flows are written to flow.db and flowsum.db; a crash loses at most
    /// this much.
    pub flush_interval: Duration,
    /// How often flow summaries are sent to the PCE (jittered by ±10 %): the spec's 10 minutes.
    pub upload_interval: Duration,
    /// Logged packets per second above which, sustained, the pipeline samples (0: never).
    pub sampling_threshold: u32,
    /// Most 5-tuples the connection table tracks (72 bytes of RAM each at the cap); beyond it,
    /// packets of new tuples each count as a connection, counted as overflow in `ven status`.
    /// `None`: as many as `tracked_flows`, so a board's flow cap bounds both tables.
    pub tracked_connections: Option<usize>,
    /// Most accepted connections waiting for conntrack's account of their bytes
    /// (`flow_accounted_connections`; 92 bytes each plus the map's slack; 0: accepted flows
    /// carry no bytes). `None`: `ACCOUNTED_CONNECTIONS_DEFAULT` or `tracked_flows` if smaller.
    pub accounted_connections_setting: Option<usize>,
    /// How long a tuple not seen again stays one connection: the kernel's unreplied timeouts
    /// (`flow_connection_timeout_{tcp,udp,icmp}_s`; other protocols use the UDP one).
    pub connection_timeouts: crate::flows::Timeouts,
}

/// Accepted connections waiting for their bytes, unless configured or `tracked_flows` is smaller.
pub const ACCOUNTED_CONNECTIONS_DEFAULT: usize = 16_384;

impl FlowSettings {
    /// Most accepted connections waiting for conntrack's account of their bytes (0: none).
    pub fn accounted_connections(&self) -> usize {
        self.accounted_connections_setting.unwrap_or(ACCOUNTED_CONNECTIONS_DEFAULT.min(self.tracked_flows))
    }
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            tracked_flows: 100_000,
            flush_interval: Duration::from_secs(60),
            upload_interval: Duration::from_secs(600),
            sampling_threshold: 100_000,
            tracked_connections: None,
            accounted_connections_setting: None,
            connection_timeouts: crate::flows::Timeouts::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            firewall_backend: BackendChoice::Auto,
            ipv6: true,
            routes: false,
            // SSH stays reachable on a generic host; board profiles name their own services.
            failsafe_services: vec![Service {
                direction: ServiceDirection::Inbound,
                protocol: Protocol::Tcp,
                port: 22,
            }],
            ignored_interfaces: Vec::new(),
            nflog_group: 7,
            caps: Caps::default(),
            tamper_check_interval: Duration::from_secs(600),
            canary_interval: Duration::from_secs(5),
            interface_report_interval: Duration::from_secs(300),
            service_report_interval: Duration::from_secs(30),
            conntrack_established_timeout: Some(28_800),
            conntrack_accounting: true,
            conntrack_cut_on_tighten: true,
            clone_reactivate: false,
            flows: FlowSettings::default(),
            logs: crate::logdir::LogCaps::default(),
            unknown_keys: Vec::new(),
            test_fault: None,
            release_key: None,
            upgrade_mode: UpgradeMode::Auto,
            upgrade_health_deadline: Duration::from_secs(300),
            test_upgrade_kill: None,
            test_upgrade_unhealthy: false,
        }
    }
}

/// Why the configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {cause}", path.display())]
    Read { path: PathBuf, cause: std::io::Error },
    #[error("{} is larger than {MAX_CONFIG_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}:{line}: {problem}", path.display())]
    Invalid { path: PathBuf, line: usize, problem: String },
}

impl Config {
    /// The file `$VEN_CONFIG` names, else [`DEFAULT_CONFIG_PATH`]; defaults when that is absent.
    pub fn load() -> Result<Self, ConfigError> {
        match std::env::var_os("VEN_CONFIG") {
            Some(path) => Self::read(Path::new(&path)),
            None => match Self::read(Path::new(DEFAULT_CONFIG_PATH)) {
                Err(ConfigError::Read { cause, .. }) if cause.kind() == std::io::ErrorKind::NotFound => {
                    Ok(Self::default())
                }
                other => other,
            },
        }
    }

    /// Reads one configuration file (it must exist).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let read_error = |cause| ConfigError::Read { path: path.to_path_buf(), cause };
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        if metadata.len() > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge { path: path.to_path_buf() });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Self::parse(&text).map_err(|(line, problem)| ConfigError::Invalid {
            path: path.to_path_buf(),
            line,
            problem,
        })
    }

    /// Parses the text of a configuration file; the error names the line (1-based).
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut config = Self::default();
        for (index, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err((index + 1, format!("{line:?} is not KEY = VALUE")));
            };
            let key = key.trim();
            let known = config.set(key, value.trim()).map_err(|problem| (index + 1, problem))?;
            if !known && config.unknown_keys.len() < MAX_UNKNOWN_KEYS_KEPT {
                config.unknown_keys.push(format!("{key} (line {})", index + 1));
            }
        }
        Ok(config)
    }

    /// Sets `key`; `Ok(false)` when this version does not know it.
    fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "firewall_backend" => {
                self.firewall_backend = match value {
                    "auto" => BackendChoice::Auto,
                    "legacy" => BackendChoice::Legacy,
                    "nft" => BackendChoice::Nft,
                    _ => return Err(format!("firewall_backend is auto, legacy or nft, not {value:?}")),
                }
            }
            "ipv6" => self.ipv6 = boolean(key, value)?,
            "routes" => self.routes = boolean(key, value)?,
            "failsafe_services" => {
                self.failsafe_services = list(value).map(str::parse).collect::<Result<_, _>>()?;
                self.failsafe_services.sort();
                self.failsafe_services.dedup();
            }
            "ignored_interfaces" => {
                self.ignored_interfaces = list(value)
                    .map(|name| interface_name(name).map(str::to_string))
                    .collect::<Result<_, _>>()?;
            }
            "nflog_group" => self.nflog_group = number(key, value, 0, u64::from(u16::MAX))? as u16,
            "max_rules" => self.caps.max_rules = number(key, value, 1, 1_000_000)? as usize,
            "max_sets" => self.caps.max_sets = number(key, value, 1, 65_536)? as usize,
            "max_set_members" => self.caps.max_set_members = number(key, value, 1, 1 << 24)? as usize,
            "max_custom_rules" => self.caps.max_custom_rules = number(key, value, 0, 10_000)? as usize,
            "tamper_check_interval_s" => {
                self.tamper_check_interval = Duration::from_secs(number(key, value, 1, 86_400)?)
            }
            "canary_interval_s" => self.canary_interval = Duration::from_secs(number(key, value, 1, 86_400)?),
            "service_report_interval_s" => {
                self.service_report_interval = Duration::from_secs(number(key, value, 5, 86_400)?)
            }
            "interface_report_interval_s" => {
                self.interface_report_interval = Duration::from_secs(number(key, value, 10, 86_400)?)
            }
            "conntrack_established_timeout_s" => {
                let seconds = number(key, value, 0, u64::from(u32::MAX))? as u32;
                self.conntrack_established_timeout = (seconds > 0).then_some(seconds);
            }
            "conntrack_cut_on_tighten" => self.conntrack_cut_on_tighten = boolean(key, value)?,
            "clone_reactivate" => self.clone_reactivate = boolean(key, value)?,
            "flow_tracked_max" => self.flows.tracked_flows = number(key, value, 16, 1_000_000)? as usize,
            "flow_flush_interval_s" => {
                self.flows.flush_interval = Duration::from_secs(number(key, value, 1, 3600)?)
            }
            "flow_upload_interval_s" => {
                self.flows.upload_interval = Duration::from_secs(number(key, value, 1, 86_400)?)
            }
            "flow_sampling_threshold" => {
                self.flows.sampling_threshold = number(key, value, 0, 10_000_000)? as u32
            }
            "flow_accounted_connections" => {
                self.flows.accounted_connections_setting = Some(number(key, value, 0, 1_000_000)? as usize)
            }
            "conntrack_accounting" => self.conntrack_accounting = boolean(key, value)?,
            "flow_tracked_connections" => {
                self.flows.tracked_connections = Some(number(key, value, 16, 1_000_000)? as usize)
            }
            "flow_connection_timeout_tcp_s" => {
                self.flows.connection_timeouts.tcp = Duration::from_secs(number(key, value, 1, 86_400)?)
            }
            "flow_connection_timeout_udp_s" => {
                self.flows.connection_timeouts.udp = Duration::from_secs(number(key, value, 1, 86_400)?)
            }
            "flow_connection_timeout_icmp_s" => {
                self.flows.connection_timeouts.icmp = Duration::from_secs(number(key, value, 1, 86_400)?)
            }
            // A flow store needs MIN_FILE_BYTES to live in, and log/ may hold MAX_FILES files.
            "log_file_max_bytes" => {
                self.logs.file_max_bytes = number(key, value, crate::flows::store::MIN_FILE_BYTES, 1 << 32)?
            }
            "log_total_max_bytes" => {
                let min = crate::flows::store::MIN_FILE_BYTES * crate::logdir::MAX_FILES;
                self.logs.total_max_bytes = number(key, value, min, 1 << 40)?
            }
            "test_fault" => self.test_fault = Some(crate::agent::monitor::Fault::parse(value)?),
            "release_key" => {
                self.release_key = Some(ven_proto::release::parse_key(value).map_err(|e| e.to_string())?)
            }
            "upgrade_mode" => {
                self.upgrade_mode = match value {
                    "auto" => UpgradeMode::Auto,
                    "self" => UpgradeMode::SelfUpgrade,
                    "package" => UpgradeMode::Package,
                    _ => return Err(format!("upgrade_mode is auto, self or package, not {value:?}")),
                }
            }
            "upgrade_health_deadline_s" => {
                self.upgrade_health_deadline = Duration::from_secs(number(key, value, 10, 86_400)?)
            }
            "test_upgrade_unhealthy" => self.test_upgrade_unhealthy = boolean(key, value)?,
            "test_upgrade_kill" => {
                self.test_upgrade_kill = Some(crate::agent::upgrade::KillStep::parse(value)?)
            }
            _ if key.starts_with("board.") => {}
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|item| !item.is_empty())
}

fn boolean(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "true" | "yes" | "1" | "on" => Ok(true),
        "false" | "no" | "0" | "off" => Ok(false),
        _ => Err(format!("{key} is true or false, not {value:?}")),
    }
}

fn number(key: &str, value: &str, min: u64, max: u64) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{key} is a whole number from {min} to {max}, not {value:?}")),
    }
}

/// An interface name as the kernel allows it (IFNAMSIZ - 1 bytes, no `/`, whitespace or quote),
/// so that it can be written into an iptables rule as is.
fn interface_name(name: &str) -> Result<&str, String> {
    let valid = !name.is_empty()
        && name.len() <= 15
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@' | b'+'));
    if valid { Ok(name) } else { Err(format!("{name:?} is not an interface name")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_gives_the_defaults() {
        assert_eq!(Config::parse("# nothing\n\n"), Ok(Config::default()));
    }

    #[test]
    fn every_setting_parses() {
        let config = Config::parse(
            "board.target = aarch64-unknown-linux-musl\n\
             firewall_backend = legacy\nipv6 = no\nroutes = yes\n\
             failsafe_services = tcp/22, out:udp/53, tcp/22, in:udp/67\n\
             ignored_interfaces = wg0, br-lan.1 # comment\n\
             nflog_group = 9\nmax_rules = 500\nmax_sets = 10\nmax_set_members = 1000\nmax_custom_rules = 0\n\
             tamper_check_interval_s = 2\ncanary_interval_s = 1\n\
             conntrack_established_timeout_s = 0\nconntrack_cut_on_tighten = false\n\
             clone_reactivate = yes\n\
             flow_tracked_max = 1000\nflow_flush_interval_s = 2\nflow_upload_interval_s = 30\n\
             flow_sampling_threshold = 0\nlog_file_max_bytes = 2000000\nlog_total_max_bytes = 40000000\n\
             flow_tracked_connections = 5000\nflow_connection_timeout_tcp_s = 10\n\
             flow_connection_timeout_udp_s = 3\nflow_connection_timeout_icmp_s = 4\n",
        )
        .unwrap();
        assert_eq!(config.firewall_backend, BackendChoice::Legacy);
        assert!(!config.ipv6 && config.routes && !config.conntrack_cut_on_tighten);
        assert!(config.clone_reactivate);
        let services: Vec<String> = config.failsafe_services.iter().map(ToString::to_string).collect();
        assert_eq!(services, ["tcp/22", "udp/67", "out:udp/53"]);
        assert_eq!(config.ignored_interfaces, ["wg0", "br-lan.1"]);
        assert_eq!(config.nflog_group, 9);
        assert_eq!(
            config.caps,
            Caps { max_rules: 500, max_sets: 10, max_set_members: 1000, max_custom_rules: 0 }
        );
        assert_eq!(config.tamper_check_interval, Duration::from_secs(2));
        assert_eq!(config.canary_interval, Duration::from_secs(1));
        assert_eq!(config.conntrack_established_timeout, None);
        assert_eq!(
            config.flows,
            FlowSettings {
                tracked_flows: 1000,
                flush_interval: Duration::from_secs(2),
                upload_interval: Duration::from_secs(30),
                sampling_threshold: 0,
                tracked_connections: Some(5000),
                accounted_connections_setting: None,
                connection_timeouts: crate::flows::Timeouts {
                    tcp: Duration::from_secs(10),
                    udp: Duration::from_secs(3),
                    icmp: Duration::from_secs(4),
                },
            }
        );
        assert_eq!(
            config.logs,
            crate::logdir::LogCaps { file_max_bytes: 2_000_000, total_max_bytes: 40_000_000 }
        );
    }

    #[test]
    fn unknown_keys_are_remembered_and_ignored_not_refused() {
        let config = Config::parse("ipv6 = false\nfuture_setting = 3\nipv7 = true\n").unwrap();
        assert!(!config.ipv6, "known keys still apply");
        assert_eq!(config.unknown_keys, ["future_setting (line 2)", "ipv7 (line 3)"]);
        let many: String = (0..40).map(|n| format!("k{n} = 1\n")).collect();
        assert_eq!(Config::parse(&many).unwrap().unknown_keys.len(), MAX_UNKNOWN_KEYS_KEPT);
    }

    #[test]
    fn mistakes_name_their_line() {
        let cases = [
            ("routes = maybe", 1, "true or false"),
            ("failsafe_services = icmp/1", 1, "tcp or udp"),
            ("failsafe_services = tcp/0", 1, "port 0"),
            ("failsafe_services = tcp/70000", 1, "not a port"),
            ("ignored_interfaces = eth0 -j ACCEPT", 1, "not an interface name"),
            ("tamper_check_interval_s = 0", 1, "from 1"),
            ("log_total_max_bytes = 8000000", 1, "from 25600000"),
            ("just words", 1, "KEY = VALUE"),
        ];
        for (text, line, problem) in cases {
            let (got_line, got_problem) = Config::parse(text).unwrap_err();
            assert_eq!(got_line, line, "{text}");
            assert!(got_problem.contains(problem), "{text}: {got_problem}");
        }
    }

    #[test]
    fn upgrade_settings_parse_and_refuse_what_is_not_theirs() {
        let key = "ab".repeat(32);
        let config = Config::parse(&format!(
            "release_key = {key}\nupgrade_mode = package\nupgrade_health_deadline_s = 60\n\
             test_upgrade_kill = renamed\n"
        ))
        .unwrap();
        assert_eq!(config.release_key, Some([0xab; 32]));
        assert_eq!(config.upgrade_mode, UpgradeMode::Package);
        assert_eq!(config.upgrade_mode.resolve(), UpgradeMode::Package);
        assert_eq!(config.upgrade_health_deadline, Duration::from_secs(60));
        assert_eq!(config.test_upgrade_kill, Some(crate::agent::upgrade::KillStep::Renamed));
        assert_eq!(Config::default().test_upgrade_kill, None, "the kill switch ships off");
        assert!(!Config::default().test_upgrade_unhealthy);
        assert!(Config::parse("test_upgrade_unhealthy = yes").unwrap().test_upgrade_unhealthy);
        for bad in [
            "release_key = abcd",
            "upgrade_mode = sometimes",
            "upgrade_health_deadline_s = 5",
            "test_upgrade_kill = now",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_named_file_is_an_error_with_its_path() {
        let err = Config::read(Path::new("/nonexistent/ven.conf")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ven.conf"), "{err}");
    }

    #[test]
    fn every_board_profile_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("board-configs");
        let mut boards = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "conf") {
                let config = Config::read(&path).unwrap_or_else(|e| panic!("{e}"));
                assert!(!config.failsafe_services.is_empty(), "{}: no fail-safe services", path.display());
                boards += 1;
            }
        }
        assert!(boards >= 3, "{boards} board profiles in {}", dir.display());
        let router = Config::read(&dir.join("openwrt-aarch64.conf")).unwrap();
        assert!(router.routes && router.caps.max_set_members < Caps::default().max_set_members);
    }
}
