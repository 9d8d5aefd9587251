//! The CLI side of the agent's control socket (`flows`, `status`, `top`,
//! `detach`): HTTP/1.1 over a unix socket in the root-only run directory.

use anyhow::{anyhow, bail, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one request to the agent may take, connect to last byte.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One agent's control socket: `RUN_DIR/api-ADDR-PORT.sock`, named after
/// the agent's `--listen` address so several agents can share a run
/// directory and each CLI command finds its own from the same flags.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub socket: PathBuf,
}

impl Endpoint {
    pub fn new(run_dir: &Path, listen: SocketAddr) -> Endpoint {
        let name = format!("api-{}-{}.sock", listen.ip(), listen.port()).replace(':', "_");
        Endpoint {
            socket: run_dir.join(name),
        }
    }

    /// GET `path`, returning the body.
    pub fn get(&self, path: &str) -> Result<String> {
        runtime()?.block_on(self.call(Method::GET, path))
    }

    /// POST `path`, returning the body.
    pub(crate) fn post(&self, path: &str) -> Result<String> {
        runtime()?.block_on(self.call(Method::POST, path))
    }

    /// POST `body` to `path`, returning the answer's body.
    pub(crate) fn post_body(&self, path: &str, body: String) -> Result<String> {
        runtime()?.block_on(self.call_with(Method::POST, path, body))
    }

    /// Sends one request and returns the body of a successful answer.
    pub(crate) async fn call(&self, method: Method, path: &str) -> Result<String> {
        self.call_with(method, path, String::new()).await
    }

    async fn call_with(&self, method: Method, path: &str, body: String) -> Result<String> {
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, body))
            .await
            .map_err(|_| {
                anyhow!(
                    "the agent on {} did not answer within {}s",
                    self.socket.display(),
                    CALL_TIMEOUT.as_secs()
                )
            })?
    }

    async fn exchange(&self, method: Method, path: &str, body: String) -> Result<String> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| self.connect_error(e))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "egressmon")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            bail!(
                "the agent on {} answered {status}: {}",
                self.socket.display(),
                body.trim()
            );
        }
        Ok(body)
    }

    fn connect_error(&self, e: std::io::Error) -> anyhow::Error {
        let socket = self.socket.display();
        match e.kind() {
            std::io::ErrorKind::PermissionDenied => anyhow!(
                "cannot reach the agent's control socket {socket} ({e}): it is root's; run this \
                 as root, or start the agent with --api-allow-uid YOUR_UID"
            ),
            _ => anyhow!(
                "no egressmon agent answers on {socket} ({e}): start one with `egressmon run`, \
                 or pass the --listen and --run-dir it uses"
            ),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names_follow_the_listen_address() {
        let run = Path::new("/run/egressmon");
        let v4 = Endpoint::new(run, "127.0.0.1:9864".parse().unwrap());
        assert_eq!(
            v4.socket,
            Path::new("/run/egressmon/api-127.0.0.1-9864.sock")
        );
        let v6 = Endpoint::new(run, "[::1]:9864".parse().unwrap());
        assert_eq!(v6.socket, Path::new("/run/egressmon/api-__1-9864.sock"));
    }
}
