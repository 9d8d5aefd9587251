//! UID -> owner: who a uid is (an app the user installed, a package that
//! came with the firmware, a platform daemon, a login or service account)
//! and whether its traffic counts as firmware.
//!
//! Android (on a device, or a device layout given with `--android-root DIR`):
//! uid = user * 100000 + app id. What an app id is follows from its number
//! ([`aids`]); which packages own it and whether they came with the system
//! image come from, in order of trust:
//!
//! 1. /data/system/packages.xml, text or Android Binary XML
//!    ([`packages_xml`], [`abx`]): code path, flags, shared-user names;
//! 2. `pm list packages -U -f` when running on the device itself ([`pm`]);
//! 3. /data/system/packages.list ([`packages_list`]): names and uids, and its
//!    installer field (`@system`, `@product`) as a last resort for
//!    preinstalled packages.
//!
//! A source that is missing or damaged is reported (log warning, and
//! [`OwnerResolver::warnings`]) and the others are used.
//!
//! Linux ([`linux`]): /etc/passwd names accounts, /etc/login.defs separates
//! people from services.
//!
//! Origins, as the product contract defines them: `app` (user-installed),
//! `preinstalled` (system image package, app id >= 10000), `platform` (app
//! id < 10000), `user` and `system` on Linux, and `unknown` when no source
//! names the uid. `firmware` = preinstalled, platform or system.

pub(crate) mod abx;
#[cfg(test)]
mod abx_writer;
pub(crate) mod aids;
pub(crate) mod linux;
pub(crate) mod packages_list;
pub(crate) mod packages_xml;
pub(crate) mod pm;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aids::AppIdClass;
use monitor_common::KERNEL_UID;

pub(crate) use crate::pipeline::vocab::Origin;

/// Who a uid is: the owner description every output shows of it (owners,
/// flows, log lines, metric labels).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub uid: u32,
    pub user: u32,
    pub app_id: u32,
    pub owner: String,
    pub packages: Vec<String>,
    pub origin: Origin,
    pub firmware: bool,
}

/// What the Android sources say about one app id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct AppIdInfo {
    packages: BTreeSet<String>,
    shared_user: Option<String>,
    preinstalled: bool,
}

/// Evidence about one package, merged across sources.
#[derive(Debug, Default)]
struct PackageEvidence {
    app_id: Option<u32>,
    /// packages.xml: code path / FLAG_SYSTEM / updated system package.
    xml: Option<bool>,
    /// pm: APK path.
    pm: Option<bool>,
    /// packages.list: installer field.
    list: Option<bool>,
    /// Where its code lives (packages.xml's codePath, pm's APK path).
    code_path: Option<String>,
}

impl PackageEvidence {
    fn preinstalled(&self) -> bool {
        self.xml.or(self.pm).or(self.list).unwrap_or(false)
    }
}

#[derive(Debug, Default)]
struct Android {
    apps: HashMap<u32, AppIdInfo>,
    /// Android users (0, work profiles, secondary users) the sources show.
    users: BTreeSet<u32>,
    /// Names partitions give their reserved AIDs (vendor/etc/passwd, ...).
    partition_names: HashMap<u32, String>,
    /// The partition each package's code lives on.
    code_partitions: HashMap<String, &'static str>,
}

/// The Android sources to read; tests point them at fixture files.
#[derive(Debug, Default)]
pub(crate) struct AndroidSources {
    /// The device's root: DIR for `--android-root DIR`, `/` on the device.
    pub(crate) root: PathBuf,
    /// Run this `pm` for the live package list (only on the device).
    pub(crate) pm: Option<PathBuf>,
}

pub(crate) struct OwnerResolver {
    android: Option<Android>,
    accounts: HashMap<u32, linux::Account>,
    limits: linux::Limits,
    warnings: Vec<String>,
}

const PM: &str = "/system/bin/pm";
const PM_TIMEOUT: Duration = Duration::from_secs(10);

