//! `--web-config-file`: who may scrape `/metrics` from elsewhere, and over
//! what, in the Prometheus exporter-toolkit layout (the file node_exporter
//! takes), so an existing scrape config's `tls_config` and `basic_auth`
//! work unchanged:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: egressmon.crt      # PEM chain; paths relative to this file
//!   key_file: egressmon.key       # PEM private key
//!   # client_auth_type: RequireAndVerifyClientCert
//!   # client_ca_file: clients.crt
//!   # min_version: TLS13
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt, e.g. from `htpasswd -nBC 10 prometheus`
//! ```
//!
//! TLS is rustls with the graviola provider: pure Rust and assembly, no C
//! toolchain, so the static phone binary carries it too.

use anyhow::{bail, Context, Result};
use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<TlsFile>,
    #[serde(default)]
    http_server_config: Option<serde_norway::Value>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    cert_file: PathBuf,
    key_file: PathBuf,
    #[serde(default)]
    client_auth_type: Option<String>,
    #[serde(default)]
    client_ca_file: Option<PathBuf>,
    #[serde(default)]
    min_version: Option<String>,
    #[serde(default)]
    max_version: Option<String>,
}

/// Users and their bcrypt hashes, and the TLS set-up; answers already
/// checked are remembered (as the exporter toolkit does), so bcrypt's cost
/// is paid once per credential, not per scrape.
#[derive(Default)]
pub(crate) struct WebConfig {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// TLS requires client certificates the server verifies.
    client_certs: bool,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl WebConfig {
    pub(crate) fn load(path: &Path) -> Result<WebConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --web-config-file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        WebConfig::parse(&text, base)
            .with_context(|| format!("--web-config-file {}", path.display()))
    }

    fn parse(text: &str, base: &Path) -> Result<WebConfig> {
        let file: File = serde_norway::from_str(text).context(
            "expected the exporter-toolkit layout (tls_server_config, basic_auth_users)",
        )?;
        if file.http_server_config.is_some() {
            bail!("http_server_config: not supported (HTTP/2 and custom headers are not served)");
        }
        for (user, hash) in &file.basic_auth_users {
            if !hash.starts_with("$2") {
                bail!("basic_auth_users.{user}: expected a bcrypt hash ($2a$/$2b$/$2y$...)");
            }
        }
        let tls = match &file.tls_server_config {
            Some(tls) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
                server_config(tls, base).context("tls_server_config")?,
            ))),
            None => None,
        };
        let client_certs = file
            .tls_server_config
            .as_ref()
            .is_some_and(|t| t.client_auth_type.as_deref() == Some("RequireAndVerifyClientCert"));
        Ok(WebConfig {
            users: file.basic_auth_users,
            verified: Mutex::default(),
            tls,
            client_certs,
        })
    }

    /// The TLS acceptor when `tls_server_config` is given.
    pub(crate) fn tls(&self) -> Option<&tokio_rustls::TlsAcceptor> {
        self.tls.as_ref()
    }

    /// Whether scrapes must give a password.
    pub(crate) fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Whether peers on other hosts may scrape: each authenticates, with a
    /// password or a client certificate the server verifies.
    pub(crate) fn admits_remote(&self) -> bool {
        self.requires_auth() || self.client_certs
    }

    /// Checks an `Authorization` header value; bcrypt runs on the caller's
    /// thread (call it from the blocking pool).
    pub(crate) fn authorized(&self, header: Option<&str>) -> bool {
        if !self.requires_auth() {
            return true;
        }
        let Some(credential) = header.and_then(|h| h.strip_prefix("Basic ")) else {
            return false;
        };
        if self.verified.lock().unwrap().contains(credential) {
            return true;
        }
        let Some((user, password)) = decode(credential) else {
            return false;
        };
        let ok = self
            .users
            .get(&user)
            .is_some_and(|hash| bcrypt::verify(&password, hash).unwrap_or(false));
        if ok {
            let mut verified = self.verified.lock().unwrap();
            // Bounded: a handful of scrapers, never one entry per attempt.
            if verified.len() < 64 {
                verified.insert(credential.to_string());
            }
        }
        ok
    }
}

