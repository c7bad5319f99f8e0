//! A small HTTP/1.1 server for one connection (already TLS), on smol and httparse.
//!
//! Guarantees towards a hostile client: the header block is capped at [`MAX_HEAD_BYTES`], bodies at
//! [`ven_proto::MAX_BODY_BYTES`] and must come with Content-Length (chunked is refused with 411,
//! other transfer codings with 501). Credentials are checked on the request head
//! ([`Handler::admit`]) before any byte of the body is read: a refused request is answered at once
//! (401) and the connection closed, body unread; `100 Continue` goes out only after that.
//! Requests without credentials (VEN activation) get bodies of at most
//! [`MAX_ANONYMOUS_BODY_BYTES`]. The bytes of bodies buffered across all connections are bounded by
//! [`MAX_BUFFERED_BODY_BYTES`] (anonymous ones by [`MAX_ANONYMOUS_BUFFERED_BYTES`]): past it a request
//! is answered 503 with `Retry-After` and its body is not read. A body is one allocation of its
//! announced length, freed when its handler returns (see [`body_buffer`]).
//!
//! Time: a connection that has not authenticated must send each request whole by its ticket's
//! deadline ([`crate::admission`]); an authenticated one within [`REQUEST_TIMEOUT`] of the previous
//! answer; an answer must be taken within [`WRITE_TIMEOUT`]. Keep-alive and pipelining are
//! supported. Handlers are synchronous and run on the blocking thread pool, at most
//! [`MAX_CONCURRENT_HANDLERS`] at once: they mostly serialise on the store's lock anyway, and a
//! request waiting for a turn costs a parked future instead of a parked thread.

use crate::admission::Ticket;
use smol::Timer;
use smol::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use smol::lock::Semaphore;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const MAX_HEAD_BYTES: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 64;
/// Time for a whole request to arrive, counted from the previous answer (authenticated connections).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 16 * 1024;
/// Handlers running at once, across all connections. Without a bound, a store lock held for a
/// while (a provision, an activation's recomputation, a flush) parked one blocking-pool thread per
/// waiting request: 500 threads (the pool's own cap) and 80 MiB of RSS with 5,000 VENs.
pub const MAX_CONCURRENT_HANDLERS: usize = 16;
static HANDLER_TURNS: Semaphore = Semaphore::new(MAX_CONCURRENT_HANDLERS);
/// Request bodies buffered at once, across all connections (four maximal bodies).
pub const MAX_BUFFERED_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Of those, bodies of requests without credentials (VEN activations).
pub const MAX_ANONYMOUS_BUFFERED_BYTES: usize = 8 * 1024 * 1024;
/// Largest body of a request without credentials: an activation's host report (256 interfaces
/// of 64 addresses at most) fits with room to spare.
pub const MAX_ANONYMOUS_BODY_BYTES: usize = 1024 * 1024;
/// What a 503 for a full body budget asks the client to wait, in seconds.
pub const BUSY_RETRY_AFTER_S: u32 = 2;
static BODY_BUDGET: Budget = Budget::new(MAX_BUFFERED_BODY_BYTES);
/// Large answers (agent releases) held at once, across all connections: an order to upgrade
/// every VEN must not hold a release's bytes once per connection. Past it, 503.
pub const MAX_LARGE_ANSWER_BYTES: usize = 64 * 1024 * 1024;
static ANSWER_BUDGET: Budget = Budget::new(MAX_LARGE_ANSWER_BYTES);
static ANONYMOUS_BODY_BUDGET: Budget = Budget::new(MAX_ANONYMOUS_BUFFERED_BYTES);
/// After a refusal, what the client may already have sent is read and dropped, at most this
/// much for at most [`LINGER_TIMEOUT`], before the connection closes: closing with bytes unread
/// makes the kernel send a reset, which can destroy the answer (a VEN would see an I/O error
/// instead of the 401 that tells it it is a lost agent).
pub const MAX_LINGER_BYTES: usize = 64 * 1024;
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(1);
/// Bodies from this size on are allocated as a mapping glibc always returns (see [`body_buffer`]).
const LARGE_BODY_BYTES: usize = 128 * 1024;
/// Above glibc's largest dynamic mmap threshold (32 MiB on 64-bit, less on 32-bit).
const ALWAYS_MAPPED_BYTES: usize = 32 * 1024 * 1024 + 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("the request header block exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("a request body of {0} bytes exceeds the limit of {max} bytes", max = ven_proto::MAX_BODY_BYTES)]
    BodyTooLarge(u64),
    #[error(
        "a request body of {0} bytes without credentials exceeds the limit of {MAX_ANONYMOUS_BODY_BYTES} bytes"
    )]
    AnonymousBodyTooLarge(usize),
    #[error("the server is buffering as many request bodies as it may; retry in {BUSY_RETRY_AFTER_S} s")]
    Busy,
    #[error("chunked request bodies are not supported; send Content-Length")]
    Chunked,
    #[error("transfer coding {0:?} is not supported")]
    TransferCoding(String),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the client was too slow")]
    Timeout,
}

