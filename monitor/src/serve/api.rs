//! The agent's two endpoints.
//!
//! - The **control socket**, a unix socket in a root-only run directory:
//!   everything that reveals destinations, hosts or processes (`/flows`,
//!   `/status`) and the one control action (`POST /shutdown`). Each peer is
//!   checked with SO_PEERCRED: root, plus the uids of `--api-allow-uid`.
//! - **TCP** on `--listen`: `/metrics` for Prometheus and nothing else. Its
//!   labels carry uids and owners, never a destination. Who may scrape is
//!   `MetricsAccess`; the `Host` header is checked on every request so a web
//!   page cannot read it through DNS rebinding. `--web-config-file` adds TLS
//!   and basic auth (`web_config`).
//!
//! Both are bounded: a connection limit (a new connection evicts the
//! oldest), a header timeout on hyper's timer, a cap on a connection's age,
//! backoff when accept fails (EMFILE), and the blocking work (kernel map
//! reads, rendering) on tokio's blocking pool behind a small semaphore, so
//! API load neither starves the async workers nor the ring readers (which
//! run on threads of their own).

use crate::agent::Agent;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::{BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{oneshot, Notify, Semaphore};

/// A client must send a whole request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, idle keep-alive or not.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Live connections per endpoint; the oldest goes when one more arrives.
const TCP_CONNECTIONS: usize = 128;
const CONTROL_CONNECTIONS: usize = 32;
/// Map reads and renders at once: the rest wait, they do not pile up on
/// the kernel lock the flow poller needs.
const RENDERS: usize = 2;

/// Who may scrape `/metrics` over TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MetricsAccess {
    /// Anyone who can reach the address (the Linux default, as
    /// node_exporter: the metrics carry no destination).
    Anyone,
    /// Only local peers whose socket belongs to one of these uids (the
    /// Android default: root and shell, i.e. `adb forward`).
    Uids(BTreeSet<u32>),
}

/// Where and to whom the agent answers.
#[derive(Debug, Clone)]
pub(crate) struct ApiOptions {
    pub(crate) listen: SocketAddr,
    /// The control socket (in a directory checked to be root's).
    pub(crate) socket: PathBuf,
    /// Uids besides root that may use the control socket.
    pub(crate) control_uids: BTreeSet<u32>,
    pub(crate) metrics: MetricsAccess,
    /// `--web-config-file`: basic auth for scrapes.
    pub(crate) web: Arc<crate::serve::web_config::WebConfig>,
    /// Marked on a loopback listener (and so on every answer it sends):
    /// the kernel programs leave the agent's own packets uncounted.
    pub(crate) own_mark: u32,
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()))
        .expect("static response parts")
}

fn text(status: StatusCode, body: &str) -> Reply {
    reply(status, "text/plain", format!("{body}\n"))
}

/// The work shared by both endpoints: one agent, bounded renders.
struct Shared {
    agent: Arc<Agent>,
    renders: Semaphore,
    shutdown: Arc<Notify>,
    listen: SocketAddr,
    web: Arc<crate::serve::web_config::WebConfig>,
}

