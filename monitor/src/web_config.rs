//! `--web-config-file`: who may scrape `/metrics` from elsewhere, in the
//! Prometheus exporter-toolkit layout (the file node_exporter takes), so an
//! existing scrape config's `basic_auth` works unchanged:
//!
//! ```yaml
//! basic_auth_users:
//!   prometheus: $2y$10$...   # bcrypt, e.g. from `htpasswd -nBC 10 prometheus`
//! ```
//!
//! `tls_server_config` is refused with a clear error: this build carries no
//! TLS stack (it would need a C toolchain for every phone target); terminate
//! TLS in front of the agent, or scrape through `adb forward` or SSH.

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tls_server_config: Option<serde_norway::Value>,
    #[serde(default)]
    http_server_config: Option<serde_norway::Value>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
}

/// Users and their bcrypt hashes; answers already checked are remembered
/// (as the exporter toolkit does), so bcrypt's cost is paid once per
/// credential, not per scrape.
#[derive(Debug, Default)]
pub struct WebConfig {
    users: BTreeMap<String, String>,
    verified: Mutex<HashSet<String>>,
}

impl WebConfig {
    pub fn load(path: &Path) -> Result<WebConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading --web-config-file {}", path.display()))?;
        WebConfig::parse(&text).with_context(|| format!("--web-config-file {}", path.display()))
    }

    fn parse(text: &str) -> Result<WebConfig> {
        let file: File = serde_norway::from_str(text).context(
            "expected the exporter-toolkit layout (basic_auth_users: {user: bcrypt hash})",
        )?;
        if file.tls_server_config.is_some() {
            bail!(
                "tls_server_config: this egressmon has no TLS built in; terminate TLS in front of \
                 it (a reverse proxy on the same host) or scrape through `adb forward` or SSH"
            );
        }
        if file.http_server_config.is_some() {
            bail!("http_server_config: not supported (HTTP/2 and custom headers are not served)");
        }
        for (user, hash) in &file.basic_auth_users {
            if !hash.starts_with("$2") {
                bail!("basic_auth_users.{user}: expected a bcrypt hash ($2a$/$2b$/$2y$...)");
            }
        }
        Ok(WebConfig {
            users: file.basic_auth_users,
            verified: Mutex::default(),
        })
    }

    /// Whether scrapes must authenticate.
    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// Checks an `Authorization` header value; bcrypt runs on the caller's
    /// thread (call it from the blocking pool).
    pub fn authorized(&self, header: Option<&str>) -> bool {
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
        let config = WebConfig::parse(&format!("basic_auth_users:\n  prom: '{hash}'\n")).unwrap();
        assert!(config.requires_auth());
        assert!(config.authorized(Some(&basic("prom", "s3cret"))));
        assert!(config.authorized(Some(&basic("prom", "s3cret"))), "cached");
        assert!(!config.authorized(Some(&basic("prom", "wrong"))));
        assert!(!config.authorized(Some(&basic("eve", "s3cret"))));
        assert!(!config.authorized(Some("Bearer x")));
        assert!(!config.authorized(None));
    }

    #[test]
    fn tls_and_unknown_fields_are_refused_clearly() {
        let tls = WebConfig::parse("tls_server_config:\n  cert_file: a\n  key_file: b\n");
        assert!(format!("{:#}", tls.unwrap_err()).contains("no TLS built in"));
        let typo = WebConfig::parse("basic_auth_user:\n  a: b\n");
        assert!(format!("{:#}", typo.unwrap_err()).contains("unknown field"));
        let plain = WebConfig::parse("basic_auth_users:\n  a: hunter2\n");
        assert!(format!("{:#}", plain.unwrap_err()).contains("bcrypt"));
        assert!(!WebConfig::parse("{}").unwrap().requires_auth());
    }
}