impl HttpError {
    /// The status to answer with, for errors the client caused and can still hear.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Malformed(_) => Some(400),
            Self::HeadTooLarge => Some(431),
            Self::BodyTooLarge(_) | Self::AnonymousBodyTooLarge(_) => Some(413),
            Self::Busy => Some(503),
            Self::Chunked => Some(411),
            Self::TransferCoding(_) => Some(501),
            Self::Io(_) | Self::Timeout => None,
        }
    }
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub query: String,
    /// Names in lower case, in arrival order.
    pub headers: Vec<(String, String)>,
    pub keep_alive: bool,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body length the head announces, refusing what this server does not read.
    pub fn body_length(&self) -> Result<usize, HttpError> {
        if let Some(coding) = self.header("transfer-encoding") {
            return Err(if coding.to_ascii_lowercase().contains("chunked") {
                HttpError::Chunked
            } else {
                HttpError::TransferCoding(coding.to_string())
            });
        }
        let mut lengths = self.headers.iter().filter(|(n, _)| n == "content-length").map(|(_, v)| v.trim());
        let Some(first) = lengths.next() else { return Ok(0) };
        if lengths.any(|other| other != first) {
            return Err(HttpError::Malformed("conflicting Content-Length headers".into()));
        }
        // RFC 9110: 1*DIGIT. Rust's parse would also take "+5".
        let digits = !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit());
        let length: u64 = first
            .parse()
            .ok()
            .filter(|_| digits)
            .ok_or_else(|| HttpError::Malformed(format!("bad Content-Length {first:?}")))?;
        if length > ven_proto::MAX_BODY_BYTES {
            return Err(HttpError::BodyTooLarge(length));
        }
        usize::try_from(length).map_err(|_| HttpError::BodyTooLarge(length))
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while incomplete, else the head and its
/// length in bytes.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let used = match request.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => return Err(HttpError::HeadTooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(used)) => used,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if used > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    // httparse fills these three in a complete parse.
    let (Some(method), Some(target), Some(version)) = (request.method, request.path, request.version) else {
        return Err(HttpError::Malformed("incomplete request line".into()));
    };
    let mut parsed = Vec::with_capacity(request.headers.len());
    for header in request.headers.iter() {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HttpError::Malformed(format!("header {} is not UTF-8", header.name)))?;
        parsed.push((header.name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut head = Head {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers: parsed,
        keep_alive: false,
    };
    let connection = head.header("connection").unwrap_or("").to_ascii_lowercase();
    let has = |token: &str| connection.split(',').any(|t| t.trim() == token);
    head.keep_alive = if version >= 1 { !has("close") } else { has("keep-alive") };
    Ok(Some((head, used)))
}

pub struct Request {
    pub head: Head,
    pub body: Vec<u8>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.header(name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn empty(status: u16) -> Self {
        Response { status, headers: Vec::new(), body: Vec::new() }
    }

    pub fn with_body(status: u16, content_type: &str, body: Vec<u8>) -> Self {
        Response { status, headers: vec![("content-type", content_type.to_string())], body }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn serialize(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = self.serialize_head(keep_alive);
        if !matches!(self.status, 204 | 304) {
            out.extend_from_slice(&self.body);
        }
        out
    }

    /// The status line and headers, up to and with the blank line.
    fn serialize_head(&self, keep_alive: bool) -> Vec<u8> {
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status)).into_bytes();
        // 204 and 304 carry neither a body nor its length.
        let bodiless = matches!(self.status, 204 | 304);
        if !bodiless {
            out.extend_from_slice(format!("content-length: {}\r\n", self.body.len()).as_bytes());
        }
        out.extend_from_slice(if keep_alive {
            b"connection: keep-alive\r\n"
        } else {
            b"connection: close\r\n"
        });
        for (name, value) in &self.headers {
            // Values are ours, but never let one break the header block.
            let value: String = value.chars().filter(|c| !c.is_control()).collect();
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// What a handler decides on a request head, before its body is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Good credentials: the connection counts as authenticated from now on.
    Authenticated,
    /// A request that needs none (VEN activation: the code is in the body); its body is limited
    /// to [`MAX_ANONYMOUS_BODY_BYTES`].
    Anonymous,
    /// Answered with this at once; the body is not read and the connection is closed.
    Refused(Response),
}

/// What answers the requests of a connection.
pub trait Handler: Send + Sync + 'static {
    /// Checks the request's credentials on its head alone (runs on the blocking pool).
    fn admit(&self, head: &Head) -> Admission;
    fn handle(&self, request: Request) -> Response;
    /// The answer to a request this server refused before the handler saw it; `path` when known.
    fn reject(&self, path: Option<&str>, error: &HttpError) -> Response;
    /// The size of a large answer the admitted request will get (an agent release), reserved
    /// from a shared budget before the handler runs; 0 for ordinary answers.
    fn large_answer_bytes(&self, _head: &Head) -> usize {
        0
    }
}

/// Serves requests on `stream` until the client closes it, stops keeping it alive, or misbehaves.
/// `ticket` says whether the connection has authenticated yet, and is told when it does.
pub async fn serve<S>(mut stream: S, handler: Arc<dyn Handler>, ticket: &mut Ticket) -> Result<(), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let deadline = ticket.pending_deadline().unwrap_or_else(|| Instant::now() + REQUEST_TIMEOUT);
        let (head, used) = loop {
            match parse_head(&buf) {
                Ok(Some(parsed)) => break parsed,
                Ok(None) => {}
                Err(error) => return refuse(&mut stream, handler.as_ref(), None, error).await,
            }
            if read_more(&mut stream, &mut buf, deadline).await? == 0 {
                return if buf.is_empty() {
                    Ok(())
                } else {
                    Err(HttpError::Malformed("truncated head".into()))
                };
            }
        };
        buf.drain(..used);
        let length = match head.body_length() {
            Ok(length) => length,
            Err(error) => return refuse(&mut stream, handler.as_ref(), Some(&head.path), error).await,
        };
        // INVARIANT: no byte of the body is read before the head is admitted.
        let (admission, answer_bytes, head) = {
            let handler = handler.clone();
            blocking(move || {
                let admitted =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.admit(&head)));
                let internal = || Response::with_body(500, "text/plain", b"internal error\n".to_vec());
                let admission = admitted.unwrap_or_else(|_| Admission::Refused(internal()));
                let answer_bytes = match admission {
                    Admission::Authenticated => {
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            handler.large_answer_bytes(&head)
                        }))
                        .unwrap_or(0)
                    }
                    _ => 0,
                };
                (admission, answer_bytes, head)
            })
            .await
        };
        let anonymous = match admission {
            Admission::Refused(response) => {
                let deadline = Instant::now() + WRITE_TIMEOUT;
                within(deadline, stream.write_all(&response.serialize(false))).await?;
                within(deadline, stream.flush()).await?;
                linger(&mut stream).await;
                return Ok(());
            }
            Admission::Authenticated => {
                ticket.authenticated();
                false
            }
            Admission::Anonymous => true,
        };
        if anonymous && length > MAX_ANONYMOUS_BODY_BYTES {
            let error = HttpError::AnonymousBodyTooLarge(length);
            return refuse(&mut stream, handler.as_ref(), Some(&head.path), error).await;
        }
        let Some(reservation) = Reservation::take(length, anonymous) else {
            return refuse(&mut stream, handler.as_ref(), Some(&head.path), HttpError::Busy).await;
        };
        // Held until the answer is written.
        let answer_reservation = AnswerReservation::take(answer_bytes);
        if answer_reservation.is_none() {
            return refuse(&mut stream, handler.as_ref(), Some(&head.path), HttpError::Busy).await;
        }
        let deadline = ticket.pending_deadline().unwrap_or(deadline);
        let body = read_body(&mut stream, &mut buf, &head, length, deadline).await?;
        if buf.capacity() > 2 * READ_CHUNK && buf.len() <= READ_CHUNK {
            buf.shrink_to(READ_CHUNK);
        }
        let keep_alive = head.keep_alive;
        let handler_ = handler.clone();
        let response = blocking(move || {
            // A handler bug must cost one answer, not an executor thread.
            let handled = std::panic::AssertUnwindSafe(move || handler_.handle(Request { head, body }));
            std::panic::catch_unwind(handled)
                .unwrap_or_else(|_| Response::with_body(500, "text/plain", b"internal error\n".to_vec()))
        })
        .await;
        // The body was dropped with the request.
        drop(reservation);
        let deadline = Instant::now() + WRITE_TIMEOUT;
        // The head, then the body as it is: a large body is not copied again.
        within(deadline, stream.write_all(&response.serialize_head(keep_alive))).await?;
        if !matches!(response.status, 204 | 304) {
            within(deadline, stream.write_all(&response.body)).await?;
        }
        within(deadline, stream.flush()).await?;
        drop(response);
        drop(answer_reservation);
        if !keep_alive {
            return Ok(());
        }
        ticket.renew();
    }
}

