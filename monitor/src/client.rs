//! The CLI side of the agent's HTTP endpoint (`flows`, `status`, `detach`).

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// Sends one request to the agent at `addr` and returns the body.
pub async fn call(addr: SocketAddr, method: Method, path: &str) -> Result<String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| {
        anyhow!(
            "no egressmon agent answers on {addr} ({e}): start one with `egressmon run`, or pass the --listen it uses"
        )
    })?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        bail!("agent on {addr} answered {status}: {}", body.trim());
    }
    Ok(body)
}

pub fn get(addr: SocketAddr, path: &str) -> Result<String> {
    runtime()?.block_on(call(addr, Method::GET, path))
}

pub fn post(addr: SocketAddr, path: &str) -> Result<String> {
    runtime()?.block_on(call(addr, Method::POST, path))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
