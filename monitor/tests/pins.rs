//! Pins egressmon can trust (issue 12, item 4): a pin directory only root
//! controls, adopted maps checked before the agent reads them, and `detach`
//! removing only what egressmon made. Run as root on the real kernel.

mod support;

use egressmon::bpf::hooks::Hook;
use egressmon::bpf_sys::{
    RawMap, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
};
use monitor_common::{PIN_LAYOUT_VERSION, TC_FILTER_SLOTS};
use std::os::fd::AsFd;
use std::path::Path;
use support::pins::{detach, entries, plant, run_refused, BpfPath, MapShape};
use support::*;

/// The shape of egressmon's FLOWS with 1024 entries, but `value_size`.
fn flows_shape(value_size: u32) -> MapShape {
    (BPF_MAP_TYPE_LRU_HASH, 24, value_size, 1024)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn attached(cgroup: &Path, hook: Hook) -> Vec<u32> {
    let dir = std::fs::File::open(cgroup).unwrap();
    egressmon::bpf_sys::prog_query(dir.as_fd(), hook.attach_type())
        .unwrap()
        .prog_ids
}

#[test]
fn symlinked_pin_dir_is_refused() {
    require_root();
    let tag = tag("pin-link");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let real = BpfPath::dir(&format!("{tag}-real"), 0o700, 0);
    let link = BpfPath::symlink(&tag, &real.path);

    let err = run_refused(&cgroup.path, &link.path, &[]);
    assert!(
        err.contains(&format!(
            "pin directory {}: is a symbolic link",
            link.path.display()
        )),
        "{err}"
    );
    // Below a link: the parent is not the real path.
    let below = link.path.join("egressmon");
    let err = run_refused(&cgroup.path, &below, &[]);
    assert!(
        err.contains("is reached through a symbolic link") && err.contains("--pin-dir"),
        "{err}"
    );
    let out = detach(&link.path);
    assert!(!out.status.success(), "detach followed the link");
    assert!(
        stderr(&out).contains("is a symbolic link"),
        "{}",
        stderr(&out)
    );
    assert!(real.entries().is_empty(), "nothing pinned through the link");
    assert!(
        std::fs::symlink_metadata(&link.path).is_ok(),
        "the link is left"
    );
}

#[test]
fn pin_dir_owned_by_another_uid_is_refused() {
    require_root();
    let tag = tag("pin-owner");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dir = BpfPath::dir(&tag, 0o700, 65534);

    let err = run_refused(&cgroup.path, &dir.path, &[]);
    assert!(
        err.contains(&format!(
            "pin directory {}: is owned by uid 65534, not root",
            dir.path.display()
        )) && err.contains("remove it"),
        "{err}"
    );
    let out = detach(&dir.path);
    assert!(
        !out.status.success() && stderr(&out).contains("is owned by uid 65534"),
        "{}",
        stderr(&out)
    );
    assert!(dir.entries().is_empty(), "nothing pinned in it");
}

#[test]
fn group_or_other_writable_pin_dir_is_refused() {
    require_root();
    for mode in [0o770, 0o707] {
        let tag = tag("pin-mode");
        let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
        let dir = BpfPath::dir(&tag, mode, 0);

        let err = run_refused(&cgroup.path, &dir.path, &[]);
        assert!(
            err.contains(&format!(
                "pin directory {}: is writable by group or others (mode {mode:03o})",
                dir.path.display()
            )) && err.contains("chmod 700"),
            "{err}"
        );
        assert!(dir.entries().is_empty(), "nothing pinned in it");
    }
}

#[test]
fn planted_map_with_a_wrong_value_size_is_refused() {
    require_root();
    let tag = tag("pin-planted");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let plants = [
        // An egressmon whose flow values were 48 bytes.
        (flows_shape(48), "value size 48, expected 80"),
        // A plain hash map of 8-byte values.
        (
            (BPF_MAP_TYPE_HASH, 24, 8, 1024),
            "type 1, expected 9, value size 8, expected 80",
        ),
    ];
    for (shape, difference) in plants {
        let dir = BpfPath::dir(&tag, 0o700, 0);
        dir.plant("FLOWS", "FLOWS", shape);

        let err = run_refused(&cgroup.path, &dir.path, &["--flow-entries", "1024"]);
        let detach_hint = format!("egressmon detach --pin-dir {}", dir.path.display());
        assert!(
            err.contains(&format!(
                "{}/FLOWS is not a map this egressmon can use",
                dir.path.display()
            )) && err.contains(difference)
                && err.contains(&detach_hint),
            "{err}"
        );
        assert_eq!(dir.entries(), ["FLOWS"], "refused before anything was made");
        // What the error says to do works: the planted FLOWS goes.
        let out = detach(&dir.path);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(!dir.path.exists(), "pin directory removed");
    }
}

#[test]
fn pins_of_another_layout_version_are_refused() {
    require_root();
    let tag = tag("pin-layout");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let dir = BpfPath::dir(&tag, 0o700, 0);
    let version = dir.plant(
        "LAYOUT_VERSION",
        "LAYOUT_VERSION",
        (BPF_MAP_TYPE_ARRAY, 4, 4, 1),
    );
    let skewed = PIN_LAYOUT_VERSION + 1;
    RawMap::from_fd(version)
        .unwrap()
        .update(&0u32.to_ne_bytes(), &skewed.to_ne_bytes(), 0)
        .unwrap();

    let err = run_refused(&cgroup.path, &dir.path, &[]);
    assert!(
        err.contains(&format!(
            "have pin layout {skewed}, this egressmon uses layout {PIN_LAYOUT_VERSION}"
        )) && err.contains(&format!(
            "egressmon detach --pin-dir {}",
            dir.path.display()
        )),
        "{err}"
    );
    let out = detach(&dir.path);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!dir.path.exists());
}