impl OwnerResolver {
    /// Reads the owner sources: the device layout under `android_root`, or
    /// this machine's own (Android when it has /system/bin/pm or
    /// /data/system/packages.list, Linux otherwise).
    pub(crate) fn new(android_root: Option<&Path>) -> Result<OwnerResolver> {
        match android_root {
            Some(root) => {
                if !root.is_dir() {
                    bail!(
                        "--android-root {}: not a directory; give the directory that holds the device's data/system/packages.list",
                        root.display()
                    );
                }
                let system = root.join("data/system");
                if !system.join("packages.list").is_file()
                    && packages_xml::locate(&system).is_none()
                {
                    let hint = if root.join("packages.list").is_file() {
                        format!(
                            " (this looks like data/system itself: use --android-root {})",
                            root.parent()
                                .and_then(Path::parent)
                                .unwrap_or(Path::new("/"))
                                .display()
                        )
                    } else {
                        String::new()
                    };
                    bail!(
                        "--android-root {}: found neither {} nor packages.xml next to it{hint}",
                        root.display(),
                        system.join("packages.list").display()
                    );
                }
                Ok(Self::android(AndroidSources {
                    root: root.to_path_buf(),
                    pm: None,
                }))
            }
            None if Path::new(PM).exists() || Path::new("/data/system/packages.list").exists() => {
                Ok(Self::android(AndroidSources {
                    root: PathBuf::from("/"),
                    pm: Path::new(PM).exists().then(|| PathBuf::from(PM)),
                }))
            }
            None => Ok(Self::linux(Path::new("/"))),
        }
    }

    /// A Linux host's accounts under `root` (`/etc/passwd`, `/etc/login.defs`).
    pub(crate) fn linux(root: &Path) -> OwnerResolver {
        let (accounts, limits) = linux::load(root);
        OwnerResolver {
            android: None,
            accounts,
            limits,
            warnings: Vec::new(),
        }
    }

    /// An Android device's packages, read from `sources`.
    pub(crate) fn android(sources: AndroidSources) -> OwnerResolver {
        let mut warnings = Vec::new();
        let android = load_android(&sources, &mut warnings);
        for w in &warnings {
            log::warn!("{w}");
        }
        OwnerResolver {
            android: Some(android),
            accounts: HashMap::new(),
            limits: linux::Limits::default(),
            warnings,
        }
    }

    #[cfg(test)]
    pub(crate) fn is_android(&self) -> bool {
        self.android.is_some()
    }

    /// What was wrong with the sources (already logged): skipped lines and
    /// entries, unreadable or damaged files.
    pub(crate) fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Every uid the sources name (packages, shared users, accounts) and,
    /// on Android, every fixed AID, for each Android user found.
    pub(crate) fn known_owners(&self) -> Vec<Owner> {
        let mut uids: BTreeSet<u32> = self.accounts.keys().copied().collect();
        if let Some(a) = &self.android {
            for &user in &a.users {
                let base = user * aids::USER_OFFSET;
                for &(id, _) in aids::AIDS {
                    // Secondary users have no root (nor 1-3), and the
                    // overflow uid is one number, not one per user.
                    if user == 0 || (id >= 1000 && id != aids::OVERFLOW_UID) {
                        uids.insert(base + id);
                    }
                }
                if user == 0 {
                    uids.extend(a.partition_names.keys().copied());
                }
                uids.extend(a.apps.keys().map(|id| base + id));
            }
        }
        uids.into_iter().map(|uid| self.resolve(uid)).collect()
    }

    /// The partition behind a flow of `uid` (the contract's `partition`):
    /// the sender's executable's, unless it is an app process forked from
    /// the zygote (app_process), whose code is its package's: the package
    /// its command line names, else the uid's packages' if they all live
    /// on one partition.
    pub(crate) fn partition(
        &self,
        uid: u32,
        exe: Option<&str>,
        cmdline: Option<&str>,
    ) -> Option<&'static str> {
        let zygote_child = exe.is_some_and(|e| {
            e.rsplit('/')
                .next()
                .is_some_and(|name| name.starts_with("app_process"))
        });
        if let Some(exe) = exe.filter(|_| !zygote_child) {
            return packages_xml::partition_of(exe);
        }
        let android = self.android.as_ref()?;
        // An app process names its package, `package:service` for a service
        // in a process of its own.
        let named = cmdline
            .and_then(|c| c.split([' ', ':']).next())
            .and_then(|package| android.code_partitions.get(package));
        if let Some(partition) = named {
            return Some(partition);
        }
        let (_, app_id) = aids::split(uid);
        let info = android.apps.get(&app_id)?;
        let mut partitions = info
            .packages
            .iter()
            .filter_map(|p| android.code_partitions.get(p));
        let first = partitions.next()?;
        partitions.all(|p| p == first).then_some(*first)
    }

    pub(crate) fn resolve(&self, uid: u32) -> Owner {
        let (user, app_id) = aids::split(uid);
        let mut owner = Owner {
            uid,
            user,
            app_id,
            owner: format!("uid {uid}"),
            packages: Vec::new(),
            origin: Origin::Unknown,
            firmware: false,
        };
        if uid == KERNEL_UID {
            // Traffic with no socket behind it: the kernel's own (TCP
            // resets, ICMP errors, ...).
            owner.owner = "kernel".into();
            owner.origin = if self.android.is_some() {
                Origin::Platform
            } else {
                Origin::System
            };
        } else if let Some(android) = &self.android {
            android.describe(uid, &mut owner);
        } else if let Some(account) = self.accounts.get(&uid) {
            owner.owner = account.name.clone();
            owner.origin = if self.limits.is_person(uid, account) {
                Origin::User
            } else {
                Origin::System
            };
        }
        owner.firmware = owner.origin.is_firmware();
        owner
    }
}

