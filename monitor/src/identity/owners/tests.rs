//! Resolver tests on the fixture device layouts under
//! monitor/tests/fixtures/android: an Android 14 device (binary
//! packages.xml, a work profile, OEM AIDs, a malformed packages.list line)
//! and an Android 9 device (text packages.xml, short packages.list lines).

use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/android")
}

fn device(name: &str) -> OwnerResolver {
    OwnerResolver::new(Some(&fixtures().join(name))).unwrap()
}

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "egressmon-owners-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A copy of fixture device `name`.
    fn device(name: &str) -> Scratch {
        let s = Scratch::new();
        copy_tree(&fixtures().join(name), &s.0);
        s
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// (owner, packages, origin, firmware) for compact assertions.
fn who(r: &OwnerResolver, uid: u32) -> (String, Vec<String>, String, bool) {
    let o = r.resolve(uid);
    (o.owner, o.packages, o.origin.to_string(), o.firmware)
}

fn w(
    owner: &str,
    packages: &[&str],
    origin: &str,
    firmware: bool,
) -> (String, Vec<String>, String, bool) {
    (
        owner.into(),
        packages.iter().map(|p| p.to_string()).collect(),
        origin.into(),
        firmware,
    )
}

/// An element's name, depth and attributes as text.
type TextElement = (String, usize, Vec<(String, Option<String>)>);

#[test]
fn abx_fixture_is_the_text_fixture_in_binary() {
    let text = std::fs::read_to_string(fixtures().join("android14-packages.xml")).unwrap();
    let binary = abx_writer::from_text_xml(&text);
    let target = fixtures().join("android14/data/system/packages.xml");
    if std::env::var_os("EGRESSMON_WRITE_FIXTURES").is_some() {
        std::fs::write(&target, &binary).unwrap();
    }
    let committed = std::fs::read(&target).unwrap();
    assert!(
        committed == binary,
        "{} is not the binary form of android14-packages.xml; run the unit tests with EGRESSMON_WRITE_FIXTURES=1 to regenerate it",
        target.display()
    );
    // Both forms read to the same elements once attribute values are text.
    let as_text = |els: Vec<packages_xml::Element>| -> Vec<TextElement> {
        els.into_iter()
            .map(|e| {
                let attrs = e
                    .attributes
                    .iter()
                    .map(|(n, v)| (n.clone(), v.to_text()))
                    .collect();
                (e.name, e.depth, attrs)
            })
            .collect()
    };
    let from_text = packages_xml::elements(text.as_bytes(), Path::new("t")).unwrap();
    let from_binary = packages_xml::elements(&binary, Path::new("b")).unwrap();
    assert_eq!(as_text(from_text), as_text(from_binary));
}

#[test]
fn android14_names_every_uid_class() {
    let r = device("android14");
    assert!(r.is_android());
    let cases = [
        (0, w("root", &[], "platform", true)),
        (
            1000,
            w(
                "system",
                &["android", "com.android.settings"],
                "platform",
                true,
            ),
        ),
        (
            1001,
            w(
                "radio",
                &["com.android.phone", "com.android.providers.telephony"],
                "platform",
                true,
            ),
        ),
        (1051, w("dns", &[], "platform", true)),
        (1073, w("network_stack", &[], "platform", true)),
        (2000, w("shell", &[], "platform", true)),
        // OEM range: named by vendor/etc/passwd, or oem_<n>.
        (2901, w("vendor_modem_diag", &[], "platform", true)),
        (2950, w("oem_2950", &[], "platform", true)),
        (5001, w("oem_5001", &[], "platform", true)),
        (6001, w("system_reserved_6001", &[], "platform", true)),
        (7501, w("system_ext_reserved_7501", &[], "platform", true)),
        // Preinstalled: code in /system, in /product with a shared uid, an
        // updated system app now in /data/app, and one known only from
        // packages.list's installer field (@product).
        (
            10050,
            w(
                "com.vendor.telemetry",
                &["com.vendor.telemetry"],
                "preinstalled",
                true,
            ),
        ),
        (
            10057,
            w(
                "com.google.uid.shared",
                &["com.google.android.gms", "com.google.android.gsf"],
                "preinstalled",
                true,
            ),
        ),
        (
            10090,
            w(
                "com.android.chrome",
                &["com.android.chrome"],
                "preinstalled",
                true,
            ),
        ),
        (
            10060,
            w("com.oem.store", &["com.oem.store"], "preinstalled", true),
        ),
        // User-installed, in current, Android 10 and Android 9 line formats.
        (
            10123,
            w("com.example.app", &["com.example.app"], "app", false),
        ),
        (
            10070,
            w("com.old.format", &["com.old.format"], "app", false),
        ),
        (10071, w("com.older", &["com.older"], "app", false)),
        // User 10 (work profile): the same package, user 10's uid.
        (
            1_010_123,
            w("com.example.app", &["com.example.app"], "app", false),
        ),
        (
            1_001_001,
            w(
                "radio",
                &["com.android.phone", "com.android.providers.telephony"],
                "platform",
                true,
            ),
        ),
        // SDK sandbox of app 10200, and of an app no source names.
        (
            20_200,
            w(
                "com.sandboxed (sdk sandbox)",
                &["com.sandboxed"],
                "app",
                false,
            ),
        ),
        (20_999, w("u0_a999 (sdk sandbox)", &[], "unknown", false)),
        // Isolated processes, old and new range.
        (99_001, w("u0_i9001 (isolated)", &[], "unknown", false)),
        (1_090_005, w("u10_i5 (isolated)", &[], "unknown", false)),
        // Numbers only.
        (10_999, w("u0_a999", &[], "unknown", false)),
        (54_545, w("all_a4545", &[], "unknown", false)),
        (65_534, w("overflowuid", &[], "unknown", false)),
        (KERNEL_UID, w("kernel", &[], "platform", true)),
    ];
    for (uid, expected) in cases {
        assert_eq!(who(&r, uid), expected, "uid {uid}");
    }
    let secondary = r.resolve(1_010_123);
    assert_eq!((secondary.user, secondary.app_id), (10, 10_123));

    // The malformed packages.list line is reported with file and line; the
    // vendor passwd's attempt to rename AID 1000 is ignored.
    let malformed: Vec<_> = r
        .warnings()
        .iter()
        .filter(|w| w.contains("packages.list:13: skipping malformed line"))
        .collect();
    assert_eq!(malformed.len(), 1, "{:?}", r.warnings());
    assert_eq!(r.warnings().len(), 1, "{:?}", r.warnings());
}

#[test]
fn known_owners_cover_every_aid_every_user_and_every_package() {
    let r = device("android14");
    let table = r.known_owners();
    let uids: BTreeSet<u32> = table.iter().map(|o| o.uid).collect();
    assert_eq!(uids.len(), table.len(), "one row per uid");
    for &(id, name) in aids::AIDS {
        let row = table
            .iter()
            .find(|o| o.uid == id)
            .unwrap_or_else(|| panic!("AID {id}"));
        assert_eq!(row.owner, name);
    }
    for uid in [
        1_001_001,
        1_000_000 + 10_123,
        10_050,
        10_057,
        10_123,
        10_071,
        2901,
        1_010_200,
    ] {
        assert!(uids.contains(&uid), "{uid} missing");
    }
    // No root for secondary users; OEM ranges only where a partition names them.
    assert!(!uids.contains(&1_000_000));
    assert!(!uids.contains(&2950));
    assert!(table.iter().all(|o| o.firmware == o.origin.is_firmware()));
    // Every package of packages.list is there (the malformed line aside).
    let packages: BTreeSet<&str> = table
        .iter()
        .flat_map(|o| o.packages.iter().map(String::as_str))
        .collect();
    assert_eq!(packages.len(), 13, "{packages:?}");
}

#[test]
fn android9_text_packages_xml_and_short_lines() {
    let r = device("android9");
    let cases = [
        (1001, w("radio", &["com.android.phone"], "platform", true)),
        (
            10041,
            w(
                "com.oem.weather",
                &["com.oem.weather"],
                "preinstalled",
                true,
            ),
        ),
        (
            10123,
            w(
                "com.example.shared",
                &["com.example.app", "com.example.plugin"],
                "app",
                false,
            ),
        ),
    ];
    for (uid, expected) in cases {
        assert_eq!(who(&r, uid), expected, "uid {uid}");
    }
    assert!(r.warnings().is_empty(), "{:?}", r.warnings());
    // Only user 0 on this device.
    assert!(r.known_owners().iter().all(|o| o.user == 0));
}

#[test]
fn text_and_binary_packages_xml_give_the_same_table() {
    let binary = device("android14").known_owners();
    let dir = Scratch::device("android14");
    std::fs::copy(
        fixtures().join("android14-packages.xml"),
        dir.0.join("data/system/packages.xml"),
    )
    .unwrap();
    let text = OwnerResolver::new(Some(&dir.0)).unwrap().known_owners();
    assert_eq!(binary, text);
}

#[test]
fn packages_backup_xml_wins_as_on_the_device() {
    let dir = Scratch::device("android9");
    let system = dir.0.join("data/system");
    let xml = std::fs::read_to_string(system.join("packages.xml")).unwrap();
    std::fs::write(
        system.join("packages-backup.xml"),
        xml.replace(
            r#"codePath="/vendor/app/OemWeather" publicFlags="1082703429""#,
            r#"codePath="/data/app/OemWeather" publicFlags="1082703428""#,
        ),
    )
    .unwrap();
    let r = OwnerResolver::new(Some(&dir.0)).unwrap();
    assert_eq!(r.resolve(10041).origin, "app");
}

#[test]
fn truncated_abx_is_an_error_at_every_offset_and_the_resolver_carries_on() {
    let full = std::fs::read(fixtures().join("android14/data/system/packages.xml")).unwrap();
    let file = Path::new("packages.xml");
    // The last byte is END_DOCUMENT, which may be missing; any shorter cut
    // loses part of the document and must say so, without panicking.
    for cut in 0..full.len() - 1 {
        let result = packages_xml::elements(&full[..cut], file)
            .and_then(|els| packages_xml::interpret(&els, file));
        let err = result.expect_err(&format!("cut at {cut}"));
        assert!(err.to_string().starts_with("packages.xml: byte "), "{err}");
    }
    let dir = Scratch::device("android14");
    for cut in [3, 100, full.len() / 2, full.len() - 2] {
        std::fs::write(dir.0.join("data/system/packages.xml"), &full[..cut]).unwrap();
        let r = OwnerResolver::new(Some(&dir.0)).unwrap();
        // packages.list still names the packages; its installer field still
        // tells preinstalled ones.
        assert_eq!(
            who(&r, 10123),
            w("com.example.app", &["com.example.app"], "app", false)
        );
        assert_eq!(r.resolve(10050).origin, "preinstalled");
        let xml_warning = r
            .warnings()
            .iter()
            .find(|w| w.contains("packages.xml: byte "))
            .unwrap_or_else(|| panic!("cut {cut}: {:?}", r.warnings()));
        assert!(xml_warning.contains("expected"), "{xml_warning}");
    }
}

#[test]
fn malformed_text_xml_keeps_the_other_sources() {
    let dir = Scratch::device("android9");
    std::fs::write(
        dir.0.join("data/system/packages.xml"),
        "<packages>\n<package name=\"x\" userId=\"10041\" codePath=\"/vendor/app/X\">\n</packages>\n",
    )
    .unwrap();
    let r = OwnerResolver::new(Some(&dir.0)).unwrap();
    assert_eq!(r.resolve(10041).owner, "com.oem.weather");
    assert!(
        r.warnings()
            .iter()
            .any(|w| w.contains("packages.xml: line 3, column")),
        "{:?}",
        r.warnings()
    );
}

#[test]
fn pm_on_the_device_adds_packages_and_users() {
    let dir = Scratch::device("android9");
    let pm = dir.0.join("pm");
    std::fs::write(
        &pm,
        "#!/bin/sh\n\
         echo 'package:/product/app/Maps/Maps.apk=com.google.android.apps.maps uid:10077,1110077'\n\
         echo 'package:/data/app/~~x==/com.example.app-y==/base.apk=com.example.app uid:10123'\n",
    )
    .unwrap();
    std::fs::set_permissions(&pm, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // A process another test thread forks while the script was open for
    // writing holds it until its exec: wait out ETXTBSY before the real run.
    for _ in 0..100 {
        match std::process::Command::new(&pm).output() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => break,
        }
    }
    let r = OwnerResolver::android(AndroidSources {
        root: dir.0.clone(),
        pm: Some(pm),
    });
    assert_eq!(
        who(&r, 1_110_077),
        w(
            "com.google.android.apps.maps",
            &["com.google.android.apps.maps"],
            "preinstalled",
            true
        )
    );
    assert!(r.known_owners().iter().any(|o| o.uid == 1_101_001));
    // packages.xml outranks pm where both speak.
    assert_eq!(r.resolve(10123).origin, "app");
}

#[test]
fn android_root_mistakes_are_explained() {
    let err = OwnerResolver::new(Some(Path::new("/nonexistent/device")))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a directory"), "{err}");
    let system = fixtures().join("android9/data/system");
    let err = OwnerResolver::new(Some(&system)).err().unwrap().to_string();
    assert!(err.contains("this looks like data/system itself"), "{err}");
    assert!(
        err.contains(&fixtures().join("android9").display().to_string()),
        "{err}"
    );
}

#[test]
fn linux_accounts_are_users_or_system() {
    let dir = Scratch::new();
    std::fs::create_dir_all(dir.0.join("etc")).unwrap();
    std::fs::write(
        dir.0.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\n\
         daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n\
         alice:x:1000:1000::/home/alice:/bin/bash\n",
    )
    .unwrap();
    let r = OwnerResolver::linux(&dir.0);
    assert!(!r.is_android());
    assert_eq!(who(&r, 0), w("root", &[], "system", true));
    assert_eq!(who(&r, 1000), w("alice", &[], "user", false));
    assert_eq!(who(&r, 1), w("daemon", &[], "system", true));
    let stranger = r.resolve(1_010_123);
    assert_eq!(
        (
            stranger.user,
            stranger.app_id,
            stranger.owner.as_str(),
            stranger.origin.as_str()
        ),
        (10, 10123, "uid 1010123", "unknown")
    );
    assert!(!stranger.firmware);
    assert_eq!(who(&r, KERNEL_UID), w("kernel", &[], "system", true));
    let known: Vec<u32> = r.known_owners().iter().map(|o| o.uid).collect();
    assert_eq!(known, [0, 1, 1000]);
}

#[test]
fn users_come_from_the_layout_and_absurd_ones_are_ignored() {
    let dir = Scratch::device("android9");
    for user in ["11", "99999", "not-a-user"] {
        std::fs::create_dir_all(dir.0.join("data/user").join(user)).unwrap();
    }
    let r = OwnerResolver::new(Some(&dir.0)).unwrap();
    let users: BTreeSet<u32> = r.known_owners().iter().map(|o| o.user).collect();
    assert_eq!(users, BTreeSet::from([0, 11]));
    assert_eq!(r.resolve(1_110_123).owner, "com.example.shared");
}

#[test]
fn partitions_come_from_the_executable_or_the_package_code() {
    let r = device("android14");
    // A native daemon: its executable's partition.
    assert_eq!(
        r.partition(0, Some("/system/bin/netd"), None),
        Some("system")
    );
    assert_eq!(
        r.partition(1000, Some("/vendor/bin/hw/android.hardware.wifi"), None),
        Some("vendor")
    );
    assert_eq!(
        r.partition(1073, Some("/apex/com.android.tethering/bin/x"), None),
        Some("apex")
    );
    // An app process: the package its command line names, in a shared uid.
    let zygote = Some("/system/bin/app_process64");
    assert_eq!(
        r.partition(1000, zygote, Some("com.android.settings")),
        Some("system_ext")
    );
    assert_eq!(r.partition(1000, zygote, Some("system_server")), None);
    assert_eq!(
        r.partition(10057, zygote, Some("com.google.android.gms:persistent")),
        Some("product")
    );
    // No sender known: the uid's packages, when they agree.
    assert_eq!(r.partition(10057, None, None), Some("product"));
    assert_eq!(r.partition(10123, None, None), Some("data"));
    assert_eq!(r.partition(1000, None, None), None, "system and system_ext");
    // A Linux host's executables are on none of them.
    let linux = OwnerResolver::new(None).unwrap();
    assert_eq!(linux.partition(1000, Some("/usr/bin/curl"), None), None);
}
