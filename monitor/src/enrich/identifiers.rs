//! The device's own identifiers (name -> value), for the search of
//! cleartext payloads: what this machine or phone is known by, found on
//! it, plus what the operator adds with `--identifiers FILE`.
//!
//! Owns: discovering the identifiers, reading and checking the
//! `--identifiers` file, and describing the set (names and sources only).
//!
//! Values are secrets in effect. They leave this module only through
//! [`Identifiers::pairs`], for the matcher; `Debug`, [`Identifiers::describe`],
//! every error and every reason name identifiers and where they were read,
//! never what they are.
//!
//! Linux (paths under [`IdentifierSources::linux_root`], `/` normally):
//!
//! - `machine_id`: etc/machine-id, else var/lib/dbus/machine-id (32 hex
//!   digits);
//! - `mac`: sys/class/net/IFACE/address of every interface but `lo` whose
//!   `type` is 1 (ARPHRD_ETHER: Ethernet and Wi-Fi, not tunnels), skipping
//!   all-zero addresses and those the kernel made up at random
//!   (`addr_assign_type` 1: veth pairs, bridges, dummies), which name no
//!   device. One `mac` per interface; the name repeats.
//! - `dmi_serial`, `dmi_uuid`: sys/class/dmi/id/product_serial and
//!   product_uuid (root-only files), unless they hold a vendor placeholder
//!   ("To be filled by O.E.M.", "Default string", an all-zero UUID, ...).
//!
//! Android (the device layout under `--android-root DIR`, or this machine
//! when it has /system/build.prop under `linux_root`):
//!
//! - `serial`: property ro.serialno, else ro.boot.serialno;
//! - `android_id`: every per-app value (SSAID, Android 8+) of
//!   data/system/users/N/settings_ssaid.xml and the device-wide legacy
//!   `android_id` of settings_secure.xml, for every user N. Both files are
//!   Android Binary XML on Android 12+ and text XML before, read like
//!   packages.xml. The SSAID table's `userkey` entry is the HMAC key the
//!   SSAIDs are derived from, not an ID any app sees, and is left out.
//! - `wifi_mac`: sys/class/net/wlan0/address (since Android 10 this is the
//!   per-network random MAC while connected), the property
//!   ro.boot.wifimacaddr (set by some bootloaders), and the factory MAC in
//!   the vendor files of [`WIFI_FACTORY_FILES`] (paths vary by vendor; those
//!   are the common Qualcomm and Samsung ones, not a complete list);
//! - `bt_mac`: the `bluetooth_address` secure setting, `Address` under
//!   `[Adapter]` of data/misc/bluedroid/bt_config.conf, the properties
//!   ro.boot.btmacaddr and persist.service.bdroid.bdaddr, and the file
//!   named by ro.bt.bdaddr_path (where the Bluetooth stack looks too);
//! - `imei`, `imsi`, `iccid`, `phone_number`: on the device itself only,
//!   from the telephony service (`service call iphonesubinfo CODE s16
//!   com.android.shell`, see [`subinfo_codes`]); a device layout has no
//!   telephony service, so they come from the file there.
//!
//! Properties: on the device, one `getprop` (all properties); in a device
//! layout, DIR/props.txt stands in for getprop: `name=value` lines, or the
//! `[name]: [value]` lines `adb shell getprop > props.txt` writes.
//!
//! External commands run only on the device itself (no `--android-root`,
//! `linux_root` is `/` and /system/bin/getprop exists), each directly (no
//! shell) and with a [`COMMAND_TIMEOUT`].
//!
//! What cannot be read is no error: the identifier is absent and
//! [`Identifiers::unavailable`] says why. Only a bad `--identifiers` file is
//! an error:
//!
//! ```toml
//! [identifiers]
//! imei = "356938035643809"
//! serial = "R58M12ABCDE"
//! wifi_mac = ["a4:5e:60:c1:22:33", "ae:12:9f:00:41:07"]   # several values
//! ```
//!
//! Names are `[a-z0-9_]+` starting with a letter (at most 64 characters:
//! they become metric labels); a value is a non-empty string (surrounding
//! whitespace trimmed) or a list of them. A name in the file replaces every
//! value discovered under that name; other names are added.

use crate::identity::owners::packages_xml;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use toml::de::DeValue;

/// How long one external command (getprop, service) may take.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
const GETPROP: &str = "/system/bin/getprop";
const SERVICE: &str = "/system/bin/service";
/// The calling package the telephony calls name (`adb shell` does the same).
const CALLING_PACKAGE: &str = "com.android.shell";
/// The source of every identifier the `--identifiers` file gives.
pub(crate) const FILE_SOURCE: &str = "file";
/// An identifiers file is a few lines; anything near this is a wrong path.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// What to do about any error in an identifiers file.
const FIX: &str = "fix the file, or start without --identifiers";

/// Vendor files that hold the factory Wi-Fi MAC (relative to the root):
/// Qualcomm's wlan_mac.bin (`Intf0MacAddress=001122AABBCC` lines), where
/// /persist is mounted on older and newer devices, and Samsung's .mac.info.
pub(crate) const WIFI_FACTORY_FILES: &[&str] = &[
    "mnt/vendor/persist/wlan_mac.bin",
    "persist/wlan_mac.bin",
    "efs/wifi/.mac.info",
];

const TELEPHONY: [&str; 4] = ["imei", "imsi", "iccid", "phone_number"];

/// Where identifiers come from (the agent's options).
#[derive(Debug, Clone)]
pub(crate) struct IdentifierSources {
    /// `--android-root DIR`: a device layout to read instead of this machine.
    pub(crate) android_root: Option<PathBuf>,
    /// `--identifiers FILE`.
    pub(crate) file: Option<PathBuf>,
    /// This machine's root: `/` normally; tests pass a temporary directory.
    pub(crate) linux_root: PathBuf,
}

impl Default for IdentifierSources {
    fn default() -> Self {
        IdentifierSources {
            android_root: None,
            file: None,
            linux_root: PathBuf::from("/"),
        }
    }
}

/// One identifier value and where it was read.
#[derive(Clone)]
struct Entry {
    name: String,
    value: String,
    source: String,
}

/// The device's identifiers: (name, value, source), sorted by name and
/// value, no (name, value) twice; a name may have several values.
#[derive(Clone, Default)]
pub(crate) struct Identifiers {
    entries: Vec<Entry>,
    /// Names looked for but not found, with why.
    unavailable: Vec<(String, String)>,
}

impl fmt::Debug for Identifiers {
    /// Names, sources and reasons; never a value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.describe()).finish()
    }
}

impl Identifiers {
    /// Discovers the device's own identifiers, then applies the file (adds
    /// or overrides). Errors only for a bad --identifiers file (unreadable,
    /// not TOML, not a table [identifiers] of name = "string", a name not
    /// matching [a-z0-9_]+, an empty value), with a message saying what to
    /// fix; discovery problems are never errors (an identifier that can't
    /// be read is simply absent, recorded in `unavailable` with a short
    /// reason).
    pub(crate) fn load(sources: &IdentifierSources) -> Result<Identifiers, String> {
        // The file first: a bad one fails before any command runs.
        let from_file = match &sources.file {
            Some(path) => Some(read_file(path)?),
            None => None,
        };
        let mut found = Found::default();
        match platform(sources) {
            Platform::Linux(root) => discover_linux(&root, &mut found),
            Platform::Android { root, device } => discover_android(&root, device, &mut found),
        }
        let mut ids = found.finish();
        if let Some(pairs) = from_file {
            ids.apply_file(pairs);
        }
        Ok(ids)
    }

