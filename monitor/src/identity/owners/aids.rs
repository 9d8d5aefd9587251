//! Android uid arithmetic and the platform's fixed ids: what an app id means
//! before any file on the device is read.
//!
//! Source of the numbers and names: AOSP system/core,
//! libcutils/include/private/android_filesystem_config.h (the main branch as
//! mirrored in 2026, with AID_AOAD 1103 as its last platform AID; read in the
//! LineageOS/android_system_core mirror). The build turns every
//! `#define AID_<NAME>` into the passwd name `<name>` (lowercased), except
//! AID_MEDIA_CODEC, AID_MEDIA_EX and AID_MEDIA_DRM, which are named
//! `mediacodec`, `mediaex` and `mediadrm`, and except AID_UNUSED1/2, which
//! get no name at all. Range names (`oem_2901`, `u0_a123`, `u0_i1`,
//! `all_a4545`, `u0_a12_cache`, ...) follow bionic's getpwuid/getgrgid, as
//! bionic/tests/grp_pwd_test.cpp checks them.

/// uid = user * AID_USER_OFFSET + app id.
pub(crate) const USER_OFFSET: u32 = 100_000;
pub(crate) const APP_START: u32 = 10_000;
pub(crate) const APP_END: u32 = 19_999;
pub(crate) const SDK_SANDBOX_START: u32 = 20_000;
pub(crate) const SDK_SANDBOX_END: u32 = 29_999;
/// On current releases the isolated range starts at 90000 (90000-98999 was
/// first carved out for app-zygote isolated processes); releases before that
/// used 99000-99999 only.
pub(crate) const ISOLATED_START: u32 = 90_000;
pub(crate) const ISOLATED_OLD_START: u32 = 99_000;
pub(crate) const ISOLATED_END: u32 = 99_999;
pub(crate) const OVERFLOW_UID: u32 = 65_534;