/// Reads the `length` bytes of a body (after the head) into one buffer: what `buf` already holds
/// first, then from the stream, never past the body (pipelined requests stay in the stream).
async fn read_body<S>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head: &Head,
    length: usize,
    deadline: Instant,
) -> Result<Vec<u8>, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if length > buf.len() && head.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        within(deadline, stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")).await?;
        within(deadline, stream.flush()).await?;
    }
    if length <= buf.len() {
        let rest = buf.split_off(length);
        return Ok(std::mem::replace(buf, rest));
    }
    let mut body = body_buffer(length);
    body.append(buf);
    let mut chunk = [0u8; READ_CHUNK];
    while body.len() < length {
        let want = (length - body.len()).min(READ_CHUNK);
        let n = within(deadline, stream.read(&mut chunk[..want])).await?;
        if n == 0 {
            return Err(HttpError::Malformed("truncated body".into()));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Ok(body)
}

/// An empty buffer for a body of `length` bytes, allocated once. glibc raises its mmap threshold
/// to the size of every mapped block freed (up to 32 MiB on 64-bit), after which large blocks
/// come from the arenas and stay in the process when freed: so a large body reserves more than
/// that maximum, which glibc always maps and unmaps on free without moving the threshold. Only
/// the pages written count in RSS; the rest is address space. (musl maps large blocks anyway.)
pub fn body_buffer(length: usize) -> Vec<u8> {
    if length >= LARGE_BODY_BYTES {
        Vec::with_capacity(length.max(ALWAYS_MAPPED_BYTES))
    } else {
        Vec::with_capacity(length)
    }
}

/// A byte budget shared by all connections.
struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    const fn new(max: usize) -> Self {
        Budget { used: AtomicUsize::new(0), max }
    }

    fn take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    fn give(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Bytes of the body budgets held for one request, given back on drop.
struct Reservation {
    bytes: usize,
    anonymous: bool,
}

impl Reservation {
    fn take(bytes: usize, anonymous: bool) -> Option<Self> {
        if anonymous && !ANONYMOUS_BODY_BUDGET.take(bytes) {
            return None;
        }
        if !BODY_BUDGET.take(bytes) {
            if anonymous {
                ANONYMOUS_BODY_BUDGET.give(bytes);
            }
            return None;
        }
        Some(Reservation { bytes, anonymous })
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        BODY_BUDGET.give(self.bytes);
        if self.anonymous {
            ANONYMOUS_BODY_BUDGET.give(self.bytes);
        }
    }
}

/// Bytes of [`MAX_LARGE_ANSWER_BYTES`] held for one answer, given back on drop.
struct AnswerReservation {
    bytes: usize,
}

impl AnswerReservation {
    fn take(bytes: usize) -> Option<Self> {
        // `then`, not `then_some`: a reservation built and dropped on refusal would give back
        // what it never took.
        (bytes == 0 || ANSWER_BUDGET.take(bytes)).then(|| AnswerReservation { bytes })
    }
}

impl Drop for AnswerReservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            ANSWER_BUDGET.give(self.bytes);
        }
    }
}