    /// (name, value), for the matcher.
    pub(crate) fn pairs(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|e| (e.name.clone(), e.value.clone()))
            .collect()
    }

    /// The names that have a value, sorted, each once.
    #[cfg(test)]
    pub(crate) fn names(&self) -> Vec<String> {
        let names: BTreeSet<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        names.into_iter().map(String::from).collect()
    }

    /// For `status`: each name with its source ("file", "/etc/machine-id",
    /// "getprop ro.serialno", ...) and the names not found with why. Never
    /// values.
    pub(crate) fn describe(&self) -> Vec<String> {
        let mut groups: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for e in &self.entries {
            *groups
                .entry((e.name.as_str(), e.source.as_str()))
                .or_default() += 1;
        }
        let mut out: Vec<String> = groups
            .into_iter()
            .map(|((name, source), n)| match n {
                1 => format!("{name}: {source}"),
                n => format!("{name}: {n} values from {source}"),
            })
            .collect();
        out.extend(
            self.unavailable
                .iter()
                .map(|(name, why)| format!("{name}: not found ({why})")),
        );
        out
    }

    /// Names looked for and not found, with a short reason each.
    #[cfg(test)]
    pub(crate) fn unavailable(&self) -> &[(String, String)] {
        &self.unavailable
    }

    /// How many (name, value) pairs.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The file's names replace every discovered value of theirs.
    fn apply_file(&mut self, pairs: Vec<(String, String)>) {
        let names: BTreeSet<String> = pairs.iter().map(|(n, _)| n.clone()).collect();
        self.entries.retain(|e| !names.contains(&e.name));
        self.unavailable.retain(|(n, _)| !names.contains(n));
        self.entries
            .extend(pairs.into_iter().map(|(name, value)| Entry {
                name,
                value,
                source: FILE_SOURCE.to_string(),
            }));
        self.normalize();
    }

    /// Sorts by (name, value) and drops repeated pairs, keeping the source
    /// that came first; a name with a value is not unavailable.
    fn normalize(&mut self) {
        self.entries
            .sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
        self.entries
            .dedup_by(|later, kept| later.name == kept.name && later.value == kept.value);
        let entries = &self.entries;
        self.unavailable
            .retain(|(n, _)| !entries.iter().any(|e| &e.name == n));
        self.unavailable.sort_by(|a, b| a.0.cmp(&b.0));
        self.unavailable.dedup_by(|later, kept| later.0 == kept.0);
    }
}

/// What discovery found so far.
#[derive(Default)]
struct Found {
    entries: Vec<Entry>,
    missing: Vec<(String, String)>,
}

impl Found {
    fn add(&mut self, name: &str, value: &str, source: String) {
        let value = value.trim();
        if !value.is_empty() {
            self.entries.push(Entry {
                name: name.to_string(),
                value: value.to_string(),
                source,
            });
        }
    }

    fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    fn has_value(&self, value: &str) -> bool {
        self.entries.iter().any(|e| e.value == value)
    }

    /// Records why `name` was not found, unless it was (the first reason
    /// given for a name is kept).
    fn missing(&mut self, name: &str, why: impl Into<String>) {
        if !self.has(name) {
            self.missing.push((name.to_string(), why.into()));
        }
    }

    fn finish(self) -> Identifiers {
        let mut ids = Identifiers {
            entries: self.entries,
            unavailable: self.missing,
        };
        ids.normalize();
        ids
    }
}

enum Platform {
    Linux(PathBuf),
    /// `device`: this machine is the phone, so commands may run.
    Android {
        root: PathBuf,
        device: bool,
    },
}

/// Android for a device layout or an Android root (one with
/// /system/build.prop, as `egressmon` tells a phone), Linux otherwise.
fn platform(sources: &IdentifierSources) -> Platform {
    if let Some(root) = &sources.android_root {
        return Platform::Android {
            root: root.clone(),
            device: false,
        };
    }
    let root = &sources.linux_root;
    if root.join("system/build.prop").exists() {
        let device = root == Path::new("/") && Path::new(GETPROP).exists();
        return Platform::Android {
            root: root.clone(),
            device,
        };
    }
    Platform::Linux(root.clone())
}

/// `rel` under `root`, as a path to show: `/rel` on the machine itself.
fn shown(root: &Path, rel: &str) -> String {
    if root == Path::new("/") {
        format!("/{rel}")
    } else {
        root.join(rel).display().to_string()
    }
}

/// A short reason for an I/O error (never the file's content).
fn io_why(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::NotFound => "missing".into(),
        io::ErrorKind::PermissionDenied => "not readable (permission denied; run as root)".into(),
        _ => e.to_string(),
    }
}

fn read_trimmed(path: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

// ---------------------------------------------------------------- Linux

fn discover_linux(root: &Path, found: &mut Found) {
    // machine_id
    let mut why = Vec::new();
    for rel in ["etc/machine-id", "var/lib/dbus/machine-id"] {
        match read_trimmed(&root.join(rel)) {
            Ok(v) if is_machine_id(&v) => {
                found.add("machine_id", &v, shown(root, rel));
                break;
            }
            Ok(_) => why.push(format!("{}: not 32 hex digits", shown(root, rel))),
            Err(e) => why.push(format!("{}: {}", shown(root, rel), io_why(&e))),
        }
    }
    found.missing("machine_id", why.join("; "));

    // mac
    let net_rel = "sys/class/net";
    match std::fs::read_dir(root.join(net_rel)) {
        Ok(dir) => {
            let mut ifaces: Vec<String> = dir
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name != "lo")
                .collect();
            ifaces.sort();
            for iface in ifaces {
                let at = |file: &str| root.join(net_rel).join(&iface).join(file);
                if read_trimmed(&at("type")).ok().as_deref() != Some("1") {
                    continue;
                }
                if read_trimmed(&at("addr_assign_type")).ok().as_deref() == Some("1") {
                    continue;
                }
                let Ok(address) = read_trimmed(&at("address")) else {
                    continue;
                };
                if let Some(mac) = normalize_mac(&address).filter(|m| !is_placeholder_mac(m)) {
                    found.add(
                        "mac",
                        &mac,
                        shown(root, &format!("{net_rel}/{iface}/address")),
                    );
                }
            }
            found.missing(
                "mac",
                format!(
                    "no Ethernet or Wi-Fi interface with a hardware address in {}",
                    shown(root, net_rel)
                ),
            );
        }
        Err(e) => found.missing("mac", format!("{}: {}", shown(root, net_rel), io_why(&e))),
    }

    // dmi_serial, dmi_uuid
    for (name, rel) in [
        ("dmi_serial", "sys/class/dmi/id/product_serial"),
        ("dmi_uuid", "sys/class/dmi/id/product_uuid"),
    ] {
        match read_trimmed(&root.join(rel)) {
            Ok(v) if is_placeholder(&v) => found.missing(
                name,
                format!("{}: a vendor placeholder, not a serial", shown(root, rel)),
            ),
            Ok(v) => found.add(name, &v, shown(root, rel)),
            Err(e) => found.missing(name, format!("{}: {}", shown(root, rel), io_why(&e))),
        }
    }
}

/// A systemd/D-Bus machine id: 32 hex digits, not all zero.
fn is_machine_id(v: &str) -> bool {
    v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()) && v.bytes().any(|b| b != b'0')
}