/// Every platform AID with the name Android gives it.
pub(crate) const AIDS: &[(u32, &str)] = &[
    (0, "root"),
    // 1-3 exist for tests such as LTP; they are named all the same.
    (1, "daemon"),
    (2, "bin"),
    (3, "sys"),
    (1000, "system"),
    (1001, "radio"),
    (1002, "bluetooth"),
    (1003, "graphics"),
    (1004, "input"),
    (1005, "audio"),
    (1006, "camera"),
    (1007, "log"),
    (1008, "compass"),
    (1009, "mount"),
    (1010, "wifi"),
    (1011, "adb"),
    (1012, "install"),
    (1013, "media"),
    (1014, "dhcp"),
    (1015, "sdcard_rw"),
    (1016, "vpn"),
    (1017, "keystore"),
    (1018, "usb"),
    (1019, "drm"),
    (1020, "mdnsr"),
    (1021, "gps"),
    // 1022 (AID_UNUSED1) is deprecated and has no name.
    (1023, "media_rw"),
    (1024, "mtp"),
    // 1025 (AID_UNUSED2) is deprecated and has no name.
    (1026, "drmrpc"),
    (1027, "nfc"),
    (1028, "sdcard_r"),
    (1029, "clat"),
    (1030, "loop_radio"),
    (1031, "mediadrm"),
    (1032, "package_info"),
    (1033, "sdcard_pics"),
    (1034, "sdcard_av"),
    (1035, "sdcard_all"),
    (1036, "logd"),
    (1037, "shared_relro"),
    (1038, "dbus"),
    (1039, "tlsdate"),
    (1040, "mediaex"),
    (1041, "audioserver"),
    (1042, "metrics_coll"),
    (1043, "metricsd"),
    (1044, "webserv"),
    (1045, "debuggerd"),
    (1046, "mediacodec"),
    (1047, "cameraserver"),
    (1048, "firewall"),
    (1049, "trunks"),
    (1050, "nvram"),
    (1051, "dns"),
    (1052, "dns_tether"),
    (1053, "webview_zygote"),
    (1054, "vehicle_network"),
    (1055, "media_audio"),
    (1056, "media_video"),
    (1057, "media_image"),
    (1058, "tombstoned"),
    (1059, "media_obb"),
    (1060, "ese"),
    (1061, "ota_update"),
    (1062, "automotive_evs"),
    (1063, "lowpan"),
    (1064, "hsm"),
    (1065, "reserved_disk"),
    (1066, "statsd"),
    (1067, "incidentd"),
    (1068, "secure_element"),
    (1069, "lmkd"),
    (1070, "llkd"),
    (1071, "iorapd"),
    (1072, "gpu_service"),
    (1073, "network_stack"),
    (1074, "gsid"),
    (1075, "fsverity_cert"),
    (1076, "credstore"),
    (1077, "external_storage"),
    (1078, "ext_data_rw"),
    (1079, "ext_obb_rw"),
    (1080, "context_hub"),
    (1081, "virtualizationservice"),
    (1082, "artd"),
    (1083, "uwb"),
    (1084, "thread_network"),
    (1085, "diced"),
    (1086, "dmesgd"),
    (1087, "jc_weaver"),
    (1088, "jc_strongbox"),
    (1089, "jc_identitycred"),
    (1090, "sdk_sandbox"),
    (1091, "security_log_writer"),
    (1092, "prng_seeder"),
    (1093, "uprobestats"),
    (1094, "cros_ec"),
    (1095, "mmd"),
    (1096, "update_engine_log"),
    (1097, "ap_firmware"),
    (1098, "pmgd"),
    (1099, "sdv_sd_agent"),
    (1100, "sdv_dt_agent"),
    (1101, "sdv_rpc_agent"),
    (1102, "sdv_init_open_dice"),
    (1103, "aoad"),
    (2000, "shell"),
    (2001, "cache"),
    (2002, "diag"),
    // The 3000 series are supplementary groups the kernel knows about; they
    // are named because a socket can still end up owned by one.
    (3001, "net_bt_admin"),
    (3002, "net_bt"),
    (3003, "inet"),
    (3004, "net_raw"),
    (3005, "net_admin"),
    (3006, "net_bw_stats"),
    (3007, "net_bw_acct"),
    (3009, "readproc"),
    (3010, "wakelock"),
    (3011, "uhid"),
    (3012, "readtracefs"),
    (3013, "virtualmachine"),
    (9997, "everybody"),
    (9998, "misc"),
    (9999, "nobody"),
    // Not an Android id: the kernel reports it for a uid that has no mapping
    // in the current user namespace (AID_OVERFLOWUID).
    (OVERFLOW_UID, "overflowuid"),
];

/// Ranges below 10000 that belong to partitions rather than to the platform
/// table. Their names come from the partition's own passwd file
/// (`/vendor/etc/passwd`, ...); the OEM ranges also have the automatic names
/// `oem_<n>`.
pub(crate) const RESERVED_RANGES: &[(u32, u32, Reserved)] = &[
    (2900, 2999, Reserved::Oem),
    (5000, 5999, Reserved::Oem),
    (6000, 6499, Reserved::System),
    (6500, 6999, Reserved::Odm),
    (7000, 7499, Reserved::Product),
    (7500, 7999, Reserved::SystemExt),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reserved {
    /// Vendor partition, historically called OEM.
    Oem,
    System,
    Odm,
    Product,
    SystemExt,
}

impl Reserved {
    fn prefix(self) -> &'static str {
        match self {
            Reserved::Oem => "oem",
            Reserved::System => "system_reserved",
            Reserved::Odm => "odm_reserved",
            Reserved::Product => "product_reserved",
            Reserved::SystemExt => "system_ext_reserved",
        }
    }
}

