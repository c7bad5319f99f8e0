//! The VEN API client: HTTPS with postcard bodies, trusting only the PCE's CA.

use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};

use super::clone_token::CloneToken;
use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
use ven_proto::{
    ActivateRequest, ActivateResponse, ErrorBody, ErrorKind, Goodbye, HeartbeatRequest, HeartbeatResponse,
    Policy, path,
};

/// Whole-request limit: a PCE that does not answer in this time counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The goodbye's whole exchange: a stop must not wait on a PCE that does not answer.
pub const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);
/// ureq's input and output buffers per connection (its default is 128 KiB each, for the TCP
/// and again for the TLS layer: 512 KiB zero-filled and kept while the connection idles in the
/// pool, 0.5 MB of the idle agent's RSS). One TLS record (16 KiB) fits; our requests and
/// response headers are far smaller, and bodies stream through in pieces.
const BUFFER_BYTES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the PCE at {server}: {cause}")]
    Unreachable { server: String, cause: String },
    #[error("the PCE at {server} refused {endpoint}: {message}")]
    Refused { server: String, endpoint: &'static str, status: u16, kind: ErrorKind, message: String },
    #[error("the PCE at {server} answered {endpoint} with HTTP {status}")]
    Status { server: String, endpoint: &'static str, status: u16 },
    #[error("the PCE at {server} sent a malformed answer to {endpoint}: {cause}")]
    Malformed { server: String, endpoint: &'static str, cause: String },
}

impl ClientError {
    /// The PCE no longer knows our credentials: the spec's "lost agent".
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, Self::Refused { kind: ErrorKind::Unauthorized, .. })
    }

    /// Another live copy of this agent holds the workload (issue 16).
    pub fn is_suspected_clone(&self) -> bool {
        matches!(self, Self::Refused { kind: ErrorKind::SuspectedClone, .. })
    }

    /// The PCE is at its bounds (503): ask again later, nothing is wrong with the request.
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Refused { status: 503, .. } | Self::Status { status: 503, .. })
    }

    /// The PCE has no such endpoint (an older PCE).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Refused { status: 404, .. } | Self::Status { status: 404, .. })
    }
}

pub struct PceClient {
    agent: ureq::Agent,
    server: String,
    authorization: Option<String>,
    clone_token: Option<CloneToken>,
}

impl PceClient {
    /// A client for `server` (`HOST:PORT`) that trusts only `ca_der`.
    pub fn new(server: &str, ca_der: &[u8]) -> Self {
        let tls = TlsConfig::builder()
            .provider(TlsProvider::Rustls)
            .root_certs(RootCerts::new_with_certs(&[Certificate::from_der(ca_der).to_owned()]))
            .unversioned_rustls_crypto_provider(super::tls::provider())
            .build();
        let config = ureq::Agent::config_builder()
            .tls_config(tls)
            .https_only(true)
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .max_idle_connections(1)
            .input_buffer_size(BUFFER_BYTES)
            .output_buffer_size(BUFFER_BYTES)
            .user_agent(concat!("ven/", env!("CARGO_PKG_VERSION")))
            .build();
        Self { agent: config.into(), server: server.to_string(), authorization: None, clone_token: None }
    }

    /// Sends the agent's credentials on every request from now on.
    pub fn with_credentials(mut self, agent_id: u64, agent_token: &str) -> Self {
        self.authorization = Some(ven_proto::bearer(agent_id, agent_token));
        self
    }