/// Vendor fill-ins for serials and UUIDs (compared ignoring ASCII case).
const PLACEHOLDERS: &[&str] = &[
    "none",
    "null",
    "unknown",
    "n/a",
    "na",
    "oem",
    "o.e.m.",
    "default",
    "default string",
    "to be filled by o.e.m.",
    "to be filled by o.e.m",
    "system serial number",
    "chassis serial number",
    "serial number",
    "not specified",
    "not applicable",
    "not available",
    "not settable",
    "123456789",
    "0123456789",
    "0123456789abcdef",
    // The AMI BIOS default product UUID.
    "03000200-0400-0500-0006-000700080009",
];

/// Whether a serial, UUID or similar is a placeholder: empty, a known
/// fill-in, or one character repeated (0, 0000..., FFFF..., all-zero and
/// all-F UUIDs), separators aside.
fn is_placeholder(v: &str) -> bool {
    let v = v.trim();
    if PLACEHOLDERS.iter().any(|p| p.eq_ignore_ascii_case(v)) {
        return true;
    }
    let mut chars = v.chars().filter(|c| !matches!(c, '-' | ':' | ' ' | '.'));
    match chars.next() {
        None => true,
        Some(first) => chars.all(|c| c.eq_ignore_ascii_case(&first)),
    }
}

/// A MAC address as six lowercase pairs joined by `:`, from `aa:bb:..`,
/// `AA-BB-..` or 12 hex digits.
fn normalize_mac(s: &str) -> Option<String> {
    let s = s.trim();
    let digits: String = match s.len() {
        17 => {
            let sep = s.as_bytes()[2];
            if !matches!(sep, b':' | b'-') {
                return None;
            }
            let parts: Vec<&str> = s.split(sep as char).collect();
            if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
                return None;
            }
            parts.concat()
        }
        12 => s.to_string(),
        _ => return None,
    };
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let lower = digits.to_ascii_lowercase();
    let pairs: Vec<&str> = (0..6).map(|i| &lower[2 * i..2 * i + 2]).collect();
    Some(pairs.join(":"))
}

/// All zero, broadcast, or 02:00:00:00:00:00 (what Android hands apps in
/// place of the real address).
fn is_placeholder_mac(mac: &str) -> bool {
    matches!(
        mac,
        "00:00:00:00:00:00" | "ff:ff:ff:ff:ff:ff" | "02:00:00:00:00:00"
    )
}

/// The first MAC address of a small text file: a line holding just the
/// address, or `key=address` (wlan_mac.bin).
fn first_mac(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| normalize_mac(line.rsplit('=').next().unwrap_or(line)))
        .find(|m| !is_placeholder_mac(m))
}

// -------------------------------------------------------------- Android

/// System properties: from one `getprop` on the device, or props.txt.
struct Props {
    values: BTreeMap<String, String>,
    /// What a value is said to come from: "getprop" or the props.txt path.
    via: String,
    /// Why there are none, when they could not be read.
    unreadable: Option<String>,
}

impl Props {
    fn from_getprop() -> Props {
        let (values, unreadable) = match run(Path::new(GETPROP), &[], COMMAND_TIMEOUT) {
            Ok(out) => (parse_props(&out), None),
            Err(e) => (BTreeMap::new(), Some(e)),
        };
        Props {
            values,
            via: "getprop".into(),
            unreadable,
        }
    }

    fn from_file(path: &Path) -> Props {
        let (values, unreadable) = match std::fs::read_to_string(path) {
            Ok(text) => (parse_props(&text), None),
            Err(e) => (
                BTreeMap::new(),
                Some(format!("{}: {}", path.display(), io_why(&e))),
            ),
        };
        Props {
            values,
            via: path.display().to_string(),
            unreadable,
        }
    }

    /// A non-empty value and the source to show for it.
    fn get(&self, name: &str) -> Option<(&str, String)> {
        let v = self.values.get(name)?.trim();
        (!v.is_empty()).then(|| (v, format!("{} {name}", self.via)))
    }

    /// Why `names` were not found among the properties.
    fn absent(&self, names: &[&str]) -> String {
        match &self.unreadable {
            Some(why) => why.clone(),
            None => format!("no {} in {}", names.join(" or "), self.via),
        }
    }
}

/// `[name]: [value]` lines (getprop's own listing) or `name=value` lines;
/// blank lines and `#` comments are skipped.
fn parse_props(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let pair = if let Some(rest) = line.strip_prefix('[') {
            rest.split_once("]: [")
                .and_then(|(name, value)| Some((name, value.strip_suffix(']')?)))
        } else {
            line.split_once('=')
        };
        if let Some((name, value)) = pair {
            out.insert(name.trim().to_string(), value.trim().to_string());
        }
    }
    out
}

fn discover_android(root: &Path, device: bool, found: &mut Found) {
    let props = if device {
        Props::from_getprop()
    } else {
        Props::from_file(&root.join("props.txt"))
    };

    // serial
    let serial_props = ["ro.serialno", "ro.boot.serialno"];
    let mut placeholder = false;
    for prop in serial_props {
        match props.get(prop) {
            Some((v, _)) if is_placeholder(v) => placeholder = true,
            Some((v, source)) => {
                found.add("serial", v, source);
                break;
            }
            None => {}
        }
    }
    if placeholder {
        found.missing("serial", "the serial property holds a placeholder");
    }
    found.missing("serial", props.absent(&serial_props));

    settings(root, found);
    wifi_mac(root, &props, found);
    bt_mac(root, &props, found);

    if device {
        telephony(&props, found);
    } else {
        for name in TELEPHONY {
            found.missing(
                name,
                "read from the phone's telephony service (service call iphonesubinfo), which a device layout does not have: give it with --identifiers",
            );
        }
    }
}