impl Shared {
    /// Runs `work` on the blocking pool, at most `RENDERS` at a time.
    async fn render<T, F>(&self, work: F) -> anyhow::Result<T>
    where
        F: FnOnce(&Agent) -> anyhow::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let _permit = self.renders.acquire().await?;
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || work(&agent)).await?
    }

    async fn json<T, F>(&self, work: F) -> Reply
    where
        F: FnOnce(&Agent) -> anyhow::Result<T> + Send + 'static,
        T: serde::Serialize + Send + 'static,
    {
        let body = self
            .render(move |agent| Ok(serde_json::to_vec_pretty(&work(agent)?)?))
            .await;
        match body {
            Ok(body) => reply(StatusCode::OK, "application/json", body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
        }
    }

    async fn metrics(&self) -> Reply {
        match self.render(crate::serve::metrics::render).await {
            Ok(body) => reply(StatusCode::OK, "text/plain; version=0.0.4", body),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e:#}")),
        }
    }

    /// The control socket's routes; `root`: the peer is root (the only
    /// one who may change blocks).
    async fn control(&self, req: Request<Incoming>, root: bool) -> Reply {
        match (req.method(), req.uri().path()) {
            (&Method::POST, "/block" | "/unblock") if !root => text(
                StatusCode::FORBIDDEN,
                "only root may change blocks: run egressmon block/unblock as root",
            ),
            (&Method::POST, "/block") => {
                let body = match read_body(req).await {
                    Ok(body) => body,
                    Err(e) => return text(StatusCode::BAD_REQUEST, &e),
                };
                self.change_blocks(move |agent| agent.block(&body)).await
            }
            (&Method::POST, "/unblock") => {
                let query = req.uri().query().unwrap_or("").to_string();
                self.change_blocks(move |agent| agent.unblock(&query)).await
            }
            (&Method::GET, "/flows") => {
                let limit = flows_limit(req.uri().query());
                self.json(move |agent| {
                    let mut flows = agent.flows()?;
                    flows.truncate(limit);
                    Ok(flows)
                })
                .await
            }
            (&Method::GET, "/status") => self.json(|agent| agent.status()).await,
            (&Method::GET, "/metrics") => self.metrics().await,
            (&Method::POST, "/shutdown") => {
                self.shutdown.notify_one();
                text(StatusCode::OK, "stopping")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "try /flows, /status or /metrics (GET), /shutdown, /block or /unblock (POST)",
            ),
        }
    }

    /// Runs a change of the block rules; its error goes back as a 400.
    async fn change_blocks<F>(&self, work: F) -> Reply
    where
        F: FnOnce(&Agent) -> anyhow::Result<String> + Send + 'static,
    {
        match self.render(work).await {
            Ok(done) => text(StatusCode::OK, &done),
            Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e:#}")),
        }
    }

    /// The TCP routes: `/metrics` only, for an expected `Host`.
    async fn public(&self, req: Request<Incoming>) -> Reply {
        let host = req
            .headers()
            .get(hyper::header::HOST)
            .and_then(|h| h.to_str().ok());
        if !host_allowed(host, self.listen) {
            return text(
                StatusCode::MISDIRECTED_REQUEST,
                "unexpected Host header: address the agent by IP or localhost",
            );
        }
        if !self.authorized(&req).await {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header("www-authenticate", "Basic realm=\"egressmon\"")
                .body(Full::new(Bytes::from_static(b"authentication required\n")))
                .expect("static response parts");
        }
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => self.metrics().await,
            (_, "/flows" | "/status" | "/shutdown") => text(
                StatusCode::FORBIDDEN,
                "only /metrics is served over TCP; flows, status and control go through the \
                 agent's root-only control socket (egressmon flows|status|detach)",
            ),
            _ => text(StatusCode::NOT_FOUND, "try /metrics"),
        }
    }
}

impl Shared {
    /// Basic auth of `--web-config-file`, if any; bcrypt off the async
    /// workers and behind the render semaphore, so guessing costs the
    /// guesser, not the agent's other clients.
    async fn authorized(&self, req: &Request<Incoming>) -> bool {
        if !self.web.requires_auth() {
            return true;
        }
        let header = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string);
        let web = self.web.clone();
        let Ok(_permit) = self.renders.acquire().await else {
            return false;
        };
        tokio::task::spawn_blocking(move || web.authorized(header.as_deref()))
            .await
            .unwrap_or(false)
    }
}

/// `limit=N` of a `/flows` query; everything without one.
/// Largest request body the control socket reads (a block rule).
const MAX_BODY: usize = 64 * 1024;

async fn read_body(req: Request<Incoming>) -> Result<String, String> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    let bytes = limited
        .collect()
        .await
        .map_err(|e| format!("reading the request: {e}"))?
        .to_bytes();
    String::from_utf8(bytes.to_vec()).map_err(|_| "the request is not UTF-8".to_string())
}

fn flows_limit(query: Option<&str>) -> usize {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|pair| pair.strip_prefix("limit=")?.parse().ok())
        .unwrap_or(usize::MAX)
}

/// A `Host` a browser sends only when the page itself was loaded from that
/// address: an IP literal, `localhost`, or this machine's name. A name an
/// attacker controls (DNS rebinding) is refused.
fn host_allowed(host: Option<&str>, listen: SocketAddr) -> bool {
    let Some(host) = host else {
        // HTTP/1.0 clients may send none; a browser always does.
        return true;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    if name.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    !listen.ip().is_loopback() && hostname().is_some_and(|h| name.eq_ignore_ascii_case(&h))
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string())
}

/// Live connections of one endpoint. Admitting one past the limit evicts
/// the oldest, so a flood of idle or slow clients cannot lock out a fresh
/// scrape or root's CLI: those send their request at once and are done
/// long before they become the oldest.
struct Gate {
    limit: usize,
    live: Mutex<VecDeque<(u64, oneshot::Sender<()>)>>,
    next: AtomicU64,
}