    /// Presents the data directory's clone token and the instance id on every request from now
    /// on, and keeps the next token an answer carries (issue 16).
    pub fn with_clone_token(mut self, clone_token: CloneToken) -> Self {
        self.clone_token = Some(clone_token);
        self
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn activate(&self, request: &ActivateRequest) -> Result<ActivateResponse, ClientError> {
        self.post(path::ACTIVATE, request)?.ok_or_else(|| self.malformed(path::ACTIVATE, "empty body"))
    }

    /// A suspected clone re-pairs as a workload of its own (issue 16); the answer is its new
    /// identity, and its first clone token is kept like any other.
    pub fn reactivate(&self, host: &ven_proto::HostReport) -> Result<ActivateResponse, ClientError> {
        self.post(path::REACTIVATE, host)?.ok_or_else(|| self.malformed(path::REACTIVATE, "empty body"))
    }

    pub fn heartbeat(&self, request: &HeartbeatRequest) -> Result<HeartbeatResponse, ClientError> {
        self.post(path::HEARTBEAT, request)?.ok_or_else(|| self.malformed(path::HEARTBEAT, "empty body"))
    }

    /// The current policy, or `None` when it is still version `have`.
    pub fn policy(&self, have: u64) -> Result<Option<Policy>, ClientError> {
        let mut request = self.identified(self.agent.get(self.url(path::POLICY)));
        if have != 0 {
            request = request.header("if-none-match", have.to_string());
        }
        let response = request.call().map_err(|e| self.unreachable(e))?;
        self.decode(path::POLICY, response)
    }

    /// Tells the PCE the agent is stopping; gives up after [`GOODBYE_TIMEOUT`], so that a stop
    /// ends within seconds even when the PCE does not answer (it then finds the workload silent).
    pub fn goodbye(&self, reason: &str) -> Result<(), ClientError> {
        self.post_within::<_, ()>(
            path::GOODBYE,
            &Goodbye { reason: reason.to_string() },
            Some(GOODBYE_TIMEOUT),
        )
        .map(drop)
    }

    /// Sends the host's listening services.
    pub fn report_services(&self, report: &ven_proto::ServicesReport) -> Result<(), ClientError> {
        self.post::<_, ()>(path::SERVICES, report).map(drop)
    }

    /// Tells the PCE the VEN was suspended or unsuspended.
    pub fn suspend(&self, notice: &ven_proto::SuspendNotice) -> Result<(), ClientError> {
        self.post::<_, ()>(path::SUSPEND, notice).map(drop)
    }

    /// Sends a batch of flow summaries; the answer says through which sequence number the PCE
    /// has stored them.
    pub fn upload_flows(&self, batch: &ven_proto::FlowBatch) -> Result<ven_proto::FlowAck, ClientError> {
        self.post(path::FLOWS, batch)?.ok_or_else(|| self.malformed(path::FLOWS, "empty body"))
    }

    /// Sends the support report the PCE asked for, within `deadline`.
    pub fn upload_support_report(
        &self,
        upload: &ven_proto::SupportReportUpload,
        deadline: Duration,
    ) -> Result<(), ClientError> {
        self.post_within::<_, ()>(path::SUPPORT_REPORT, upload, Some(deadline)).map(drop)
    }

    /// Streams release `version` for `target` into `into`, within `deadline`; returns its
    /// detached signature (hex) as the PCE sent it. Nothing here is trusted: the caller checks
    /// the bytes against the signature and its pinned key. More than
    /// [`ven_proto::release::MAX_RELEASE_BYTES`] is refused.
    pub fn download_release(
        &self,
        version: &str,
        target: &str,
        into: &mut dyn std::io::Write,
        deadline: Duration,
    ) -> Result<String, ClientError> {
        let endpoint = path::RELEASE;
        let request = self
            .identified(self.agent.get(self.url(endpoint)).query("version", version).query("target", target));
        let request = request.config().timeout_global(Some(deadline)).build();
        let mut response = request.call().map_err(|e| self.unreachable(e))?;
        if response.status().as_u16() != 200 {
            return self
                .decode::<()>(endpoint, response)
                .and_then(|_| Err(self.malformed(endpoint, "an answer without the release")));
        }
        self.keep_next_token(&response);
        let signature = response
            .headers()
            .get(ven_proto::RELEASE_SIGNATURE_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| self.malformed(endpoint, "no release signature"))?;
        let mut body =
            response.body_mut().with_config().limit(ven_proto::release::MAX_RELEASE_BYTES).reader();
        std::io::copy(&mut body, into).map_err(|e| self.malformed(endpoint, &e.to_string()))?;
        Ok(signature)
    }

    pub fn deactivate(&self) -> Result<(), ClientError> {
        self.post::<_, ()>(path::DEACTIVATE, &()).map(drop)
    }

    /// `request` with what every VEN API request carries: the protocol version, the credentials
    /// and the clone token with the instance id, once there are any.
    fn identified<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        let mut request = request.header(ven_proto::PROTOCOL_HEADER, ven_proto::PROTOCOL_VERSION.to_string());
        if let Some(auth) = &self.authorization {
            request = request.header("authorization", auth);
        }
        if let Some(clone_token) = &self.clone_token {
            request = request.header(ven_proto::INSTANCE_HEADER, clone_token.instance());
            if let Some(token) = clone_token.current() {
                request = request.header(ven_proto::CLONE_TOKEN_HEADER, token);
            }
        }
        request
    }