/// Runs `work` (which may wait for the store's lock) on the blocking pool once one of the
/// [`MAX_CONCURRENT_HANDLERS`] turns is free.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    let _turn = HANDLER_TURNS.acquire().await;
    smol::unblock(work).await
}

/// Answers a refused request (when the client can hear it), closes, and reports the error.
async fn refuse<S>(
    stream: &mut S,
    handler: &dyn Handler,
    path: Option<&str>,
    error: HttpError,
) -> Result<(), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Some(status) = error.status() {
        let mut response = handler.reject(path, &error);
        response.status = status;
        if matches!(error, HttpError::Busy) {
            response = response.header("retry-after", BUSY_RETRY_AFTER_S.to_string());
        }
        let deadline = Instant::now() + WRITE_TIMEOUT;
        within(deadline, stream.write_all(&response.serialize(false))).await?;
        within(deadline, stream.flush()).await?;
        linger(stream).await;
    }
    Err(error)
}

/// Ends the answer (TLS close_notify and FIN), then reads and drops what the client still sends,
/// at most [`MAX_LINGER_BYTES`] within [`LINGER_TIMEOUT`], so that closing does not reset the
/// connection under the answer. Nothing is kept: the bytes go through one stack chunk.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    let deadline = Instant::now() + LINGER_TIMEOUT;
    if within(deadline, stream.close()).await.is_err() {
        return;
    }
    let mut chunk = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_LINGER_BYTES {
        match within(deadline, stream.read(&mut chunk)).await {
            Ok(n) if n > 0 => drained += n,
            _ => return,
        }
    }
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    deadline: Instant,
) -> Result<usize, HttpError> {
    let mut chunk = [0u8; READ_CHUNK];
    let n = within(deadline, stream.read(&mut chunk)).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Runs an I/O future unless `deadline` passes first.
pub async fn within<T>(deadline: Instant, io: impl Future<Output = io::Result<T>>) -> Result<T, HttpError> {
    smol::future::or(async { io.await.map_err(HttpError::Io) }, async {
        Timer::at(deadline).await;
        Err(HttpError::Timeout)
    })
    .await
}

/// A connection in memory: reads come from `input`, writes are collected.
struct Wire<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl AsyncRead for Wire<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(io::Read::read(&mut self.input, buf))
    }
}