/// What an app id (uid % 100000) is, from its number alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AppIdClass {
    /// A platform AID from [`AIDS`] (below 10000).
    Fixed(&'static str),
    /// A partition's reserved range.
    Reserved(Reserved),
    /// Below 10000 but named nowhere in the platform table.
    UnnamedPlatform,
    /// 10000-19999: an installed package (or several sharing the uid).
    App,
    /// 20000-29999: the SDK sandbox process of app `10000 + n` (as a gid the
    /// same number marks that app's cache files).
    SdkSandbox { app_id: u32 },
    /// 30000-39999: external-storage gids (`u0_a<n>_ext`); on the newest
    /// releases also the uids of Private Compute Core component processes.
    ExtGid { n: u32 },
    /// 40000-49999: external cache gids (`u0_a<n>_ext_cache`).
    ExtCacheGid { n: u32 },
    /// 50000-59999: the gid app `10000 + n` shares across users (`all_a<n>`).
    SharedGid { app_id: u32 },
    /// 65534: the kernel's overflow uid.
    Overflow,
    /// 90000-98999: isolated processes (started through an app zygote
    /// on releases that split the range).
    Isolated { n: u32 },
    /// 99000-99999: isolated processes on every release.
    IsolatedLegacy { n: u32 },
    /// Anything else (60000-89999 apart from 65534).
    Unassigned,
}

pub(crate) fn split(uid: u32) -> (u32, u32) {
    (uid / USER_OFFSET, uid % USER_OFFSET)
}

pub(crate) fn aid_name(app_id: u32) -> Option<&'static str> {
    AIDS.binary_search_by_key(&app_id, |(id, _)| *id)
        .ok()
        .map(|i| AIDS[i].1)
}

pub(crate) fn classify(app_id: u32) -> AppIdClass {
    if let Some(name) = aid_name(app_id) {
        return if app_id == OVERFLOW_UID {
            AppIdClass::Overflow
        } else {
            AppIdClass::Fixed(name)
        };
    }
    if let Some((_, _, r)) = RESERVED_RANGES
        .iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&app_id))
    {
        return AppIdClass::Reserved(*r);
    }
    match app_id {
        0..APP_START => AppIdClass::UnnamedPlatform,
        APP_START..=APP_END => AppIdClass::App,
        SDK_SANDBOX_START..=SDK_SANDBOX_END => AppIdClass::SdkSandbox {
            app_id: app_id - SDK_SANDBOX_START + APP_START,
        },
        30_000..=39_999 => AppIdClass::ExtGid { n: app_id - 30_000 },
        40_000..=49_999 => AppIdClass::ExtCacheGid { n: app_id - 40_000 },
        50_000..=59_999 => AppIdClass::SharedGid {
            app_id: app_id - 50_000 + APP_START,
        },
        ISOLATED_START..ISOLATED_OLD_START => AppIdClass::Isolated {
            n: app_id - ISOLATED_START,
        },
        ISOLATED_OLD_START..=ISOLATED_END => AppIdClass::IsolatedLegacy {
            n: app_id - ISOLATED_START,
        },
        _ => AppIdClass::Unassigned,
    }
}

/// The name a reserved-range id gets when no partition passwd names it.
pub(crate) fn reserved_name(r: Reserved, app_id: u32) -> String {
    format!("{}_{app_id}", r.prefix())
}

