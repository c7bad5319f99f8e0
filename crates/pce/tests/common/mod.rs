//! Shared by the PCE's end-to-end tests: a temporary data directory, a running `pce serve` on
//! 127.0.0.1 with free ports, and the admin CLI against it.
#![allow(dead_code)] // each test file uses its own part of this module

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use ven_proto::{
    ActivateRequest, AgentEvent, HeartbeatRequest, HostReport, Interface, IpNet, PROTOCOL_VERSION,
    PolicyState, SuspendNotice, path,
};

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
        Server::spawn(Command::new(PCE), dir, api, events, extra)
    }

    /// Under `ulimit -n NOFILE` (soft and hard), as a unit's `LimitNOFILE` would set it.
    pub fn start_with_nofile(dir: &Path, api: u16, events: u16, nofile: u64, extra: &[&str]) -> Server {
        let mut command = Command::new("sh");
        command.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""), PCE]);
        Server::spawn(command, dir, api, events, extra)
    }

    fn spawn(mut command: Command, dir: &Path, api: u16, events: u16, extra: &[&str]) -> Server {
        let mut child = command
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

/// `x-ven-protocol` value of this build.
pub fn protocol() -> String {
    PROTOCOL_VERSION.to_string()
}

pub fn ca(dir: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(dir.join("ca.pem")).expect("CA certificate")
}

/// The VEN side of the VEN API.
pub struct Ven {
    pub agent: ureq::Agent,
    pub base: String,
}

impl Ven {
    pub fn new(dir: &Path, api: u16) -> Ven {
        let ca = ureq::tls::Certificate::from_der(ca(dir).as_ref()).to_owned();
        let tls = ureq::tls::TlsConfig::builder()
            .provider(ureq::tls::TlsProvider::Rustls)
            .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(ureq::tls::RootCerts::Specific(Arc::new(vec![ca])))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .new_agent();
        Ven { agent, base: format!("https://127.0.0.1:{api}") }
    }

    /// Sends a request; returns the status and body.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (u16, Vec<u8>) {
        self.try_call(method, path, auth, headers, body).expect("VEN API request")
    }

    /// Like [`Ven::call`], with transport failures (a PCE that is gone) as errors.
    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ureq::Error> {
        let url = format!("{}{path}", self.base);
        let mut request = ureq::http::Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        let request = request.header("content-type", ven_proto::CONTENT_TYPE).body(body).expect("request");
        let mut response = self.agent.run(request)?;
        assert_eq!(
            response.headers().get(ven_proto::PROTOCOL_HEADER).and_then(|v| v.to_str().ok()),
            Some(protocol().as_str())
        );
        let status = response.status().as_u16();
        Ok((status, response.body_mut().read_to_vec()?))
    }

    /// `GET /ven/v1/release?QUERY` speaking `protocol`: status, the signature header, body.
    pub fn release(&self, auth: &str, query: &str, protocol: u16) -> (u16, Option<String>, Vec<u8>) {
        let url = format!("{}{}?{query}", self.base, path::RELEASE);
        let mut response = self
            .agent
            .get(&url)
            .header("authorization", auth)
            .header(ven_proto::PROTOCOL_HEADER, &protocol.to_string())
            .call()
            .expect("VEN API request");
        let signature = response
            .headers()
            .get(ven_proto::RELEASE_SIGNATURE_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = response.status().as_u16();
        let limit = ven_proto::release::MAX_RELEASE_BYTES + 1024;
        (status, signature, response.body_mut().with_config().limit(limit).read_to_vec().expect("body"))
    }

    pub fn post<T: serde::Serialize>(&self, path: &str, auth: Option<&str>, message: &T) -> (u16, Vec<u8>) {
        self.call(
            "POST",
            path,
            auth,
            &[(ven_proto::PROTOCOL_HEADER, &protocol())],
            ven_proto::encode(message),
        )
    }

    pub fn activate(&self, code: &str, hostname: &str, address: &str) -> (u16, Vec<u8>) {
        let host = HostReport {
            hostname: hostname.to_string(),
            os: "Linux 6.1.0 x86_64".to_string(),
            agent_version: "0.1.0".to_string(),
            interfaces: vec![
                Interface { name: "lo".into(), addresses: vec![net("127.0.0.1/8")] },
                Interface { name: "eth0".into(), addresses: vec![net(address)] },
            ],
        };
        self.post(path::ACTIVATE, None, &ActivateRequest { activation_code: code.to_string(), host })
    }

    pub fn heartbeat(&self, auth: &str, applied: u64) -> (u16, Vec<u8>) {
        self.heartbeat_with(auth, applied, Vec::new())
    }

    pub fn heartbeat_with(&self, auth: &str, applied: u64, events: Vec<AgentEvent>) -> (u16, Vec<u8>) {
        let beat = HeartbeatRequest {
            applied_policy_version: applied,
            applied_state: PolicyState::Idle,
            apply_error: None,
            host: None,
            events,
            host_uptime_s: Some(3600),
            target: Some("x86_64-unknown-linux-gnu".into()),
        };
        self.post(path::HEARTBEAT, Some(auth), &beat)
    }

    /// A heartbeat as a VEN of protocol `protocol` (3 to 5) sends it (`HeartbeatRequestV5`).
    pub fn old_heartbeat(&self, auth: &str, protocol: u16) -> (u16, Vec<u8>) {
        let beat = ven_proto::encode(&ven_proto::HeartbeatRequestV5 {
            applied_policy_version: 0,
            applied_state: PolicyState::Idle,
            apply_error: None,
            host: None,
            events: Vec::new(),
        });
        let protocol = protocol.to_string();
        self.call(
            "POST",
            path::HEARTBEAT,
            Some(auth),
            &[(ven_proto::PROTOCOL_HEADER, protocol.as_str())],
            beat,
        )
    }

    pub fn suspend(&self, auth: &str, suspended: bool, previous_state: Option<PolicyState>) -> u16 {
        self.post(path::SUSPEND, Some(auth), &SuspendNotice { suspended, previous_state }).0
    }

    /// GET on the admin API with the data directory's key: status, X-Total-Count, JSON body.
    pub fn admin_get(&self, dir: &Path, path: &str) -> (u16, Option<usize>, serde_json::Value) {
        let key = std::fs::read_to_string(dir.join("admin.key")).expect("admin key");
        let url = format!("{}/api/v2/{path}", self.base);
        let mut response = self
            .agent
            .get(&url)
            .header("authorization", &format!("Bearer {}", key.trim()))
            .call()
            .expect("admin API request");
        let total = response
            .headers()
            .get("x-total-count")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let body = response.body_mut().read_to_string().expect("admin API body");
        (response.status().as_u16(), total, serde_json::from_str(&body).expect("admin API JSON"))
    }

    pub fn policy(&self, auth: &str, known: Option<u64>) -> (u16, Vec<u8>) {
        let known = known.map(|v| v.to_string());
        let version = protocol();
        let mut headers = vec![(ven_proto::PROTOCOL_HEADER, version.as_str())];
        if let Some(known) = &known {
            headers.push(("if-none-match", known));
        }
        self.call("GET", path::POLICY, Some(auth), &headers, Vec::new())
    }
}

pub fn net(text: &str) -> IpNet {
    text.parse().expect("address")
}

/// The client TLS configuration of a VEN: TLS 1.3, trusting only the CA in the data directory.
pub fn tls_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca(dir)).expect("CA into roots");
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
    Arc::new(config)
}

/// An event session of the current protocol, after its Hello.
pub type EventSession = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// Opens an event session and sends Hello; returns the stream.
pub fn event_session(dir: &Path, port: u16, agent_id: u64, token: &str) -> EventSession {
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let connection = rustls::ClientConnection::new(tls_config(dir), name).expect("TLS client");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the event service");
    tcp.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    let hello = ven_proto::frame::VenFrame::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id,
        agent_token: token.to_string(),
    };
    ven_proto::frame::write_frame(&mut stream, &hello).expect("send Hello");
    stream
}

/// The next frame of an event session.
pub fn read_event(stream: &mut EventSession) -> ven_proto::frame::PceFrame {
    ven_proto::frame::read_frame(stream, &mut Vec::new()).expect("event frame")
}