impl AsyncWrite for Wire<'_> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        self.output.extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The fuzz target's handler: `Authorization: good` is authenticated, no credentials anonymous,
/// anything else refused; answers echo the body.
struct FuzzHandler;

impl Handler for FuzzHandler {
    fn admit(&self, head: &Head) -> Admission {
        match head.header("authorization") {
            Some("good") => Admission::Authenticated,
            Some(_) => Admission::Refused(Response::with_body(401, "text/plain", b"who?".to_vec())),
            None => Admission::Anonymous,
        }
    }
    fn handle(&self, request: Request) -> Response {
        Response::with_body(200, "application/octet-stream", request.body)
    }
    fn reject(&self, _path: Option<&str>, error: &HttpError) -> Response {
        Response::with_body(400, "text/plain", error.to_string().into_bytes())
    }
}

/// For the fuzz target `pce_http_head`: `data` as what a client sends on one connection, through
/// the head parser and body framing, then the whole serve loop. Checks the guarantees of this
/// module's header; a violation panics.
pub fn fuzz_connection(data: &[u8]) {
    if let Ok(Some((head, used))) = parse_head(data) {
        assert!(used <= data.len() && used <= MAX_HEAD_BYTES, "head of {used} bytes");
        assert!(head.headers.len() <= MAX_HEADERS);
        if let Ok(length) = head.body_length() {
            assert!(length as u64 <= ven_proto::MAX_BODY_BYTES);
        }
    }
    let mut wire = Wire { input: data, output: Vec::new() };
    let _ = smol::block_on(serve(&mut wire, Arc::new(FuzzHandler), &mut Ticket::detached()));
    assert!(
        wire.output.is_empty() || wire.output.starts_with(b"HTTP/1.1 "),
        "an answer without a status line"
    );
    // A refused head ends the connection: nothing (no 100 Continue, no answer) after its 401.
    if let Some(at) = wire.output.windows(12).position(|w| w == b"HTTP/1.1 401") {
        assert!(!wire.output[at + 1..].windows(9).any(|w| w == b"HTTP/1.1 "), "an answer after a 401");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Result<Option<(Head, usize)>, HttpError> {
        parse_head(text.as_bytes())
    }

    #[test]
    fn parses_a_request_head() {
        let text = "POST /ven/v1/heartbeat?x=1 HTTP/1.1\r\nHost: pce\r\nX-Ven-Protocol: 1\r\nContent-Length: 5\r\n\r\nhello";
        let (head, used) = head(text).unwrap().unwrap();
        assert_eq!(used, text.len() - 5);
        assert_eq!(
            (head.method.as_str(), head.path.as_str(), head.query.as_str()),
            ("POST", "/ven/v1/heartbeat", "x=1")
        );
        assert_eq!(head.header("x-ven-protocol"), Some("1"));
        assert!(head.keep_alive);
        assert_eq!(head.body_length().unwrap(), 5);
    }

    #[test]
    fn incomplete_heads_wait_and_connection_tokens_count() {
        assert!(head("GET / HTTP/1.1\r\nHost: pce\r\n").unwrap().is_none());
        assert!(!head("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").unwrap().unwrap().0.keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap().0.keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap().unwrap().0.keep_alive);
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n").unwrap().unwrap().0.body_length().unwrap(), 0);
    }

    #[test]
    fn malformed_heads_are_refused() {
        for text in [
            "GARBAGE\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            "GET / HTTP/9.9\r\n\r\n",
            "\0\0\0\r\n",
        ] {
            let result = head(text);
            assert!(matches!(result, Err(HttpError::Malformed(_))), "{text:?}: {result:?}");
        }
        let bad_utf8 = b"GET / HTTP/1.1\r\nX: \xff\xfe\r\n\r\n";
        assert!(matches!(parse_head(bad_utf8), Err(HttpError::Malformed(_))));
    }

    #[test]
    fn oversized_heads_are_refused() {
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD_BYTES));
        assert!(matches!(head(&long), Err(HttpError::HeadTooLarge)));
        let complete = format!("{long}\r\n");
        assert!(matches!(head(&complete), Err(HttpError::HeadTooLarge)));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert!(matches!(head(&format!("GET / HTTP/1.1\r\n{many}\r\n")), Err(HttpError::HeadTooLarge)));
    }

    #[test]
    fn bodies_need_a_sane_content_length() {
        let length = |text: &str| head(text).unwrap().unwrap().0.body_length();
        assert!(matches!(
            length("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HttpError::Chunked)
        ));
        assert!(matches!(
            length("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Err(HttpError::TransferCoding(_))
        ));
        let too_big = format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", ven_proto::MAX_BODY_BYTES + 1);
        assert!(matches!(length(&too_big), Err(HttpError::BodyTooLarge(_))));
        assert!(matches!(
            length("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        for bad in ["+5", "5 5", "0x5", ""] {
            let text = format!("POST / HTTP/1.1\r\nContent-Length: {bad}\r\n\r\n");
            assert!(matches!(length(&text), Err(HttpError::Malformed(_))), "{bad:?}");
        }
        assert!(matches!(
            length("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert_eq!(length("POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").unwrap(), 3);
        assert_eq!(HttpError::Chunked.status(), Some(411));
    }

    struct Echo;
    impl Handler for Echo {
        fn admit(&self, head: &Head) -> Admission {
            match head.header("authorization") {
                Some("good") => Admission::Authenticated,
                Some(_) => Admission::Refused(Response::with_body(401, "text/plain", b"who?".to_vec())),
                None => Admission::Anonymous,
            }
        }
        fn handle(&self, request: Request) -> Response {
            Response::with_body(200, "text/plain", request.body)
        }
        fn reject(&self, _path: Option<&str>, error: &HttpError) -> Response {
            Response::with_body(400, "text/plain", error.to_string().into_bytes())
        }
    }

    fn exchange(input: &str) -> (Result<(), HttpError>, String) {
        let (result, output, _) = exchange_bytes(input.as_bytes());
        (result, output)
    }

    /// Also returns how many input bytes the server read.
    fn exchange_bytes(input: &[u8]) -> (Result<(), HttpError>, String, u64) {
        let mut wire = Wire { input, output: Vec::new() };
        let result = smol::block_on(serve(&mut wire, Arc::new(Echo), &mut Ticket::detached()));
        let read = (input.len() - wire.input.len()) as u64;
        (result, String::from_utf8_lossy(&wire.output).into_owned(), read)
    }

    #[test]
    fn refused_heads_are_answered_before_the_body_is_read() {
        let head = "POST /a HTTP/1.1\r\nAuthorization: bad\r\nExpect: 100-continue\r\nContent-Length: 16777216\r\n\r\n";
        let mut input = head.as_bytes().to_vec();
        input.extend(std::iter::repeat_n(b'x', 3 * READ_CHUNK));
        let (result, output, read) = exchange_bytes(&input);
        assert!(result.is_ok());
        assert!(output.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{output}");
        assert!(!output.contains("100 Continue"), "{output}");
        assert!(output.contains("connection: close"));
        // What came with the head's first read and the bounded linger; never the rest of the body.
        assert!(read <= (READ_CHUNK + MAX_LINGER_BYTES) as u64, "{read} bytes read");

        let head =
            "POST /a HTTP/1.1\r\nAuthorization: good\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        let (result, output) = exchange(&format!("{head}abc"));
        assert!(result.is_ok());
        assert!(output.ends_with("\r\n\r\nabc"), "{output}");
    }

    /// Echo, whose answers to `GET /large` count as large: more than the whole budget.
    struct Large;
    impl Handler for Large {
        fn admit(&self, head: &Head) -> Admission {
            Echo.admit(head)
        }
        fn handle(&self, request: Request) -> Response {
            Response::with_body(200, "text/plain", request.head.path.into_bytes())
        }
        fn reject(&self, path: Option<&str>, error: &HttpError) -> Response {
            Echo.reject(path, error)
        }
        fn large_answer_bytes(&self, head: &Head) -> usize {
            if head.path == "/large" { MAX_LARGE_ANSWER_BYTES + 1 } else { 1024 }
        }
    }

    #[test]
    fn a_large_answer_past_the_budget_is_a_503_and_the_budget_comes_back() {
        let serve_one = |input: &'static [u8]| {
            let mut wire = Wire { input, output: Vec::new() };
            let result = smol::block_on(serve(&mut wire, Arc::new(Large), &mut Ticket::detached()));
            (result, String::from_utf8_lossy(&wire.output).into_owned())
        };
        let (result, output) = serve_one(b"GET /large HTTP/1.1\r\nAuthorization: good\r\n\r\n");
        assert!(matches!(result, Err(HttpError::Busy)), "{result:?}");
        assert!(output.starts_with("HTTP/1.1 503 ") && output.contains("retry-after: 2"), "{output}");
        // A small reservation is answered, and given back once written: many in a row pass.
        for _ in 0..3 {
            let (result, output) =
                serve_one(b"GET /small HTTP/1.1\r\nAuthorization: good\r\nConnection: close\r\n\r\n");
            assert!(result.is_ok(), "{result:?}");
            assert!(output.starts_with("HTTP/1.1 200 ") && output.ends_with("\r\n\r\n/small"), "{output}");
        }
        assert_eq!(ANSWER_BUDGET.used.load(Ordering::Acquire) % 1024, 0, "reservations are whole");
    }

    struct Panicky;
    impl Handler for Panicky {
        fn admit(&self, _: &Head) -> Admission {
            panic!("a bug in admission")
        }
        fn handle(&self, _: Request) -> Response {
            unreachable!("never admitted")
        }
        fn reject(&self, _: Option<&str>, _: &HttpError) -> Response {
            Response::empty(400)
        }
    }

    #[test]
    fn a_panicking_admission_costs_one_answer() {
        let mut wire = Wire { input: b"GET / HTTP/1.1\r\n\r\n", output: Vec::new() };
        let result = smol::block_on(serve(&mut wire, Arc::new(Panicky), &mut Ticket::detached()));
        assert!(result.is_ok());
        assert!(wire.output.starts_with(b"HTTP/1.1 500 "));
    }

    #[test]
    fn anonymous_bodies_are_small() {
        let text = format!("POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_ANONYMOUS_BODY_BYTES + 1);
        let (result, output) = exchange(&text);
        assert!(matches!(result, Err(HttpError::AnonymousBodyTooLarge(_))), "{result:?}");
        assert!(output.starts_with("HTTP/1.1 413 "), "{output}");
    }

    #[test]
    fn budgets_refuse_what_they_cannot_hold_and_take_back_what_is_freed() {
        let budget = Budget::new(10);
        assert!(budget.take(6));
        assert!(!budget.take(5));
        assert!(budget.take(4));
        budget.give(6);
        assert!(budget.take(6));
        assert!(!budget.take(usize::MAX));
        assert_eq!(HttpError::Busy.status(), Some(503));
        assert!(body_buffer(LARGE_BODY_BYTES).capacity() >= ALWAYS_MAPPED_BYTES);
        assert_eq!(body_buffer(10).capacity(), 10);
    }

    #[test]
    fn serves_pipelined_requests_and_refuses_chunked_ones() {
        let (result, output) = exchange(
            "POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhiPOST /b HTTP/1.1\r\nContent-Length: 3\r\n\r\nyou",
        );
        assert!(result.is_ok());
        assert_eq!(output.matches("HTTP/1.1 200 OK").count(), 2);
        assert!(output.ends_with("\r\n\r\nyou"));

        let (result, output) =
            exchange("POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n");
        assert!(matches!(result, Err(HttpError::Chunked)));
        assert!(output.starts_with("HTTP/1.1 411 Length Required\r\n"));
        assert!(output.contains("connection: close"));

        let (result, _) = exchange("POST /a HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort");
        assert!(matches!(result, Err(HttpError::Malformed(_))));
    }
}