/// Android user ids with a directory under data/system/users.
fn users(root: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(root.join("data/system/users"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// (name, value) of every `<setting>` of a SettingsProvider file, text or
/// Android Binary XML.
fn read_settings(file: &Path) -> Result<Vec<(String, String)>, String> {
    let data = std::fs::read(file).map_err(|e| io_why(&e))?;
    let elements =
        packages_xml::elements(&data, file).map_err(|e| format!("damaged at {}", e.position))?;
    Ok(elements
        .iter()
        .filter(|e| e.name == "setting")
        .filter_map(|e| {
            let name = e.attr("name")?.to_text()?;
            let value = e.attr("value")?.to_text()?;
            Some((name, value))
        })
        .collect())
}

/// `android_id` from every user's SSAID table and legacy secure setting;
/// `bt_mac` from the `bluetooth_address` secure setting.
fn settings(root: &Path, found: &mut Found) {
    let users = users(root);
    let mut why = Vec::new();
    if users.is_empty() {
        why.push(format!(
            "{}: no user directory",
            shown(root, "data/system/users")
        ));
    }
    for user in users {
        let rel = format!("data/system/users/{user}/settings_ssaid.xml");
        match read_settings(&root.join(&rel)) {
            Ok(list) => {
                for (name, value) in list {
                    // `userkey` is the HMAC key the SSAIDs are made with.
                    if name != "userkey" && !is_placeholder(&value) {
                        found.add("android_id", &value, shown(root, &rel));
                    }
                }
            }
            Err(e) => why.push(format!("{}: {e}", shown(root, &rel))),
        }
        let rel = format!("data/system/users/{user}/settings_secure.xml");
        match read_settings(&root.join(&rel)) {
            Ok(list) => {
                for (name, value) in list {
                    match name.as_str() {
                        "android_id" if !is_placeholder(&value) => {
                            found.add(
                                "android_id",
                                &value,
                                format!("{} android_id", shown(root, &rel)),
                            );
                        }
                        "bluetooth_address" => {
                            if let Some(mac) =
                                normalize_mac(&value).filter(|m| !is_placeholder_mac(m))
                            {
                                found.add(
                                    "bt_mac",
                                    &mac,
                                    format!("{} bluetooth_address", shown(root, &rel)),
                                );
                            }
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => why.push(format!("{}: {e}", shown(root, &rel))),
        }
    }
    if why.is_empty() {
        why.push("no SSAID or android_id setting".into());
    }
    found.missing("android_id", why.join("; "));
}

fn wifi_mac(root: &Path, props: &Props, found: &mut Found) {
    let rel = "sys/class/net/wlan0/address";
    let mut why = match read_trimmed(&root.join(rel)) {
        Ok(v) => match normalize_mac(&v).filter(|m| !is_placeholder_mac(m)) {
            Some(mac) => {
                found.add("wifi_mac", &mac, shown(root, rel));
                String::new()
            }
            None => format!("{}: no usable address", shown(root, rel)),
        },
        Err(e) => format!("{}: {}", shown(root, rel), io_why(&e)),
    };
    if let Some((v, source)) = props.get("ro.boot.wifimacaddr") {
        if let Some(mac) = normalize_mac(v).filter(|m| !is_placeholder_mac(m)) {
            found.add("wifi_mac", &mac, source);
        }
    }
    for rel in WIFI_FACTORY_FILES {
        if let Some(mac) = std::fs::read_to_string(root.join(rel))
            .ok()
            .and_then(|t| first_mac(&t))
        {
            found.add("wifi_mac", &mac, shown(root, rel));
        }
    }
    if why.is_empty() {
        why = "no usable address".into();
    }
    found.missing(
        "wifi_mac",
        format!("{why}; no ro.boot.wifimacaddr or vendor factory MAC file"),
    );
}

/// The `Address` under `[Adapter]` of a Bluetooth stack config file.
fn bt_config_address(text: &str) -> Option<String> {
    let mut adapter = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            adapter = line == "[Adapter]";
        } else if adapter {
            if let Some((key, value)) = line.split_once('=') {
                if key.trim() == "Address" {
                    return normalize_mac(value).filter(|m| !is_placeholder_mac(m));
                }
            }
        }
    }
    None
}

fn bt_mac(root: &Path, props: &Props, found: &mut Found) {
    for rel in [
        "data/misc/bluedroid/bt_config.conf",
        "data/misc/bluetooth/bt_config.conf",
    ] {
        if let Some(mac) = std::fs::read_to_string(root.join(rel))
            .ok()
            .and_then(|t| bt_config_address(&t))
        {
            found.add(
                "bt_mac",
                &mac,
                format!("{} [Adapter] Address", shown(root, rel)),
            );
        }
    }
    for prop in ["ro.boot.btmacaddr", "persist.service.bdroid.bdaddr"] {
        if let Some((v, source)) = props.get(prop) {
            if let Some(mac) = normalize_mac(v).filter(|m| !is_placeholder_mac(m)) {
                found.add("bt_mac", &mac, source);
            }
        }
    }
    if let Some((path, _)) = props.get("ro.bt.bdaddr_path") {
        let rel = path.trim_start_matches('/');
        if let Some(mac) = std::fs::read_to_string(root.join(rel))
            .ok()
            .and_then(|t| first_mac(&t))
        {
            found.add("bt_mac", &mac, shown(root, rel));
        }
    }
    found.missing(
        "bt_mac",
        "no bluetooth_address setting, bt_config.conf [Adapter] Address or Bluetooth address property",
    );
}

// ------------------------------------------------------------ telephony

/// The `iphonesubinfo` transaction codes to try for `name` on Android SDK
/// level `sdk`: FIRST_CALL_TRANSACTION (1) plus the method's place in
/// frameworks/base telephony/java/com/android/internal/telephony/
/// IPhoneSubInfo.aidl. Each is called with one argument, the calling
/// package, so each must name a method whose first parameter is that
/// package (or that takes none); every code here is a getter on every
/// layout seen, vendor ones included.
///
/// - code 1, `getDeviceId`, is the first method on every release (IMEI);
/// - Android 11+ (callingFeatureId variants): 8 `getSubscriberId`, 13
///   `getIccSerialNumber` (or `...WithFeature` on layouts without
///   `getGroupIdLevel2ForSubscriber`), 15 or 16 `getLine1Number` (16 once
///   `getGroupIdLevel2ForSubscriber` is there; both are tried);
/// - Android 6-10: 7 `getSubscriberId`; Android 10: 10
///   `getIccSerialNumber`, 12 `getLine1Number`.
///
/// Vendors (Samsung, MediaTek) insert methods of their own, so every
/// answer is checked for the shape of the identifier asked for before it
/// is kept; a wrong code yields "not found", not a wrong value.
pub(crate) fn subinfo_codes(name: &str, sdk: Option<u32>) -> &'static [u32] {
    match (name, sdk) {
        ("imei", _) => &[1],
        ("imsi", Some(30..)) => &[8],
        ("imsi", Some(23..=29)) => &[7],
        ("iccid", Some(30..)) => &[13],
        ("iccid", Some(29)) => &[10],
        ("phone_number", Some(30..)) => &[15, 16],
        ("phone_number", Some(29)) => &[12],
        _ => &[],
    }
}

/// Whether `v` has the shape of identifier `name`.
fn plausible(name: &str, v: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match name {
        "imei" => v.len() == 15 && digits(v) && luhn(v),
        "imsi" => (14..=15).contains(&v.len()) && digits(v),
        "iccid" => {
            let body = v.strip_suffix(|c| c == 'F' || c == 'f').unwrap_or(v);
            (18..=22).contains(&v.len()) && v.starts_with("89") && digits(body)
        }
        "phone_number" => {
            let n = v.strip_prefix('+').unwrap_or(v);
            (5..=15).contains(&n.len()) && digits(n)
        }
        _ => false,
    }
}

/// The Luhn check digit test (IMEI).
fn luhn(digits: &str) -> bool {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let d2 = d * 2;
                if d2 > 9 {
                    d2 - 9
                } else {
                    d2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn telephony(props: &Props, found: &mut Found) {
    let service = Path::new(SERVICE);
    if !service.exists() {
        for name in TELEPHONY {
            found.missing(name, format!("no {SERVICE} to ask the telephony service"));
        }
        return;
    }
    let sdk = props
        .get("ro.build.version.sdk")
        .and_then(|(v, _)| v.parse::<u32>().ok());
    for name in TELEPHONY {
        let codes = subinfo_codes(name, sdk);
        let mut why = match sdk {
            Some(sdk) => format!("no known iphonesubinfo call for it on Android SDK {sdk}"),
            None => "no known iphonesubinfo call for it (Android SDK level unknown)".to_string(),
        };
        for &code in codes {
            let code_arg = code.to_string();
            let answer = run(
                service,
                &["call", "iphonesubinfo", &code_arg, "s16", CALLING_PACKAGE],
                COMMAND_TIMEOUT,
            )
            .and_then(|out| parcel_string(&out));
            match answer {
                Ok(Some(v)) if plausible(name, v.trim()) && !found.has_value(v.trim()) => {
                    found.add(name, &v, format!("service call iphonesubinfo {code}"));
                    break;
                }
                Ok(Some(_)) => {
                    why = format!("iphonesubinfo {code} answered something else (another Android version's or vendor's layout)");
                }
                Ok(None) => why = format!("iphonesubinfo {code}: none (no SIM, or not provided)"),
                Err(e) => why = format!("iphonesubinfo {code}: {e}"),
            }
        }
        found.missing(name, format!("{why}: give it with --identifiers"));
    }
}

/// The string a `service call` returned: the Parcel dump it prints
/// (`Result: Parcel(` then lines of up to four 32-bit words in hex, each
/// the little-endian value of four bytes, then the bytes as text in
/// quotes) read as: an int32 exception code (0: none), an int32 length in
/// UTF-16 units (-1: null), the units. `None` for a null string.
fn parcel_string(output: &str) -> Result<Option<String>, String> {
    let mut bytes = Vec::new();
    for line in output.lines() {
        let words = line.split('\'').next().unwrap_or("");
        for token in words.split(|c: char| c.is_whitespace() || c == '(' || c == ')') {
            if token.len() == 8 && token.bytes().all(|b| b.is_ascii_hexdigit()) {
                let word = u32::from_str_radix(token, 16).map_err(|e| e.to_string())?;
                bytes.extend_from_slice(&word.to_le_bytes());
            }
        }
    }
    let int_at = |at: usize| -> Option<i32> {
        Some(i32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
    };
    let Some(code) = int_at(0) else {
        return Err("no answer (is the telephony service running?)".into());
    };
    if code != 0 {
        return Err(format!("refused (exception code {code})"));
    }
    let len = match int_at(4) {
        None | Some(-1) => return Ok(None),
        Some(n) if n < 0 => return Err(format!("a string of length {n}")),
        Some(n) => n as usize,
    };
    let Some(raw) = bytes.get(8..8 + 2 * len) else {
        return Err("a truncated answer".into());
    };
    let units: Vec<u16> = raw
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units)
        .map(Some)
        .map_err(|_| "an answer that is not UTF-16 text".into())
}

/// Runs `program` with `args` (no shell) and returns what it printed, or
/// why not; a program still running after `timeout` is killed.
fn run(program: &Path, args: &[&str], timeout: Duration) -> Result<String, String> {
    let shown = program.display();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let Some(mut stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{shown}: no output pipe"));
    };
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = io::Read::read_to_end(&mut stdout, &mut out);
        out
    });
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => return Err(format!("{shown} exited with {status}")),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                // Our own child, killed by its handle.
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{shown} did not answer within {} ms",
                    timeout.as_millis()
                ));
            }
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("waiting for {shown}: {e}"));
            }
        }
    }
    let out = reader.join().unwrap_or_default();
    Ok(String::from_utf8_lossy(&out).into_owned())
}