#[test]
fn restart_adopts_only_maps_of_the_same_size() {
    require_root();
    let tag = tag("pin-sizes");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let sized = ["--hooks", "connect4", "--flow-entries", "4096"];
    let mut agent = AgentProc::start(&cgroup.path, &tag, &sized);
    assert!(
        agent.pin_dir.join("LAYOUT_VERSION").exists(),
        "layout recorded"
    );
    agent.kill();

    let err = run_refused(
        &cgroup.path,
        &agent.pin_dir,
        &["--hooks", "connect4", "--flow-entries", "8192"],
    );
    assert!(
        err.contains("FLOWS was made for 4096 max entries, this run asks for 8192")
            && err.contains("start with --flow-entries 4096")
            && err.contains(&format!(
                "egressmon detach --pin-dir {}",
                agent.pin_dir.display()
            )),
        "{err}"
    );
    // The same options adopt the same maps and links.
    agent.spawn(&cgroup.path, &sized);
    assert_eq!(attached(&cgroup.path, Hook::Connect4).len(), 1);
    agent.detach();
    assert!(!agent.pin_dir.exists());
}

#[test]
fn detach_leaves_foreign_pins_and_run_refuses_them() {
    require_root();
    let tag = tag("pin-foreign");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let mut agent = AgentProc::start(&cgroup.path, &tag, &["--hooks", "connect4,skb_egress"]);
    let dir = BpfPath::new(&tag);
    // Foreign by name, and by kind: a map where egressmon pins a tc link.
    dir.plant(
        "netd_like_map",
        "netd_like_map",
        (BPF_MAP_TYPE_HASH, 4, 4, 1),
    );
    dir.plant("link_tc_egress_fake0", "fake", (BPF_MAP_TYPE_HASH, 4, 4, 1));
    let foreign = ["link_tc_egress_fake0", "netd_like_map"];

    agent.detach();
    assert_eq!(dir.entries(), foreign, "only the foreign pins are left");
    assert!(attached(&cgroup.path, Hook::Connect4).is_empty());
    assert!(attached(&cgroup.path, Hook::SkbEgress).is_empty());

    let err = run_refused(&cgroup.path, &dir.path, &[]);
    assert!(
        err.contains(&format!(
            "--pin-dir {} holds pins egressmon did not make (link_tc_egress_fake0, netd_like_map)",
            dir.path.display()
        )),
        "{err}"
    );
    assert_eq!(dir.entries(), foreign, "run left them too");
}