impl Gate {
    fn new(limit: usize) -> Arc<Gate> {
        Arc::new(Gate {
            limit,
            live: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(0),
        })
    }

    fn admit(&self) -> (u64, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (evict, evicted) = oneshot::channel();
        let mut live = self.live.lock().unwrap();
        while live.len() >= self.limit {
            if let Some((_, oldest)) = live.pop_front() {
                let _ = oldest.send(());
            }
        }
        live.push_back((id, evict));
        (id, evicted)
    }

    fn leave(&self, id: u64) {
        self.live.lock().unwrap().retain(|(live, _)| *live != id);
    }
}

/// Serves one connection until it ends, is evicted or gets too old.
fn serve_connection<S, F, Fut>(gate: Arc<Gate>, io: S, route: F)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let (id, evicted) = gate.admit();
    tokio::spawn(async move {
        let service = service_fn(move |req| {
            let answer = route(req);
            async move { Ok::<_, Infallible>(answer.await) }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(64 * 1024);
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::select! {
            _ = connection => {}
            _ = evicted => {}
            _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
        }
        gate.leave(id);
    });
}

/// Waits after a failed accept (EMFILE, ENFILE, ENOMEM...) instead of
/// spinning on it: 10 ms doubling to 1 s, reset by the next success.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(Duration::ZERO)
    }

    async fn failed(&mut self, what: &str, e: std::io::Error) {
        self.0 = (self.0 * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
        if self.0 == Duration::from_secs(1) {
            log::warn!("accepting on {what}: {e}; retrying every second");
        }
        tokio::time::sleep(self.0).await;
    }
}

/// What a refused control peer reads before its connection is closed.
const REFUSED: &str =
    "this uid may not use the control socket: run as root, or start the agent with --api-allow-uid UID\n";

/// Answers a refused peer with 403 and closes. The request head is read
/// first (bounded in size and time): closing a unix socket with unread
/// data resets it, and the client would see no answer at all.
async fn refuse(mut stream: impl AsyncRead + AsyncWrite + Unpin) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\nconnection: close\r\n\
         content-length: {}\r\n\r\n{REFUSED}",
        REFUSED.len()
    );
    let exchange = async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), exchange).await;
}

/// Removes the control socket when the agent stops serving.
pub(crate) struct ControlSocket(PathBuf);

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds both endpoints (failing early with a clear message) and serves
/// until the runtime stops. `shutdown` is notified by `POST /shutdown`.
pub(crate) async fn serve(
    options: ApiOptions,
    agent: Arc<Agent>,
    shutdown: Arc<Notify>,
) -> anyhow::Result<ControlSocket> {
    let addr = options.listen;
    let tcp = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr}: {e} (is another egressmon running? pass --listen ADDR)"
        )
    })?;
    mark_own(&tcp, options.own_mark);
    let control = bind_control(&options.socket, !options.control_uids.is_empty())?;
    log::info!(
        "serving /metrics on http://{}; flows, status and control on {}",
        tcp.local_addr()?,
        options.socket.display()
    );
    let shared = Arc::new(Shared {
        agent,
        renders: Semaphore::new(RENDERS),
        shutdown,
        listen: addr,
        web: options.web.clone(),
    });
    tokio::spawn(accept_control(
        control,
        options.control_uids,
        shared.clone(),
    ));
    let remote_ok = options.web.admits_remote();
    tokio::spawn(accept_tcp(tcp, options.metrics, remote_ok, shared));
    Ok(ControlSocket(options.socket))
}

async fn accept_control(listener: UnixListener, uids: BTreeSet<u32>, shared: Arc<Shared>) {
    let gate = Gate::new(CONTROL_CONNECTIONS);
    let mut backoff = Backoff::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                backoff.failed("the control socket", e).await;
                continue;
            }
        };
        backoff = Backoff::new();
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !uid.is_some_and(|uid| uid == 0 || uids.contains(&uid)) {
            log::debug!("control socket: refused a peer of uid {uid:?}");
            tokio::spawn(refuse(stream));
            continue;
        }
        let shared = shared.clone();
        let root = uid == Some(0);
        serve_connection(gate.clone(), stream, move |req| {
            let shared = shared.clone();
            async move { shared.control(req, root).await }
        });
    }
}