impl Android {
    fn describe(&self, uid: u32, o: &mut Owner) {
        let (user, app_id) = aids::split(uid);
        let info = self.apps.get(&app_id);
        let packages = |info: Option<&AppIdInfo>| -> Vec<String> {
            info.map(|i| i.packages.iter().cloned().collect())
                .unwrap_or_default()
        };
        match aids::classify(app_id) {
            class @ (AppIdClass::Fixed(_)
            | AppIdClass::Reserved(_)
            | AppIdClass::UnnamedPlatform) => {
                // The platform's own name for the uid says more than a
                // shared-user name: native daemons run under it too.
                o.owner = match class {
                    AppIdClass::Fixed(name) => Some(name.to_string()),
                    _ => None,
                }
                .or_else(|| self.partition_names.get(&app_id).cloned())
                .or_else(|| info.and_then(|i| i.shared_user.clone()))
                .unwrap_or_else(|| match class {
                    AppIdClass::Reserved(r) => aids::reserved_name(r, app_id),
                    _ => aids::generic_name(uid),
                });
                o.packages = packages(info);
                o.origin = Origin::Platform;
            }
            AppIdClass::App => match info {
                Some(i) => {
                    o.owner = i
                        .shared_user
                        .clone()
                        .or_else(|| i.packages.first().cloned())
                        .unwrap_or_else(|| aids::generic_name(uid));
                    o.packages = packages(info);
                    o.origin = if i.preinstalled {
                        Origin::Preinstalled
                    } else {
                        Origin::App
                    };
                }
                None => o.owner = aids::generic_name(uid),
            },
            AppIdClass::SdkSandbox { app_id: host } => {
                let host_uid = user * aids::USER_OFFSET + host;
                match self.apps.get(&host) {
                    Some(i) if !i.packages.is_empty() => {
                        let main = i.packages.first().cloned().unwrap_or_default();
                        o.owner = format!("{main} (sdk sandbox)");
                        o.packages = packages(Some(i));
                        o.origin = if i.preinstalled {
                            Origin::Preinstalled
                        } else {
                            Origin::App
                        };
                    }
                    _ => o.owner = format!("{} (sdk sandbox)", aids::generic_name(host_uid)),
                }
            }
            AppIdClass::Isolated { .. } | AppIdClass::IsolatedLegacy { .. } => {
                // Isolated uids are handed out at run time to whichever app
                // starts an isolated service; no file records which.
                o.owner = format!("{} (isolated)", aids::generic_name(uid));
            }
            AppIdClass::Overflow => o.owner = "overflowuid".into(),
            AppIdClass::ExtGid { .. }
            | AppIdClass::ExtCacheGid { .. }
            | AppIdClass::SharedGid { .. }
            | AppIdClass::Unassigned => o.owner = aids::generic_name(uid),
        }
    }
}

/// Records the app id a source gives a package; the first source wins and
/// a disagreement is reported.
fn note_app_id(
    ev: &mut PackageEvidence,
    name: &str,
    app_id: u32,
    source: &Path,
    warnings: &mut Vec<String>,
) {
    match ev.app_id {
        None => ev.app_id = Some(app_id),
        Some(known) if known != app_id => warnings.push(format!(
            "{}: {name} has app id {app_id} here but {known} in an earlier source; keeping {known}",
            source.display()
        )),
        Some(_) => {}
    }
}