#[test]
fn detach_on_a_bpffs_root_removes_only_ours() {
    require_root();
    let tag = tag("pin-root");
    let root = BpfPath::mount(&tag);
    let before = root.entries();
    root.plant("FLOWS", "FLOWS", flows_shape(80));
    root.plant(
        "TC_FILTERS",
        "TC_FILTERS",
        (BPF_MAP_TYPE_ARRAY, 4, 16, TC_FILTER_SLOTS),
    );
    root.plant(
        "netd_like_map",
        "netd_like_map",
        (BPF_MAP_TYPE_HASH, 4, 4, 1),
    );
    // One of egressmon's names, but not root's pin: someone else's.
    root.plant("STATS", "STATS", (BPF_MAP_TYPE_PERCPU_ARRAY, 4, 8, 8));
    std::os::unix::fs::chown(root.path.join("STATS"), Some(65534), None).unwrap();

    let out = detach(&root.path);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut left = before.clone();
    left.extend(["STATS".into(), "netd_like_map".into()]);
    left.sort();
    assert_eq!(root.entries(), left, "ours removed, the rest left");
    assert!(root.path.is_dir(), "the mount root is left");
}

#[test]
fn detach_of_sys_fs_bpf_leaves_what_is_not_ours() {
    require_root();
    let sys_fs_bpf = Path::new("/sys/fs/bpf");
    let tag = tag("pin-sysfs");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let err = run_refused(&cgroup.path, sys_fs_bpf, &[]);
    assert!(
        err.contains("/sys/fs/bpf is the root of a bpffs mount")
            && err.contains("--pin-dir /sys/fs/bpf/egressmon"),
        "{err}"
    );
    let planted = BpfPath::new(&tag);
    plant(&planted.path, "foreign", (BPF_MAP_TYPE_HASH, 4, 4, 1));
    let debug_files: Vec<String> = entries(sys_fs_bpf)
        .into_iter()
        .filter(|n| n.ends_with(".debug"))
        .collect();

    // bpffs roots are sticky: detach may look there, for root's own pins.
    let out = detach(sys_fs_bpf);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(planted.path.exists(), "a foreign pin was removed");
    let now = entries(sys_fs_bpf);
    assert!(debug_files.iter().all(|f| now.contains(f)), "{now:?}");
    assert!(sys_fs_bpf.is_dir());
}

/// `flows`, `top` and `status` take `--pin-dir` and check that the agent
/// they reach uses those pins; without it they ask whatever agent answers.
#[test]
fn clients_check_the_pin_dir_they_are_given() {
    require_root();
    let tag = tag("pin-clients");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let mut agent = AgentProc::start(&cgroup.path, &tag, &["--hooks", "connect4"]);
    let ours = agent.pin_dir.to_str().unwrap().to_string();
    for command in ["flows", "status"] {
        agent.cli(&[command]);
        agent.cli(&[command, "--pin-dir", &ours]);
        let out = agent
            .command()
            .args([command, "--pin-dir", "/sys/fs/bpf/not-this-agent"])
            .args(["--listen", &agent.listen])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(!out.status.success(), "{command}: {err}");
        assert!(
            err.contains(&format!(
                "uses the pins under {ours}, not /sys/fs/bpf/not-this-agent"
            )),
            "{command}: {err}"
        );
    }
    agent.detach();
}
