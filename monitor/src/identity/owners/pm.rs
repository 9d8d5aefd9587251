//! `pm list packages -U -f` on a running device: the package manager's live
//! answer, used when egressmon runs on the phone itself (no --android-root),
//! for packages the files do not describe (packages.xml unreadable, or a
//! package installed after they were written).
//!
//! Each line reads `package:<apk path>=<name> uid:<uid>[,<uid>...]`; the APK
//! path may itself contain `=`, the package name never does.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PmPackage {
    pub(crate) name: String,
    pub(crate) apk: String,
    pub(crate) uids: Vec<u32>,
}

pub(crate) fn parse_line(line: &str) -> Option<PmPackage> {
    let rest = line.trim().strip_prefix("package:")?;
    let (path_and_name, uids) = match rest.rsplit_once(" uid:") {
        Some((p, u)) => (p, u),
        None => (rest, ""),
    };
    let (apk, name) = path_and_name.rsplit_once('=')?;
    if !super::packages_list::valid_package_name(name) {
        return None;
    }
    let uids = uids
        .split(',')
        .filter_map(|u| u.trim().parse().ok())
        .collect();
    Some(PmPackage {
        name: name.to_string(),
        apk: apk.to_string(),
        uids,
    })
}

pub(crate) fn parse(text: &str) -> Vec<PmPackage> {
    text.lines().filter_map(parse_line).collect()
}

/// Runs `pm` and parses its output. `pm` talks to system_server, which can
/// hang; give it a bounded time and carry on without it.
pub(crate) fn query(pm: &Path, timeout: Duration) -> Result<Vec<PmPackage>, String> {
    let mut child = Command::new(pm)
        .args(["list", "packages", "-U", "-f"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running {}: {e}", pm.display()))?;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
        out
    });
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => return Err(format!("{} exited with {status}", pm.display())),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                // Our own child, killed by its handle.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} did not answer within {}s (is system_server running?)",
                    pm.display(),
                    timeout.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for {}: {e}", pm.display())),
        }
    }
    let text = reader.join().unwrap_or_default();
    Ok(parse(&text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_with_paths_names_and_uids() {
        let got = parse(
            "package:/data/app/~~Xy1A==/com.example-Qz9==/base.apk=com.example uid:10123\n\
             package:/system/priv-app/Settings/Settings.apk=com.android.settings uid:1000\n\
             package:/product/app/Chrome/Chrome.apk=com.android.chrome uid:10090,1010090\n\
             package:/data/app/a=b/base.apk=com.eq.in.path uid:10200\n\
             garbage line\n\
             package:/x.apk=not a package uid:1\n",
        );
        assert_eq!(
            got,
            [
                PmPackage {
                    name: "com.example".into(),
                    apk: "/data/app/~~Xy1A==/com.example-Qz9==/base.apk".into(),
                    uids: vec![10123]
                },
                PmPackage {
                    name: "com.android.settings".into(),
                    apk: "/system/priv-app/Settings/Settings.apk".into(),
                    uids: vec![1000]
                },
                PmPackage {
                    name: "com.android.chrome".into(),
                    apk: "/product/app/Chrome/Chrome.apk".into(),
                    uids: vec![10090, 1010090]
                },
                PmPackage {
                    name: "com.eq.in.path".into(),
                    apk: "/data/app/a=b/base.apk".into(),
                    uids: vec![10200]
                },
            ]
        );
    }

    #[test]
    fn a_missing_pm_is_an_error_not_a_panic() {
        let err = query(Path::new("/nonexistent/pm"), Duration::from_secs(1)).unwrap_err();
        assert!(err.contains("/nonexistent/pm"), "{err}");
    }
}