async fn accept_tcp(
    listener: TcpListener,
    access: MetricsAccess,
    remote_ok: bool,
    shared: Arc<Shared>,
) {
    let gate = Gate::new(TCP_CONNECTIONS);
    let mut backoff = Backoff::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                backoff.failed("the metrics address", e).await;
                continue;
            }
        };
        backoff = Backoff::new();
        let shared = shared.clone();
        let gate = gate.clone();
        let access = access.clone();
        let tls = shared.web.tls().cloned();
        tokio::spawn(async move {
            if !may_scrape(&access, remote_ok, &stream, peer).await {
                log::debug!("/metrics: refused {peer}");
                return;
            }
            let route = move |req| {
                let shared = shared.clone();
                async move { shared.public(req).await }
            };
            let Some(tls) = tls else {
                return serve_connection(gate, stream, route);
            };
            // A handshake is bounded like a request head.
            match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(stream)) => serve_connection(gate, stream, route),
                Ok(Err(e)) => log::debug!("/metrics: TLS handshake with {peer}: {e}"),
                Err(_) => log::debug!("/metrics: TLS handshake with {peer} timed out"),
            }
        });
    }
}

/// Whether the peer may scrape: by the uid owning its socket, which the
/// kernel knows for local peers only. A remote peer has none: it is refused
/// unless everyone may, or basic auth (`remote_ok`) checks each request.
async fn may_scrape(
    access: &MetricsAccess,
    remote_ok: bool,
    stream: &tokio::net::TcpStream,
    peer: SocketAddr,
) -> bool {
    let MetricsAccess::Uids(uids) = access else {
        return true;
    };
    let Ok(local) = stream.local_addr() else {
        return false;
    };
    let lookup =
        tokio::task::spawn_blocking(move || crate::serve::peer::tcp_client_uid(local, peer));
    match lookup.await {
        Ok(Ok(Some(uid))) => uids.contains(&uid),
        Ok(Ok(None)) => remote_ok,
        Ok(Err(e)) => {
            log::warn!("/metrics: cannot tell the uid of {peer}: {e}");
            false
        }
        Err(e) => {
            log::warn!("/metrics: cannot tell the uid of {peer}: {e}");
            false
        }
    }
}

/// Marks a loopback listener so the kernel programs skip what the agent
/// sends through it: its accepted sockets and their SYN-ACKs take the
/// listener's mark. Not beyond loopback: on Android a mark also steers
/// routing (netd's fwmark rules), which loopback answers never consult.
fn mark_own(listener: &TcpListener, mark: u32) {
    if mark == 0 || !listener.local_addr().is_ok_and(|a| a.ip().is_loopback()) {
        return;
    }
    if let Err(e) = socket2::SockRef::from(listener).set_mark(mark) {
        log::warn!(
            "marking the /metrics listener: {e}; the agent's answers to scrapes will be counted"
        );
    }
}

/// Binds the control socket, replacing a stale one (a dead agent's) but
/// never a live agent's or anything that is not a socket. With other uids
/// allowed, the socket is writable by all and SO_PEERCRED decides.
fn bind_control(path: &Path, open_to_others: bool) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            anyhow::bail!(
                "{} exists and is not a socket: remove it, or pick another --run-dir",
                path.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "another egressmon agent serves {}: stop it with `egressmon detach`, or pass \
                 another --listen",
                path.display()
            );
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot create the control socket {}: {e}", path.display()))?;
    let mode = if open_to_others { 0o666 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_must_name_the_agent_not_a_rebound_domain() {
        let listen: SocketAddr = "127.0.0.1:9864".parse().unwrap();
        assert!(host_allowed(Some("127.0.0.1:9864"), listen));
        assert!(host_allowed(Some("localhost:9864"), listen));
        assert!(host_allowed(Some("[::1]:9864"), listen));
        assert!(host_allowed(Some("10.0.0.2"), listen));
        assert!(host_allowed(None, listen));
        assert!(!host_allowed(Some("attacker.example:9864"), listen));
        assert!(!host_allowed(Some("attacker.example"), listen));
    }

    #[test]
    fn flows_limit_is_read_from_the_query() {
        assert_eq!(flows_limit(None), usize::MAX);
        assert_eq!(flows_limit(Some("limit=5")), 5);
        assert_eq!(flows_limit(Some("a=1&limit=7")), 7);
        assert_eq!(flows_limit(Some("limit=x")), usize::MAX);
    }

    #[test]
    fn a_full_gate_evicts_its_oldest_connection() {
        let gate = Gate::new(2);
        let (first, mut first_evicted) = gate.admit();
        let (_, mut second_evicted) = gate.admit();
        let (_, _third) = gate.admit();
        assert!(first_evicted.try_recv().is_ok());
        assert!(second_evicted.try_recv().is_err());
        gate.leave(first);
        assert_eq!(gate.live.lock().unwrap().len(), 2);
    }
}
