//! UID -> owner: who a uid is (login account, service account, Android app
//! or platform daemon) and whether it counts as firmware.
//!
//! Linux: /etc/passwd names accounts; uid 0 and accounts below UID_MIN
//! (/etc/login.defs, default 1000) or with a no-login shell are `system`.
//! Android (a device, or `--android-root DIR`): uid = user * 100000 + app id;
//! app ids below 10000 are `platform`, packages.list names apps.

use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use monitor_common::KERNEL_UID;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub uid: u32,
    pub user: u32,
    pub app_id: u32,
    pub owner: String,
    pub packages: Vec<String>,
    pub origin: String,
    pub firmware: bool,
}

#[derive(Debug, Clone)]
struct Account {
    name: String,
    login: bool,
}

/// Platform AIDs egressmon names without a device's help (system/core's
/// android_filesystem_config.h).
const AIDS: &[(u32, &str)] = &[
    (0, "root"),
    (1000, "system"),
    (1001, "radio"),
    (1002, "bluetooth"),
    (1003, "graphics"),
    (1010, "wifi"),
    (1013, "media"),
    (1016, "vpn"),
    (1021, "gps"),
    (1027, "nfc"),
    (1029, "clat"),
    (1051, "dns"),
    (1052, "dns_tether"),
    (1073, "network_stack"),
    (2000, "shell"),
    (3003, "inet"),
    (9999, "nobody"),
];

pub struct OwnerResolver {
    android: bool,
    accounts: HashMap<u32, Account>,
    packages: HashMap<u32, Vec<String>>,
    uid_min: u32,
}

fn parse_passwd(text: &str) -> HashMap<u32, Account> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 {
            continue;
        }
        let Ok(uid) = fields[2].parse::<u32>() else {
            continue;
        };
        let shell = fields[6];
        let login = !(shell.ends_with("nologin") || shell.ends_with("/false") || shell.is_empty());
        out.entry(uid).or_insert(Account {
            name: fields[0].to_string(),
            login,
        });
    }
    out
}

fn parse_uid_min(text: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next() == Some("UID_MIN"))
            .then(|| it.next()?.parse().ok())
            .flatten()
    })
}

fn parse_packages_list(text: &str) -> HashMap<u32, Vec<String>> {
    let mut out: HashMap<u32, Vec<String>> = HashMap::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(name), Some(uid)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(uid) = uid.parse::<u32>() else {
            continue;
        };
        out.entry(uid).or_default().push(name.to_string());
    }
    out
}

impl OwnerResolver {
    /// Reads the host's sources; `android_root` points at a device layout.
    pub fn new(android_root: Option<&Path>) -> OwnerResolver {
        let root = android_root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        let packages_list = root.join("data/system/packages.list");
        let android = android_root.is_some() || packages_list.exists();
        let packages = std::fs::read_to_string(&packages_list)
            .map(|t| parse_packages_list(&t))
            .unwrap_or_default();
        let accounts = if android {
            HashMap::new()
        } else {
            std::fs::read_to_string("/etc/passwd")
                .map(|t| parse_passwd(&t))
                .unwrap_or_default()
        };
        let uid_min = std::fs::read_to_string("/etc/login.defs")
            .ok()
            .and_then(|t| parse_uid_min(&t))
            .unwrap_or(1000);
        OwnerResolver {
            android,
            accounts,
            packages,
            uid_min,
        }
    }

    /// Every uid the sources name (accounts, packages) and every fixed AID.
    pub fn known_owners(&self) -> Vec<Owner> {
        let mut uids: Vec<u32> = self
            .accounts
            .keys()
            .chain(self.packages.keys())
            .copied()
            .collect();
        if self.android {
            uids.extend(AIDS.iter().map(|(id, _)| *id));
        }
        uids.sort_unstable();
        uids.dedup();
        uids.into_iter().map(|uid| self.resolve(uid)).collect()
    }

    pub fn resolve(&self, uid: u32) -> Owner {
        let (user, app_id) = (uid / 100_000, uid % 100_000);
        let mut owner = Owner {
            uid,
            user,
            app_id,
            owner: format!("uid {uid}"),
            packages: Vec::new(),
            origin: "unknown".into(),
            firmware: false,
        };
        if uid == KERNEL_UID {
            owner.owner = "kernel".into();
            owner.origin = if self.android { "platform" } else { "system" }.into();
            owner.firmware = true;
            return owner;
        }
        if self.android {
            if let Some(pkgs) = self.packages.get(&uid) {
                owner.owner = pkgs[0].clone();
                owner.packages = pkgs.clone();
                owner.origin = "app".into();
            } else if app_id < 10_000 {
                if let Some((_, name)) = AIDS.iter().find(|(id, _)| *id == app_id) {
                    owner.owner = (*name).to_string();
                }
                owner.origin = "platform".into();
            }
        } else if let Some(account) = self.accounts.get(&uid) {
            owner.owner = account.name.clone();
            owner.origin = if uid >= self.uid_min && account.login {
                "user"
            } else {
                "system"
            }
            .into();
        }
        owner.firmware = matches!(
            owner.origin.as_str(),
            "preinstalled" | "platform" | "system"
        );
        owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linux(passwd: &str) -> OwnerResolver {
        OwnerResolver {
            android: false,
            accounts: parse_passwd(passwd),
            packages: HashMap::new(),
            uid_min: 1000,
        }
    }

    #[test]
    fn linux_accounts_are_users_or_system() {
        let r = linux(
            "root:x:0:0:root:/root:/bin/bash\n\
             daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
             alice:x:1000:1000::/home/alice:/bin/bash\n",
        );
        let root = r.resolve(0);
        assert_eq!(
            (root.owner.as_str(), root.origin.as_str(), root.firmware),
            ("root", "system", true)
        );
        let alice = r.resolve(1000);
        assert_eq!(
            (alice.owner.as_str(), alice.origin.as_str(), alice.firmware),
            ("alice", "user", false)
        );
        assert_eq!(r.resolve(1).origin, "system");
        let stranger = r.resolve(1_010_123);
        assert_eq!(
            (stranger.user, stranger.app_id, stranger.origin.as_str()),
            (10, 10123, "unknown")
        );
        assert!(!stranger.firmware);
        assert_eq!(r.resolve(KERNEL_UID).owner, "kernel");
    }

    #[test]
    fn android_uids_split_and_name() {
        let r = OwnerResolver {
            android: true,
            accounts: HashMap::new(),
            packages: parse_packages_list("com.example.app 10123 0 /data/user/0/com.example.app default:targetSdkVersion=34 3003 0 1 1 @null\n"),
            uid_min: 1000,
        };
        let app = r.resolve(10123);
        assert_eq!(
            (app.owner.as_str(), app.origin.as_str(), app.firmware),
            ("com.example.app", "app", false)
        );
        let radio = r.resolve(1001);
        assert_eq!(
            (radio.owner.as_str(), radio.origin.as_str(), radio.firmware),
            ("radio", "platform", true)
        );
        let secondary = r.resolve(1_010_123);
        assert_eq!((secondary.user, secondary.app_id), (10, 10123));
    }
}
