//! The agent's HTTP endpoint on `--listen`: `/metrics` for Prometheus,
//! `/flows` and `/status` (JSON) for the CLI, `POST /shutdown` for `detach`.

use crate::agent::Agent;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::Notify;

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts")
}

fn json<T: serde::Serialize>(result: anyhow::Result<T>) -> Response<Full<Bytes>> {
    match result.and_then(|v| Ok(serde_json::to_string_pretty(&v)?)) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{e:#}\n"),
        ),
    }
}

async fn handle(
    agent: Arc<Agent>,
    shutdown: Arc<Notify>,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => match crate::metrics::render(&agent) {
            Ok(text) => reply(StatusCode::OK, "text/plain; version=0.0.4", text),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e:#}\n"),
            ),
        },
        (&Method::GET, "/flows") => json(agent.flows()),
        (&Method::GET, "/status") => json(agent.status()),
        // The only control request; never from the network, whatever --listen is.
        (&Method::POST, "/shutdown") if !peer.ip().is_loopback() => reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "control requests are accepted from loopback only\n".into(),
        ),
        (&Method::POST, "/shutdown") => {
            shutdown.notify_one();
            reply(StatusCode::OK, "text/plain", "stopping\n".into())
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /flows or /status\n".into(),
        ),
    };
    Ok(response)
}

/// Binds `addr` (fails early with a clear message) and serves until the
/// runtime stops.
pub async fn serve(
    addr: SocketAddr,
    agent: Arc<Agent>,
    shutdown: Arc<Notify>,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {addr}: {e} (is another egressmon running? pass --listen ADDR)"
        )
    })?;
    log::info!(
        "serving /metrics, /flows and /status on http://{}",
        listener.local_addr()?
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let (agent, shutdown) = (agent.clone(), shutdown.clone());
            tokio::spawn(async move {
                let service =
                    service_fn(move |req| handle(agent.clone(), shutdown.clone(), peer, req));
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(())
}