/// bionic's name for a uid no table names: `u<user>_a<n>` for apps,
/// `u<user>_i<n>` for isolated processes, `u<user>_<app id>` otherwise.
pub(crate) fn generic_name(uid: u32) -> String {
    let (user, app_id) = split(uid);
    match classify(app_id) {
        AppIdClass::App => format!("u{user}_a{}", app_id - APP_START),
        AppIdClass::Isolated { n } | AppIdClass::IsolatedLegacy { n } => {
            format!("u{user}_i{n}")
        }
        AppIdClass::ExtGid { n } => format!("u{user}_a{n}_ext"),
        AppIdClass::ExtCacheGid { n } => format!("u{user}_a{n}_ext_cache"),
        AppIdClass::SharedGid { app_id } => format!("all_a{}", app_id - APP_START),
        _ => format!("u{user}_{app_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_and_complete_for_the_contract_names() {
        assert!(AIDS.windows(2).all(|w| w[0].0 < w[1].0), "AIDS sorted");
        for (id, name) in [
            (0, "root"),
            (1000, "system"),
            (1001, "radio"),
            (1002, "bluetooth"),
            (1003, "graphics"),
            (1004, "input"),
            (1005, "audio"),
            (1006, "camera"),
            (1007, "log"),
            (1008, "compass"),
            (1009, "mount"),
            (1010, "wifi"),
            (1011, "adb"),
            (1012, "install"),
            (1013, "media"),
            (1014, "dhcp"),
            (1015, "sdcard_rw"),
            (1016, "vpn"),
            (1017, "keystore"),
            (1018, "usb"),
            (1019, "drm"),
            (1020, "mdnsr"),
            (1021, "gps"),
            (1023, "media_rw"),
            (1024, "mtp"),
            (1027, "nfc"),
            (1029, "clat"),
            (1046, "mediacodec"),
            (1051, "dns"),
            (1052, "dns_tether"),
            (1073, "network_stack"),
            (2000, "shell"),
            (2001, "cache"),
            (2002, "diag"),
            (3001, "net_bt_admin"),
            (3002, "net_bt"),
            (3003, "inet"),
            (3004, "net_raw"),
            (3005, "net_admin"),
            (9999, "nobody"),
        ] {
            assert_eq!(aid_name(id), Some(name), "AID {id}");
        }
        assert_eq!(aid_name(1022), None, "AID_UNUSED1 has no name");
        assert_eq!(aid_name(1104), None);
    }

    #[test]
    fn ranges_classify() {
        assert_eq!(classify(1001), AppIdClass::Fixed("radio"));
        assert_eq!(classify(2900), AppIdClass::Reserved(Reserved::Oem));
        assert_eq!(classify(5999), AppIdClass::Reserved(Reserved::Oem));
        assert_eq!(classify(6000), AppIdClass::Reserved(Reserved::System));
        assert_eq!(classify(6999), AppIdClass::Reserved(Reserved::Odm));
        assert_eq!(classify(7000), AppIdClass::Reserved(Reserved::Product));
        assert_eq!(classify(7999), AppIdClass::Reserved(Reserved::SystemExt));
        assert_eq!(classify(8000), AppIdClass::UnnamedPlatform);
        assert_eq!(classify(10_000), AppIdClass::App);
        assert_eq!(classify(19_999), AppIdClass::App);
        assert_eq!(classify(20_123), AppIdClass::SdkSandbox { app_id: 10_123 });
        assert_eq!(classify(54_545), AppIdClass::SharedGid { app_id: 14_545 });
        assert_eq!(classify(65_534), AppIdClass::Overflow);
        assert_eq!(classify(90_000), AppIdClass::Isolated { n: 0 });
        assert_eq!(classify(98_999), AppIdClass::Isolated { n: 8_999 });
        assert_eq!(classify(99_000), AppIdClass::IsolatedLegacy { n: 9_000 });
        assert_eq!(classify(99_999), AppIdClass::IsolatedLegacy { n: 9_999 });
        assert_eq!(classify(70_000), AppIdClass::Unassigned);
    }

    #[test]
    fn generic_names_follow_bionic() {
        assert_eq!(generic_name(10_000), "u0_a0");
        assert_eq!(generic_name(111_234), "u1_a1234");
        assert_eq!(generic_name(90_001), "u0_i1");
        assert_eq!(generic_name(3_190_001), "u31_i1");
        assert_eq!(generic_name(54_545), "all_a4545");
        assert_eq!(generic_name(34_545), "u0_a4545_ext");
        assert_eq!(generic_name(44_545), "u0_a4545_ext_cache");
        assert_eq!(reserved_name(Reserved::Oem, 2945), "oem_2945");
    }
}