fn tls_version(name: &str) -> Result<&'static rustls::SupportedProtocolVersion> {
    match name {
        "TLS12" => Ok(&rustls::version::TLS12),
        "TLS13" => Ok(&rustls::version::TLS13),
        other => bail!("TLS version {other:?}: egressmon speaks TLS12 and TLS13"),
    }
}

/// rustls' server set-up from the exporter-toolkit fields.
fn server_config(tls: &TlsFile, base: &Path) -> Result<rustls::ServerConfig> {
    let at = |p: &Path| base.join(p);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(at(&tls.cert_file))
        .and_then(|certs| certs.collect())
        .with_context(|| {
            format!(
                "cert_file {}: expected PEM certificates",
                tls.cert_file.display()
            )
        })?;
    if certs.is_empty() {
        bail!(
            "cert_file {}: no certificate in it",
            tls.cert_file.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(at(&tls.key_file)).with_context(|| {
        format!(
            "key_file {}: expected a PEM private key",
            tls.key_file.display()
        )
    })?;
    let is_13 = |name: &Option<String>| -> Result<Option<bool>> {
        name.as_deref()
            .map(|n| Ok(tls_version(n)?.version == rustls::ProtocolVersion::TLSv1_3))
            .transpose()
    };
    let mut versions = vec![&rustls::version::TLS12, &rustls::version::TLS13];
    if is_13(&tls.min_version)? == Some(true) {
        versions.retain(|v| v.version == rustls::ProtocolVersion::TLSv1_3);
    }
    if is_13(&tls.max_version)? == Some(false) {
        versions.retain(|v| v.version == rustls::ProtocolVersion::TLSv1_2);
    }
    if versions.is_empty() {
        bail!("min_version is above max_version");
    }
    let provider = Arc::new(rustls_graviola::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&versions)?;
    let builder = match (tls.client_auth_type.as_deref(), &tls.client_ca_file) {
        (None | Some("NoClientCert"), _) => builder.with_no_client_auth(),
        (Some("RequireAndVerifyClientCert"), Some(ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(at(ca))
                .with_context(|| format!("client_ca_file {}", ca.display()))?
            {
                roots.add(cert?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        (Some("RequireAndVerifyClientCert"), None) => {
            bail!("client_auth_type RequireAndVerifyClientCert needs client_ca_file")
        }
        (Some(other), _) => bail!(
            "client_auth_type {other:?}: egressmon supports NoClientCert and \
             RequireAndVerifyClientCert"
        ),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .context("the certificate and key do not go together")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn decode(credential: &str) -> Option<(String, String)> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(credential.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(user: &str, password: &str) -> String {
        let raw = format!("{user}:{password}");
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    #[test]
    fn basic_auth_users_are_checked_against_bcrypt_hashes() {
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        let config = WebConfig::parse(
            &format!("basic_auth_users:\n  prom: '{hash}'\n"),
            Path::new("."),
        )
        .unwrap();
        assert!(config.requires_auth());
        assert!(config.authorized(Some(&basic("prom", "s3cret"))));
        assert!(config.authorized(Some(&basic("prom", "s3cret"))), "cached");
        assert!(!config.authorized(Some(&basic("prom", "wrong"))));
        assert!(!config.authorized(Some(&basic("eve", "s3cret"))));
        assert!(!config.authorized(Some("Bearer x")));
        assert!(!config.authorized(None));
    }

    #[test]
    fn bad_tls_and_unknown_fields_are_refused_clearly() {
        let here = Path::new(".");
        let missing = WebConfig::parse("tls_server_config:\n  cert_file: a\n  key_file: b\n", here);
        assert!(format!("{:#}", missing.unwrap_err()).contains("cert_file a"));
        let typo = WebConfig::parse("basic_auth_user:\n  a: b\n", here);
        assert!(format!("{:#}", typo.unwrap_err()).contains("unknown field"));
        let plain = WebConfig::parse("basic_auth_users:\n  a: hunter2\n", here);
        assert!(format!("{:#}", plain.unwrap_err()).contains("bcrypt"));
        let config = WebConfig::parse("{}", here).unwrap();
        assert!(!config.requires_auth() && config.tls().is_none());
    }
}
