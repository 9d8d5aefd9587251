//! Linux hosts: account names from /etc/passwd, and which accounts are people
//! (`user`) and which are the system's own (`system`), from /etc/login.defs.

use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Account {
    pub(crate) name: String,
    /// False for `nologin`, `false` or an empty shell: a service account.
    pub(crate) login: bool,
}

/// The login.defs limits that separate people from services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// First uid `useradd` gives a person (default 1000).
    pub(crate) uid_min: u32,
    /// Last uid `useradd --system` gives a service, when the file says.
    pub(crate) sys_uid_max: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            uid_min: 1000,
            sys_uid_max: None,
        }
    }
}

impl Limits {
    /// A login account at or above UID_MIN (and above SYS_UID_MAX) is a
    /// person; root, service accounts and anything without a login shell
    /// belong to the system.
    pub(crate) fn is_person(&self, uid: u32, account: &Account) -> bool {
        uid != 0
            && uid >= self.uid_min
            && self.sys_uid_max.is_none_or(|max| uid > max)
            && account.login
    }
}

pub(crate) fn parse_passwd(text: &str) -> HashMap<u32, Account> {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 {
            continue;
        }
        let Ok(uid) = fields[2].parse::<u32>() else {
            continue;
        };
        let shell = fields[6];
        let login = !(shell.ends_with("nologin") || shell.ends_with("/false") || shell.is_empty());
        // The first entry wins, as it does for getpwuid().
        out.entry(uid).or_insert(Account {
            name: fields[0].to_string(),
            login,
        });
    }
    out
}

pub(crate) fn parse_login_defs(text: &str) -> Limits {
    let mut limits = Limits::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match (it.next(), it.next().and_then(|v| v.parse::<u32>().ok())) {
            (Some("UID_MIN"), Some(v)) => limits.uid_min = v,
            (Some("SYS_UID_MAX"), Some(v)) => limits.sys_uid_max = Some(v),
            _ => {}
        }
    }
    limits
}

/// Reads `etc/passwd` and `etc/login.defs` under `root` (`/` on a host).
pub(crate) fn load(root: &Path) -> (HashMap<u32, Account>, Limits) {
    let passwd = root.join("etc/passwd");
    let accounts = match std::fs::read_to_string(&passwd) {
        Ok(text) => parse_passwd(&text),
        Err(e) => {
            log::warn!(
                "{}: {e}; local accounts will show as unknown uids",
                passwd.display()
            );
            HashMap::new()
        }
    };
    let limits = std::fs::read_to_string(root.join("etc/login.defs"))
        .map(|t| parse_login_defs(&t))
        .unwrap_or_default();
    (accounts, limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_and_login_defs() {
        let accounts = parse_passwd(
            "root:x:0:0:root:/root:/bin/bash\n\
             # comment\n\
             daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
             broken line\n\
             alice:x:1000:1000::/home/alice:/bin/bash\n\
             shadow-alice:x:1000:1000::/home/alice:/bin/sh\n\
             svc:x:1500:1500::/:/bin/false\n",
        );
        assert_eq!(accounts.len(), 4);
        assert_eq!(accounts[&1000].name, "alice");
        assert!(!accounts[&1500].login);
        let limits = parse_login_defs("# x\nUID_MIN\t\t 2000\nSYS_UID_MAX  999\nUID_MAX 60000\n");
        assert_eq!(
            limits,
            Limits {
                uid_min: 2000,
                sys_uid_max: Some(999)
            }
        );
        assert!(!limits.is_person(1000, &accounts[&1000]));
        assert!(Limits::default().is_person(1000, &accounts[&1000]));
        assert!(!Limits::default().is_person(1500, &accounts[&1500]));
        assert!(!Limits::default().is_person(0, &accounts[&0]));
    }
}