// ------------------------------------------------------------ the file

/// Reads and checks an `--identifiers` file: its (name, value) pairs.
fn read_file(path: &Path) -> Result<Vec<(String, String)>, String> {
    let shown = path.display();
    let cannot = |e: &io::Error| {
        format!(
            "cannot read identifiers file {shown}: {}: check the path and its permissions, or start without --identifiers",
            io_why(e)
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(format!(
            "identifiers file {shown} is not a regular file: give the path of a TOML file with an [identifiers] table, or start without --identifiers"
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "identifiers file {shown} is larger than {} KiB: is it the right file? It holds an [identifiers] table of name = \"value\" lines",
            MAX_FILE_BYTES >> 10
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| cannot(&e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = 1 + valid.iter().filter(|&&b| b == b'\n').count();
        format!("identifiers file {shown}, line {line}: not UTF-8 text; {FIX}")
    })?;
    parse_file(&text, &shown.to_string())
}

/// "an integer", "a table", ...: what a TOML value is, never its content.
fn a_type(v: &DeValue) -> String {
    let kind = v.type_str();
    let article = if kind.starts_with(|c: char| "aeiou".contains(c)) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

/// Longest name of the file (names become metric labels).
const MAX_NAME_LEN: usize = 64;

/// A name of the file: [a-z0-9_]+, starting with a letter, so that a
/// value written where the name goes (`"356938035643809" = "imei"`) is
/// refused rather than shown everywhere names are.
fn valid_name(name: &str) -> bool {
    name.len() <= MAX_NAME_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The (name, value) pairs of an identifiers file's text; `origin` names
/// it in errors. No error quotes a value or the text around one.
fn parse_file(text: &str, origin: &str) -> Result<Vec<(String, String)>, String> {
    let at = |offset: usize| {
        let (line, column) = line_col(text, offset);
        format!("identifiers file {origin}, line {line}, column {column}")
    };
    // The parser's message names what was expected, never the text; its
    // Display would show the line, value and all, so it is not used.
    let doc = toml::de::DeTable::parse(text).map_err(|e| {
        let place = match e.span() {
            Some(span) => at(span.start),
            None => format!("identifiers file {origin}"),
        };
        format!("{place}: not valid TOML ({}); {FIX}", e.message().trim())
    })?;
    let doc = doc.get_ref();
    let unknown: Vec<&str> = doc
        .iter()
        .map(|(key, _)| &**key.get_ref())
        .filter(|key| *key != "identifiers")
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "identifiers file {origin}: unknown top-level key{} {}: the file holds one table, [identifiers]; put each name = \"value\" line below the line [identifiers]; {FIX}",
            if unknown.len() == 1 { "" } else { "s" },
            unknown.join(", ")
        ));
    }
    let Some((key, table)) = doc.iter().next() else {
        return Err(format!(
            "identifiers file {origin}: no [identifiers] table: start the file with a line [identifiers], then one name = \"value\" line per identifier; {FIX}"
        ));
    };
    let DeValue::Table(table) = table.get_ref() else {
        return Err(format!(
            "{}: identifiers is {}, not a table: write [identifiers] on a line of its own, then one name = \"value\" line per identifier; {FIX}",
            at(key.span().start),
            a_type(table.get_ref())
        ));
    };
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(name, _)| name.span().start);
    let mut out = Vec::new();
    for (name, value) in entries {
        let place = at(name.span().start);
        let name: &str = name.get_ref();
        // A name that is not one may be a value written on the wrong side.
        if !valid_name(name) {
            return Err(format!(
                "{place}: an identifier name is a letter a-z, then a-z, 0-9 and _ only, at most {MAX_NAME_LEN} characters (imei, wifi_mac, ...): rename it; {FIX}"
            ));
        }
        let values: Vec<&DeValue> = match value.get_ref() {
            DeValue::Array(items) => items.iter().map(|v| v.get_ref()).collect(),
            other => vec![other],
        };
        if values.is_empty() {
            return Err(format!(
                "{place}: identifier {name} has an empty list: give at least one value or remove the line; {FIX}"
            ));
        }
        for v in values {
            match v {
                DeValue::String(s) if s.trim().is_empty() => {
                    return Err(format!(
                        "{place}: identifier {name} has an empty value: give its value or remove the line; {FIX}"
                    ))
                }
                DeValue::String(s) => out.push((name.to_string(), s.trim().to_string())),
                other => {
                    return Err(format!(
                        "{place}: identifier {name} is {}, not a string: write the value in quotes, {name} = \"...\"; {FIX}",
                        a_type(other)
                    ))
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::owners::abx;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory of its own under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "egressmon-identifiers-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }

        fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, content).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const MACHINE_ID: &str = "b08dfa6083e7567a1921a715000001fb";
    const UUID: &str = "4c4c4544-004d-3510-804f-c4c04f4b4d32";
    const IMEI: &str = "356938035643809";
    const SERIAL: &str = "R58M12ABCDE";

    fn linux_root() -> TempDir {
        let root = TempDir::new();
        root.write("etc/machine-id", format!("{MACHINE_ID}\n"));
        root.write("sys/class/net/lo/type", "772\n");
        root.write("sys/class/net/lo/address", "00:00:00:00:00:00\n");
        root.write("sys/class/net/eth0/type", "1\n");
        root.write("sys/class/net/eth0/addr_assign_type", "0\n");
        root.write("sys/class/net/eth0/address", "52:54:00:12:34:56\n");
        root.write("sys/class/net/wlp2s0/type", "1\n");
        root.write("sys/class/net/wlp2s0/address", "A4:5E:60:C1:22:33\n");
        // A tunnel: no hardware address.
        root.write("sys/class/net/tun0/type", "65534\n");
        root.write("sys/class/net/tun0/address", "\n");
        // A veth end: a random address the kernel made up.
        root.write("sys/class/net/veth1a2b/type", "1\n");
        root.write("sys/class/net/veth1a2b/addr_assign_type", "1\n");
        root.write("sys/class/net/veth1a2b/address", "ee:11:22:33:44:55\n");
        // A down interface with no address yet.
        root.write("sys/class/net/eth1/type", "1\n");
        root.write("sys/class/net/eth1/address", "00:00:00:00:00:00\n");
        root.write(
            "sys/class/dmi/id/product_serial",
            "To be filled by O.E.M.\n",
        );
        root.write("sys/class/dmi/id/product_uuid", format!("{UUID}\n"));
        root
    }

    fn linux(root: &TempDir, file: Option<PathBuf>) -> Result<Identifiers, String> {
        Identifiers::load(&IdentifierSources {
            android_root: None,
            file,
            linux_root: root.path().to_path_buf(),
        })
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn linux_identifiers_from_a_fake_root() {
        let root = linux_root();
        let ids = linux(&root, None).unwrap();
        assert_eq!(
            ids.pairs(),
            pairs(&[
                ("dmi_uuid", UUID),
                ("mac", "52:54:00:12:34:56"),
                ("mac", "a4:5e:60:c1:22:33"),
                ("machine_id", MACHINE_ID),
            ])
        );
        assert_eq!(ids.names(), ["dmi_uuid", "mac", "machine_id"]);
        assert_eq!(ids.len(), 4);
        assert!(!ids.is_empty());
        let unavailable: Vec<&str> = ids.unavailable().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(unavailable, ["dmi_serial"]);
        assert!(
            ids.unavailable()[0].1.contains("placeholder"),
            "{:?}",
            ids.unavailable()
        );
        let described = ids.describe();
        let eth0 = format!(
            "mac: {}",
            root.path().join("sys/class/net/eth0/address").display()
        );
        assert!(described.contains(&eth0), "{described:?}");
        assert!(
            described
                .iter()
                .any(|l| l.starts_with("dmi_serial: not found (")),
            "{described:?}"
        );
    }

    #[test]
    fn machine_id_falls_back_to_dbus_and_nothing_is_an_error() {
        let root = TempDir::new();
        root.write("etc/machine-id", "uninitialized\n");
        root.write("var/lib/dbus/machine-id", format!("{MACHINE_ID}\n"));
        let ids = linux(&root, None).unwrap();
        assert_eq!(ids.pairs(), pairs(&[("machine_id", MACHINE_ID)]));
        assert!(ids.describe().contains(&format!(
            "machine_id: {}",
            root.path().join("var/lib/dbus/machine-id").display()
        )));

        let empty = TempDir::new();
        let ids = linux(&empty, None).unwrap();
        assert!(ids.is_empty());
        let names: Vec<&str> = ids.unavailable().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["dmi_serial", "dmi_uuid", "mac", "machine_id"]);
    }

    #[test]
    fn the_file_overrides_and_adds() {
        let root = linux_root();
        let file = root.write(
            "ids.toml",
            "# operator's own\n[identifiers]\nmachine_id = \"  0f0e0d0c0b0a09080706050403020100 \"\nimei = \"356938035643809\"\ndmi_serial = [\"PF2ABCDE\", \"PF2ABCDF\"]\n",
        );
        let ids = linux(&root, Some(file)).unwrap();
        assert_eq!(
            ids.pairs(),
            pairs(&[
                ("dmi_serial", "PF2ABCDE"),
                ("dmi_serial", "PF2ABCDF"),
                ("dmi_uuid", UUID),
                ("imei", IMEI),
                ("mac", "52:54:00:12:34:56"),
                ("mac", "a4:5e:60:c1:22:33"),
                ("machine_id", "0f0e0d0c0b0a09080706050403020100"),
            ])
        );
        // Given by the file, so no longer unavailable.
        assert!(ids.unavailable().is_empty(), "{:?}", ids.unavailable());
        let described = ids.describe();
        for line in [
            "imei: file",
            "machine_id: file",
            "dmi_serial: 2 values from file",
        ] {
            assert!(
                described.contains(&line.to_string()),
                "{line}: {described:?}"
            );
        }
    }

    #[test]
    fn bad_files_say_what_to_fix_and_never_show_a_value() {
        let dir = TempDir::new();
        let secret = "356938035643809";
        let cases: &[(&str, &str)] = &[
            (
                "[identifiers]\nimei = \"356938035643809\n",
                "line 2, column",
            ),
            ("[identifiers]\nimei = 356938035643809x\n", "not valid TOML"),
            (
                "[identifiers]\nimei = 356938035643809\n",
                "line 2, column 1: identifier imei is an integer, not a string",
            ),
            (
                "[identifiers]\nimei = [\"356938035643809\", 7]\n",
                "identifier imei is an integer, not a string",
            ),
            (
                "[identifiers]\nimei = \"  \"\n",
                "line 2, column 1: identifier imei has an empty value",
            ),
            (
                "[identifiers]\nimei = []\n",
                "identifier imei has an empty list",
            ),
            (
                "[identifiers]\nIMEI = \"356938035643809\"\n",
                "line 2, column 1: an identifier name is a letter a-z, then a-z, 0-9 and _ only",
            ),
            (
                "[identifiers]\n\"356938035643809\" = \"imei\"\n",
                "line 2, column 1: an identifier name is a letter",
            ),
            (
                "[identifiers]\nimei.x = \"356938035643809\"\n",
                "identifier imei is a table, not a string",
            ),
            (
                "imei = \"356938035643809\"\n[identifiers]\n",
                "unknown top-level key imei:",
            ),
            (
                "a = 1\nb = \"356938035643809\"\n",
                "unknown top-level keys a, b:",
            ),
            ("", "no [identifiers] table"),
            (
                "identifiers = \"356938035643809\"\n",
                "line 1, column 1: identifiers is a string, not a table",
            ),
            (
                "[identifiers]\nimei = \"1\"\nimei = \"356938035643809\"\n",
                "line 3, column",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = dir.write(&format!("bad{i}.toml"), text);
            let e = Identifiers::load(&IdentifierSources {
                file: Some(path.clone()),
                linux_root: dir.path().to_path_buf(),
                ..IdentifierSources::default()
            })
            .unwrap_err();
            assert!(e.contains(want), "{text:?}\n got: {e}\nwant: {want}");
            assert!(!e.contains(secret), "{text:?} shows the value: {e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.ends_with(FIX), "{e}");
        }

        let not_utf8 = dir.write("latin1.toml", b"[identifiers]\nserial = \"\xe9\"\n");
        let e = read_file(&not_utf8).unwrap_err();
        assert!(e.contains("line 2: not UTF-8 text"), "{e}");

        let e = read_file(&dir.path().join("missing.toml")).unwrap_err();
        assert!(
            e.contains("cannot read identifiers file") && e.contains("missing"),
            "{e}"
        );

        let e = read_file(dir.path()).unwrap_err();
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn debug_and_describe_show_no_value() {
        let root = linux_root();
        let file = root.write("ids.toml", format!("[identifiers]\nimei = \"{IMEI}\"\n"));
        let ids = linux(&root, Some(file)).unwrap();
        let debug = format!("{ids:?} {ids:#?}");
        let described = ids.describe().join("\n");
        for (_, value) in ids.pairs() {
            assert!(!debug.contains(&value), "Debug shows {value}: {debug}");
            assert!(!described.contains(&value), "describe shows {value}");
        }
        assert!(debug.contains("imei: file"), "{debug}");
        assert!(debug.contains("machine_id"), "{debug}");
    }

    #[test]
    fn names_start_with_a_letter() {
        for good in ["imei", "imei2", "wifi_mac", "x", &"a".repeat(MAX_NAME_LEN)] {
            assert!(valid_name(good), "{good:?}");
        }
        for bad in [
            "",
            "IMEI",
            "2imei",
            "_x",
            "wifi-mac",
            "é",
            &"a".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    /// The settings files as SettingsProvider writes them on Android 12+.
    fn abx_settings(settings: &[(&str, &str, &str)]) -> Vec<u8> {
        let mut out = abx::MAGIC.to_vec();
        let mut strings: Vec<String> = Vec::new();
        let utf = |out: &mut Vec<u8>, s: &str| {
            out.extend((s.len() as u16).to_be_bytes());
            out.extend(s.as_bytes());
        };
        let mut interned = |out: &mut Vec<u8>, s: &str| match strings.iter().position(|x| x == s) {
            Some(i) => out.extend((i as u16).to_be_bytes()),
            None => {
                out.extend(0xFFFFu16.to_be_bytes());
                utf(out, s);
                strings.push(s.to_string());
            }
        };
        out.push(abx::START_DOCUMENT | abx::TYPE_NULL);
        out.push(abx::START_TAG | abx::TYPE_STRING_INTERNED);
        interned(&mut out, "settings");
        out.push(abx::ATTRIBUTE | abx::TYPE_INT);
        interned(&mut out, "version");
        out.extend(213i32.to_be_bytes());
        for (id, (name, value, package)) in settings.iter().enumerate() {
            out.push(abx::START_TAG | abx::TYPE_STRING_INTERNED);
            interned(&mut out, "setting");
            out.push(abx::ATTRIBUTE | abx::TYPE_INT);
            interned(&mut out, "id");
            out.extend((id as i32).to_be_bytes());
            for (attr, text) in [("name", *name), ("value", *value), ("package", *package)] {
                out.push(abx::ATTRIBUTE | abx::TYPE_STRING);
                interned(&mut out, attr);
                utf(&mut out, text);
            }
            out.push(abx::ATTRIBUTE | abx::TYPE_BOOLEAN_TRUE);
            interned(&mut out, "defaultSysSet");
            out.push(abx::END_TAG | abx::TYPE_STRING_INTERNED);
            interned(&mut out, "setting");
        }
        out.push(abx::END_TAG | abx::TYPE_STRING_INTERNED);
        interned(&mut out, "settings");
        out.push(abx::END_DOCUMENT | abx::TYPE_NULL);
        out
    }

    const USERKEY: &str = "8a3c3a1e9f4b5d6c7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d";

    fn android_root() -> TempDir {
        let root = TempDir::new();
        root.write(
            "props.txt",
            format!("# adb shell getprop > props.txt\n[ro.serialno]: [{SERIAL}]\nro.boot.serialno={SERIAL}\n[ro.build.version.sdk]: [34]\n[ro.boot.btmacaddr]: []\n"),
        );
        root.write(
            "data/system/users/0/settings_ssaid.xml",
            format!(
                "<?xml version='1.0' encoding='UTF-8' standalone='yes' ?>\n<settings version=\"-1\">\n  <setting id=\"0\" name=\"userkey\" value=\"{USERKEY}\" package=\"android\" defaultValue=\"{USERKEY}\" defaultSysSet=\"true\" />\n  <setting id=\"1\" name=\"10123\" value=\"9774d56d682e549c\" package=\"com.example.app\" defaultValue=\"9774d56d682e549c\" defaultSysSet=\"true\" />\n  <setting id=\"2\" name=\"10007\" value=\"3f1b2c4d5e6f7081\" package=\"com.android.vending\" defaultValue=\"3f1b2c4d5e6f7081\" defaultSysSet=\"true\" />\n</settings>\n"
            ),
        );
        root.write(
            "data/system/users/0/settings_secure.xml",
            "<?xml version='1.0' encoding='UTF-8' standalone='yes' ?>\n<settings version=\"213\">\n  <setting id=\"3\" name=\"android_id\" value=\"a1b2c3d4e5f60718\" package=\"android\" defaultValue=\"a1b2c3d4e5f60718\" defaultSysSet=\"true\" />\n  <setting id=\"9\" name=\"bluetooth_address\" value=\"3C:5A:B4:01:02:03\" package=\"android\" />\n  <setting id=\"10\" name=\"bluetooth_name\" value=\"Pixel 7\" package=\"android\" />\n</settings>\n",
        );
        // A work profile, on Android 12+: binary XML.
        root.write(
            "data/system/users/10/settings_ssaid.xml",
            abx_settings(&[
                ("userkey", USERKEY, "android"),
                ("1010123", "5e6f708192a3b4c5", "com.example.app"),
            ]),
        );
        root.write("sys/class/net/wlan0/address", "da:a1:19:6b:0c:4e\n");
        root.write(
            "data/misc/bluedroid/bt_config.conf",
            "[Info]\nFileSource = Empty\n\n[Adapter]\nAddress = 3c:5a:b4:01:02:03\nLE_LOCAL_KEY_IRK = 00112233445566778899aabbccddeeff\n\n[aa:bb:cc:dd:ee:ff]\nAddress = 11:22:33:44:55:66\n",
        );
        root.write(
            "mnt/vendor/persist/wlan_mac.bin",
            "Intf0MacAddress=3C5AB4010204\nIntf1MacAddress=3C5AB4010205\nEND\n",
        );
        root
    }

    #[test]
    fn android_identifiers_from_a_device_layout() {
        let root = android_root();
        let ids = Identifiers::load(&IdentifierSources {
            android_root: Some(root.path().to_path_buf()),
            file: None,
            linux_root: PathBuf::from("/nonexistent"),
        })
        .unwrap();
        assert_eq!(
            ids.pairs(),
            pairs(&[
                ("android_id", "3f1b2c4d5e6f7081"),
                ("android_id", "5e6f708192a3b4c5"),
                ("android_id", "9774d56d682e549c"),
                ("android_id", "a1b2c3d4e5f60718"),
                ("bt_mac", "3c:5a:b4:01:02:03"),
                ("serial", SERIAL),
                ("wifi_mac", "3c:5a:b4:01:02:04"),
                ("wifi_mac", "da:a1:19:6b:0c:4e"),
            ])
        );
        assert!(!ids.pairs().iter().any(|(_, v)| v == USERKEY));
        let unavailable: Vec<&str> = ids.unavailable().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(unavailable, ["iccid", "imei", "imsi", "phone_number"]);
        let described = ids.describe();
        let props = root.path().join("props.txt");
        assert!(
            described.contains(&format!("serial: {} ro.serialno", props.display())),
            "{described:?}"
        );
        let ssaid = root.path().join("data/system/users/0/settings_ssaid.xml");
        assert!(
            described.contains(&format!("android_id: 2 values from {}", ssaid.display())),
            "{described:?}"
        );
        let debug = format!("{ids:?}");
        for (_, value) in ids.pairs() {
            assert!(!debug.contains(&value), "{debug}");
        }
    }

    #[test]
    fn android_serial_fallback_and_placeholders() {
        let root = TempDir::new();
        root.write(
            "props.txt",
            "ro.serialno=0123456789ABCDEF\nro.boot.serialno=ZY22GX4\n",
        );
        let sources = IdentifierSources {
            android_root: Some(root.path().to_path_buf()),
            ..IdentifierSources::default()
        };
        let ids = Identifiers::load(&sources).unwrap();
        assert_eq!(ids.pairs(), pairs(&[("serial", "ZY22GX4")]));
        assert!(ids.describe().contains(&format!(
            "serial: {} ro.boot.serialno",
            root.path().join("props.txt").display()
        )));

        root.write("props.txt", "ro.serialno=unknown\n");
        let ids = Identifiers::load(&sources).unwrap();
        assert!(ids.is_empty());
        let serial = ids
            .unavailable()
            .iter()
            .find(|(n, _)| n == "serial")
            .unwrap();
        assert!(serial.1.contains("placeholder"), "{serial:?}");
    }

    #[test]
    fn an_android_root_is_told_by_its_build_prop() {
        let root = TempDir::new();
        root.write("system/build.prop", "ro.build.version.sdk=34\n");
        root.write("props.txt", format!("ro.serialno={SERIAL}\n"));
        let ids = linux(&root, None).unwrap();
        assert_eq!(ids.pairs(), pairs(&[("serial", SERIAL)]));
        assert!(ids.unavailable().iter().any(|(n, _)| n == "imei"));
        assert!(!ids.unavailable().iter().any(|(n, _)| n == "machine_id"));
    }

    #[test]
    fn props_in_both_formats() {
        let props = parse_props(
            "[ro.serialno]: [R58M12ABCDE]\n[ro.boot.wifimacaddr]: []\n# comment\nro.product.model = Pixel 7\n\ngarbage\n[half: [open\n",
        );
        assert_eq!(
            props.get("ro.serialno").map(String::as_str),
            Some("R58M12ABCDE")
        );
        assert_eq!(
            props.get("ro.boot.wifimacaddr").map(String::as_str),
            Some("")
        );
        assert_eq!(
            props.get("ro.product.model").map(String::as_str),
            Some("Pixel 7")
        );
        assert_eq!(props.len(), 3);
    }

    #[test]
    fn macs_placeholders_and_bluetooth_config() {
        assert_eq!(
            normalize_mac("A4:5E:60:C1:22:33").as_deref(),
            Some("a4:5e:60:c1:22:33")
        );
        assert_eq!(
            normalize_mac("a4-5e-60-c1-22-33").as_deref(),
            Some("a4:5e:60:c1:22:33")
        );
        assert_eq!(
            normalize_mac(" A45E60C12233\n").as_deref(),
            Some("a4:5e:60:c1:22:33")
        );
        for bad in [
            "",
            "a4:5e:60:c1:22",
            "a4:5e-60:c1:22:33",
            "g4:5e:60:c1:22:33",
            "a4:5e:60:c1:2233",
        ] {
            assert_eq!(normalize_mac(bad), None, "{bad:?}");
        }
        assert!(is_placeholder_mac("02:00:00:00:00:00"));
        assert_eq!(
            first_mac("Intf0MacAddress=000000000000\nIntf1MacAddress=3C5AB4010205\n").as_deref(),
            Some("3c:5a:b4:01:02:05")
        );

        for p in [
            "",
            "0",
            "None",
            "To be filled by O.E.M.",
            "Default string",
            "System Serial Number",
            "00000000-0000-0000-0000-000000000000",
            "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
            "0123456789ABCDEF",
            "unknown",
            "03000200-0400-0500-0006-000700080009",
        ] {
            assert!(is_placeholder(p), "{p:?}");
        }
        for real in [UUID, "PF2ABCDE", SERIAL, "9774d56d682e549c"] {
            assert!(!is_placeholder(real), "{real:?}");
        }

        assert_eq!(bt_config_address("[Adapter]\nName = x\n"), None);
        assert_eq!(
            bt_config_address(
                "[Remote]\nAddress = 11:22:33:44:55:66\n[Adapter]\nAddress=22:22:AA:BB:CC:DD\n"
            )
            .as_deref(),
            Some("22:22:aa:bb:cc:dd")
        );
    }

    #[test]
    fn parcel_dumps_of_service_call() {
        let imei = "Result: Parcel(\n  0x00000000: 00000000 0000000f 00350033 00390036 '........3.5.6.9.'\n  0x00000010: 00380033 00330030 00360035 00330034 '3.8.0.3.5.6.4.3.'\n  0x00000020: 00300038 00000039                   '8.0.9...        ')\n";
        assert_eq!(parcel_string(imei).unwrap().as_deref(), Some(IMEI));
        // The one-line form of short replies.
        assert_eq!(
            parcel_string("Result: Parcel(00000000 00000002 00420041 00000000 '....A.B.....')\n")
                .unwrap()
                .as_deref(),
            Some("AB")
        );
        assert_eq!(
            parcel_string("Result: Parcel(00000000 ffffffff   '........')\n").unwrap(),
            None
        );
        let refused = "Result: Parcel(\n  0x00000000: ffffffff 0000001f 00650052 00750071 '........R.e.q.u.'\n')";
        assert!(parcel_string(refused)
            .unwrap_err()
            .contains("exception code -1"));
        assert!(parcel_string("service: Service iphonesubinfo does not exist\n").is_err());
        assert!(
            parcel_string("Result: Parcel(Error: 0xffffffb6 \"Not a data message\")\n").is_err()
        );
        assert!(
            parcel_string("Result: Parcel(00000000 0000000f 00350033 '....3.5.')\n")
                .unwrap_err()
                .contains("truncated")
        );
    }

    #[test]
    fn telephony_answers_are_checked_for_their_shape() {
        assert!(luhn(IMEI));
        assert!(plausible("imei", IMEI));
        assert!(!plausible("imei", "356938035643808"));
        assert!(!plausible("imei", "01"));
        assert!(plausible("imsi", "310260000000000"));
        assert!(!plausible("imsi", "+15551234567"));
        assert!(plausible("iccid", "8901260000000000000"));
        assert!(plausible("iccid", "890126000000000000F"));
        assert!(!plausible("iccid", "310260000000000"));
        assert!(plausible("phone_number", "+15551234567"));
        assert!(!plausible("phone_number", "8901260000000000000"));
        assert_eq!(subinfo_codes("imei", None), [1]);
        assert_eq!(subinfo_codes("imsi", Some(34)), [8]);
        assert_eq!(subinfo_codes("iccid", Some(28)), [] as [u32; 0]);
        assert_eq!(subinfo_codes("phone_number", Some(36)), [15, 16]);
    }

    #[test]
    fn commands_run_without_a_shell_and_time_out() {
        let e = run(Path::new("/nonexistent/getprop"), &[], COMMAND_TIMEOUT).unwrap_err();
        assert!(e.contains("/nonexistent/getprop"), "{e}");
        let started = Instant::now();
        let e = run(Path::new("sleep"), &["5"], Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(
            run(Path::new("echo"), &["a b"], COMMAND_TIMEOUT).unwrap(),
            "a b\n"
        );
    }
}