    fn url(&self, endpoint: &str) -> String {
        format!("https://{}{endpoint}", self.server)
    }

    fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        body: &Req,
    ) -> Result<Option<Resp>, ClientError> {
        self.post_within(endpoint, body, None)
    }

    /// [`PceClient::post`] with its own overall deadline instead of [`REQUEST_TIMEOUT`].
    fn post_within<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        body: &Req,
        deadline: Option<Duration>,
    ) -> Result<Option<Resp>, ClientError> {
        let mut request = self
            .identified(self.agent.post(self.url(endpoint)).header("content-type", ven_proto::CONTENT_TYPE));
        if let Some(deadline) = deadline {
            request = request.config().timeout_global(Some(deadline)).timeout_connect(Some(deadline)).build();
        }
        let response = request.send(&ven_proto::encode(body)[..]).map_err(|e| self.unreachable(e))?;
        self.decode(endpoint, response)
    }

    /// 2xx with a body -> `Some`, 204/304 -> `None`, anything else -> an error naming the cause.
    fn decode<Resp: DeserializeOwned>(
        &self,
        endpoint: &'static str,
        mut response: ureq::http::Response<ureq::Body>,
    ) -> Result<Option<Resp>, ClientError> {
        let status = response.status().as_u16();
        self.keep_next_token(&response);
        let body = response
            .body_mut()
            .with_config()
            .limit(ven_proto::MAX_BODY_BYTES)
            .read_to_vec()
            .map_err(|e| self.malformed(endpoint, &e.to_string()))?;
        match status {
            204 | 304 => Ok(None),
            200..=299 => {
                ven_proto::decode(&body).map(Some).map_err(|e| self.malformed(endpoint, &e.to_string()))
            }
            _ => match ven_proto::decode::<ErrorBody>(&body) {
                Ok(error) => Err(ClientError::Refused {
                    server: self.server.clone(),
                    endpoint,
                    status,
                    kind: error.kind,
                    message: error.message,
                }),
                Err(_) => Err(ClientError::Status { server: self.server.clone(), endpoint, status }),
            },
        }
    }

    /// Persists the next clone token an answer carries before any request presents it. If it
    /// cannot be kept, the previous one is presented again (the PCE accepts it until the new one
    /// is used, and the instance id still names this agent).
    fn keep_next_token(&self, response: &ureq::http::Response<ureq::Body>) {
        let Some(clone_token) = &self.clone_token else { return };
        let Some(next) = response.headers().get(ven_proto::NEXT_CLONE_TOKEN_HEADER) else { return };
        let stored = match next.to_str() {
            Ok(next) => clone_token.store(next),
            Err(_) => Err(super::clone_token::CloneTokenError::Malformed),
        };
        if let Err(e) = stored {
            log::error!("{e}; presenting the previous clone token again");
        }
    }

    fn unreachable(&self, error: ureq::Error) -> ClientError {
        let mut cause = error.to_string();
        if let Some(hint) = clock_hint(crate::clock::now()) {
            cause.push_str(&hint);
        }
        ClientError::Unreachable { server: self.server.clone(), cause }
    }

    fn malformed(&self, endpoint: &'static str, cause: &str) -> ClientError {
        ClientError::Malformed { server: self.server.clone(), endpoint, cause: cause.to_string() }
    }
}

/// What to add to a connection error when the host's clock (`now`) is too far in the past for
/// any certificate to be valid: the TLS error alone does not say the clock is the cause.
fn clock_hint(now: u64) -> Option<String> {
    (now < crate::clock::EARLIEST_SANE_CLOCK).then(|| {
        format!(
            " (this host's clock says {}: no certificate can be checked until the clock is set, \
             e.g. by NTP; the last-known-good policy stays in force)",
            crate::clock::rfc3339(now)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_far_in_the_past_is_named_as_the_cause() {
        let hint = clock_hint(86_400).expect("1970 is too early");
        assert!(hint.contains("1970-01-02") && hint.contains("NTP"), "{hint}");
        assert_eq!(clock_hint(crate::clock::now()), None);
    }
}