/// Numeric entries of `dir` (Android user ids under data/system/users or
/// data/user).
fn numeric_entries(dir: &Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn load_android(sources: &AndroidSources, warnings: &mut Vec<String>) -> Android {
    let root = &sources.root;
    let system = root.join("data/system");
    let mut evidence: BTreeMap<String, PackageEvidence> = BTreeMap::new();
    let mut shared_users: Vec<packages_xml::SharedUser> = Vec::new();
    let mut users: BTreeSet<u32> = BTreeSet::from([0]);
    // packages.list: names and uids of every package (user 0's uid).
    let list_file = system.join("packages.list");
    match std::fs::read_to_string(&list_file) {
        Ok(text) => {
            let (entries, skipped) = packages_list::parse(&text, &list_file);
            warnings.extend(skipped);
            for e in entries {
                let (user, app_id) = aids::split(e.uid);
                users.insert(user);
                let ev = evidence.entry(e.name.clone()).or_default();
                note_app_id(ev, &e.name, app_id, &list_file, warnings);
                ev.list = e.installed_with_image();
            }
        }
        Err(e) => warnings.push(format!(
            "{}: {e}; packages will be named from the other sources only",
            list_file.display()
        )),
    }

    // packages.xml: code paths, flags and shared-user names.
    match packages_xml::locate(&system) {
        Some(file) => match packages_xml::load(&file) {
            Ok((xml, skipped)) => {
                warnings.extend(skipped);
                for p in &xml.packages {
                    let ev = evidence.entry(p.name.clone()).or_default();
                    note_app_id(ev, &p.name, p.app_id, &file, warnings);
                    ev.xml = Some(p.preinstalled());
                    ev.code_path = p.code_path.clone().or(ev.code_path.take());
                }
                for name in &xml.updated {
                    if let Some(ev) = evidence.get_mut(name) {
                        ev.xml = Some(true);
                    }
                }
                shared_users = xml.shared_users;
            }
            Err(e) => warnings.push(format!(
                "{e}; preinstalled packages are told from packages.list's installer field only"
            )),
        },
        None => log::info!(
            "{}: no packages.xml; preinstalled packages are told from the other sources",
            system.display()
        ),
    }

    // pm: the live list on the device.
    if let Some(pm) = &sources.pm {
        match pm::query(pm, PM_TIMEOUT) {
            Ok(list) => {
                for p in list {
                    let Some(&first) = p.uids.first() else {
                        continue;
                    };
                    users.extend(p.uids.iter().map(|u| u / aids::USER_OFFSET));
                    let ev = evidence.entry(p.name.clone()).or_default();
                    note_app_id(ev, &p.name, first % aids::USER_OFFSET, pm, warnings);
                    ev.pm = Some(packages_xml::in_system_image(&p.apk));
                    ev.code_path = Some(p.apk.clone());
                }
            }
            Err(e) => warnings.push(format!("{e}; continuing with the files only")),
        }
    }

    users.extend(numeric_entries(&system.join("users")));
    users.extend(numeric_entries(&root.join("data/user")));
    // Android user ids are small; a stray directory name must not push
    // user * 100000 + app id past u32.
    users.retain(|&u| u < u32::MAX / aids::USER_OFFSET);

    let mut apps: HashMap<u32, AppIdInfo> = HashMap::new();
    for (name, ev) in &evidence {
        if let Some(app_id) = ev.app_id {
            let info = apps.entry(app_id).or_default();
            info.packages.insert(name.clone());
            info.preinstalled |= ev.preinstalled();
        }
    }
    for s in shared_users {
        apps.entry(s.app_id).or_default().shared_user = Some(s.name);
    }

    // Names partitions give their reserved AIDs (vendor daemons and such).
    let mut partition_names = HashMap::new();
    for part in ["system", "system_ext", "product", "vendor", "odm"] {
        if let Ok(text) = std::fs::read_to_string(root.join(part).join("etc/passwd")) {
            for (uid, account) in linux::parse_passwd(&text) {
                if uid < aids::APP_START && aids::aid_name(uid).is_none() {
                    partition_names.entry(uid).or_insert(account.name);
                }
            }
        }
    }

    log::info!(
        "owners: {} packages in {} app ids, {} shared users, users {:?} from {}",
        evidence.len(),
        apps.len(),
        apps.values().filter(|a| a.shared_user.is_some()).count(),
        users,
        root.display()
    );
    let code_partitions = evidence
        .iter()
        .filter_map(|(name, ev)| {
            let partition = packages_xml::partition_of(ev.code_path.as_deref()?)?;
            Some((name.clone(), partition))
        })
        .collect();
    Android {
        apps,
        users,
        partition_names,
        code_partitions,
    }
}

#[cfg(test)]
mod tests;
