//! egressmon's pin directory (`--pin-dir`): every name egressmon pins under
//! it, the checks the directory and its pins pass before they are used
//! (adoption), and their removal on `detach`. Nothing else joins a path
//! under the pin directory.
//!
//! Layout: one file per pinned map (`PINNED_MAPS`: `FLOWS`, `UID_TOTALS`,
//! `UID_DIRECT`, `EVENTS`, `PAYLOADS`, `STATS`, the capture's `CAPTURE`,
//! `CAPTURE_FILTER` and `CAPTURE_UIDS`, the block rules' `BLOCKS` and
//! `BLOCK_GEN`, the list of netlink tc filters
//! `TC_FILTERS` and the pin layout version `LAYOUT_VERSION`), one
//! per attached cgroup hook (`link_<hook>`), and one per tc hook and
//! interface on TCX kernels (`link_<hook>_<interface>`). Nothing else may be
//! in the directory: `run` refuses it, `detach` leaves it.
//!
//! The directory itself is one only root controls: a real directory (never
//! reached through a symbolic link), owned by root, and for `run` not
//! writable by group or others. Pins hold every app's counters and the
//! programs' links: a directory someone else controls could feed the agent
//! planted maps or take egressmon's pins away.

use crate::bpf::hooks::Hook;
use crate::bpf::kernel::LoadOptions;
use crate::bpf::system;
use crate::bpf_sys::{self, MapInfo, ObjKind, RawMap};
use anyhow::{bail, Context, Result};
use aya::Ebpf;
use monitor_common::*;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// What every link pin's name starts with.
const LINK_PREFIX: &str = "link_";

/// The pin directory of one agent (`--pin-dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PinDir {
    path: PathBuf,
}

impl PinDir {
    pub(crate) fn new(path: &Path) -> PinDir {
        PinDir {
            path: path.to_path_buf(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Where map `name` (one of `PINNED_MAPS`) is pinned.
    pub(crate) fn map(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Where the link of cgroup hook `hook` is pinned.
    pub(crate) fn link(&self, hook: Hook) -> PathBuf {
        self.path.join(format!("{LINK_PREFIX}{}", hook.name()))
    }

    /// Where the TCX link of tc hook `hook` on interface `iface` is pinned.
    pub(crate) fn tc_link(&self, hook: Hook, iface: &str) -> PathBuf {
        self.path
            .join(format!("{LINK_PREFIX}{}_{iface}", hook.name()))
    }

    /// The names in the directory (none when it cannot be listed).
    fn names(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut names: Vec<(String, PathBuf)> = entries
            .filter_map(Result::ok)
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        names.sort();
        names
    }

    /// The TCX link pins: hook, interface name, path.
    pub(crate) fn tc_links(&self) -> Vec<(Hook, String, PathBuf)> {
        self.names()
            .into_iter()
            .filter_map(|(name, path)| {
                let (hook, iface) = parse_tc_link(&name)?;
                Some((hook, iface.to_string(), path))
            })
            .collect()
    }

    /// The links pinned for `hook`: its cgroup link, or its TCX links on
    /// every interface.
    pub(crate) fn links_of(&self, hook: Hook) -> Vec<PathBuf> {
        let prefix = format!("{LINK_PREFIX}{}", hook.name());
        self.names()
            .into_iter()
            .filter(|(name, _)| {
                name == prefix.as_str() || (hook.is_tc() && name.starts_with(&format!("{prefix}_")))
            })
            .map(|(_, path)| path)
            .collect()
    }

    /// Whether the directory holds egressmon pins (maps or links).
    pub(crate) fn has_pins(&self) -> bool {
        self.map(MAP_FLOWS).exists()
            || self
                .names()
                .iter()
                .any(|(name, _)| name.starts_with(LINK_PREFIX))
    }

    /// The kernel ids of the maps the programs use, as pinned here: a
    /// program that uses one of them is egressmon's.
    pub(crate) fn program_map_ids(&self) -> Vec<u32> {
        PINNED_MAPS
            .iter()
            .filter(|&&name| name != MAP_TC_FILTERS && name != MAP_LAYOUT_VERSION)
            .filter_map(|name| bpf_sys::obj_get(&self.map(name)).ok())
            .filter_map(|fd| bpf_sys::map_info(fd.as_fd()).ok())
            .map(|info| info.id)
            .collect()
    }

    /// Makes sure the directory is one only root controls on a mounted
    /// bpffs, mounting /sys/fs/bpf (root only) if needed and creating the
    /// directory (0700) if missing.
    pub(crate) fn prepare(&self) -> Result<()> {
        system::prepare_bpffs_for(&self.path)?;
        self.create()?;
        self.check(PinDirUse::Run)
    }

    /// Creates the directory with mode 0700 if it is missing. Only the last
    /// component is ever created: its parent is on bpffs already.
    fn create(&self) -> Result<()> {
        let pin_dir = &self.path;
        match std::fs::DirBuilder::new().mode(0o700).create(pin_dir) {
            // The umask may have taken bits away: exactly 0700, on the
            // directory just made (never through a link).
            Ok(()) => open_dir_no_follow(pin_dir)?
                .set_permissions(std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {} to root", pin_dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => {
                Err(e).with_context(|| format!("creating pin directory {}", pin_dir.display()))
            }
        }
    }

    /// Checks that the directory is a real directory (lstat: a symbolic
    /// link is refused, never followed), owned by root and, for `run`, not
    /// writable by group or others; the error says what is wrong and what
    /// to do.
    fn check(&self, used_for: PinDirUse) -> Result<()> {
        let pin_dir = &self.path;
        let meta = std::fs::symlink_metadata(pin_dir)
            .with_context(|| format!("checking pin directory {}", pin_dir.display()))?;
        match pin_dir_problem(meta.mode(), meta.uid(), used_for) {
            Some(problem) => bail!("pin directory {}: {problem}", pin_dir.display()),
            None => Ok(()),
        }
    }

    /// Sorts the entries of the directory. A pin is egressmon's when its
    /// name is one egressmon makes, it is a pin (a regular bpffs file, never
    /// followed through a symbolic link) that root made, and it holds the
    /// kind of object of that name.
    fn contents(&self) -> Result<PinDirContents> {
        let pin_dir = &self.path;
        let mut contents = PinDirContents::default();
        let entries =
            std::fs::read_dir(pin_dir).with_context(|| format!("listing {}", pin_dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", pin_dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // lstat: a link is not followed; egressmon's pins are root's.
            let is_pin = entry.metadata().is_ok_and(|m| m.is_file() && m.uid() == 0);
            let ours = kind_of_our_pin(&name)
                .filter(|&kind| is_pin && holds_our_object(&entry.path(), &name, kind));
            match ours {
                Some(ObjKind::Map) => contents.maps.push(name),
                Some(_) => contents.links.push(name),
                None => contents.foreign.push(name),
            }
        }
        contents.maps.sort();
        contents.links.sort();
        contents.foreign.sort();
        Ok(contents)
    }

    /// Before anything is loaded: refuses a pin directory that holds pins
    /// egressmon did not make, maps this build cannot use, or pins of
    /// another pin layout.
    pub(crate) fn check_adoptable(&self, options: &LoadOptions) -> Result<()> {
        let pin_dir = &self.path;
        let contents = self.contents()?;
        if !contents.foreign.is_empty() {
            bail!(
                "--pin-dir {} holds pins egressmon did not make ({}): egressmon keeps its pins in a \
                 directory of its own and never adopts or removes anyone else's; choose another \
                 --pin-dir, or remove those if nothing uses them",
                pin_dir.display(),
                contents.foreign.join(", ")
            );
        }
        for spec in pinned_map_specs(options) {
            if contents.maps.iter().any(|m| m == spec.name) {
                let pin = self.map(spec.name);
                let fd =
                    bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
                check_map(&spec, fd.as_fd(), pin_dir)?;
            }
        }
        self.check_layout_version()
    }

    /// The maps aya opened or made, checked by descriptor: what the agent
    /// will actually read (the pins could have changed since
    /// `check_adoptable` looked at them).
    pub(crate) fn check_loaded(&self, ebpf: &Ebpf, options: &LoadOptions) -> Result<()> {
        for spec in pinned_map_specs(options) {
            if spec.name == MAP_LAYOUT_VERSION {
                continue;
            }
            let map = ebpf
                .map(spec.name)
                .with_context(|| format!("{} map missing from the object", spec.name))?;
            let fd = crate::bpf::kernel::map_fd(map)
                .with_context(|| format!("{} has an unexpected kind", spec.name))?;
            check_map(&spec, fd, &self.path)?;
        }
        Ok(())
    }

    /// For `egressmon capture`: descriptors of the capture's pinned maps
    /// (`CAPTURE`, `CAPTURE_FILTER`, `CAPTURE_UIDS`), each checked by
    /// descriptor to be exactly the map this build makes, in a directory
    /// only root controls, under this pin layout.
    pub(crate) fn open_capture_maps(&self) -> Result<[OwnedFd; 3]> {
        self.check(PinDirUse::Run)?;
        self.check_layout_version()?;
        let open = |spec: &MapSpec| -> Result<OwnedFd> {
            let pin = self.map(spec.name);
            let fd =
                bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
            check_map(spec, fd.as_fd(), &self.path)?;
            Ok(fd)
        };
        let [ring, filter, uids] = capture_specs();
        Ok([open(&ring)?, open(&filter)?, open(&uids)?])
    }

    /// Refuses pins left by an egressmon of another pin layout. Pins from
    /// before the version was recorded are adopted when every map checks out.
    fn check_layout_version(&self) -> Result<()> {
        let pin = self.map(MAP_LAYOUT_VERSION);
        if std::fs::symlink_metadata(&pin).is_err() {
            return Ok(());
        }
        let fd = bpf_sys::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))?;
        check_map(&LAYOUT_VERSION_SPEC, fd.as_fd(), &self.path)?;
        let map = RawMap::from_fd(fd)?;
        let mut value = [0u8; 4];
        map.lookup(&0u32.to_ne_bytes(), &mut value)
            .with_context(|| format!("reading {}", pin.display()))?;
        let found = u32::from_ne_bytes(value);
        if found != PIN_LAYOUT_VERSION {
            bail!(
                "the pins under {dir} have pin layout {found}, this egressmon uses layout \
                 {PIN_LAYOUT_VERSION}: an egressmon of another version made them. Run `egressmon \
                 detach --pin-dir {dir}` to remove them (the counts in them are lost), then start \
                 again",
                dir = self.path.display()
            );
        }
        Ok(())
    }

    /// Pins the layout version beside the maps, unless it is there already.
    pub(crate) fn record_layout_version(&self) -> Result<()> {
        let pin = self.map(MAP_LAYOUT_VERSION);
        if std::fs::symlink_metadata(&pin).is_ok() {
            return Ok(());
        }
        let spec = LAYOUT_VERSION_SPEC;
        let map = bpf_sys::map_create(spec.map_type, 4, 4, 1, spec.name)
            .and_then(RawMap::from_fd)
            .context("creating the layout version map")?;
        map.update(&0u32.to_ne_bytes(), &PIN_LAYOUT_VERSION.to_ne_bytes(), 0)
            .context("writing the layout version")?;
        bpf_sys::obj_pin(map.fd(), &pin).with_context(|| format!("pinning {}", pin.display()))
    }

    /// Detaches egressmon's pinned links and netlink tc filters, removes its
    /// pins, and the directory if nothing else is in it. Never removes a pin
    /// egressmon did not make. Programs and maps are freed by the kernel
    /// once the last reference (pin, link or agent fd) is gone.
    pub(crate) fn detach(&self) -> Result<DetachReport> {
        let pin_dir = &self.path;
        let mut report = DetachReport::default();
        match std::fs::symlink_metadata(pin_dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
            other => other.with_context(|| format!("checking {}", pin_dir.display()))?,
        };
        self.check(PinDirUse::Detach)?;
        let contents = self.contents()?;
        for name in &contents.links {
            detach_link(&pin_dir.join(name));
            report
                .links
                .push(name.trim_start_matches(LINK_PREFIX).to_string());
        }
        if contents.maps.iter().any(|m| m == MAP_TC_FILTERS) && self.tc_filters_are_ours() {
            report.links.extend(crate::bpf::tc::remove_filters(self));
        }
        for name in contents.links.iter().chain(&contents.maps) {
            let pin = pin_dir.join(name);
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            report.pins.push(name.clone());
        }
        report.foreign = contents.foreign;
        if report.foreign.is_empty() && !system::is_mount_point(pin_dir) {
            std::fs::remove_dir(pin_dir)
                .with_context(|| format!("removing {}", pin_dir.display()))?;
            report.dir_removed = true;
        }
        Ok(report)
    }

    /// Whether `TC_FILTERS` is exactly egressmon's list: its entries name tc
    /// filters to delete, so a list of another layout is never acted on.
    fn tc_filters_are_ours(&self) -> bool {
        let pin = self.map(MAP_TC_FILTERS);
        let usable = bpf_sys::obj_get(&pin)
            .and_then(|fd| bpf_sys::map_info(fd.as_fd()))
            .is_ok_and(|info| map_differences(&TC_FILTERS_SPEC, &info).is_empty());
        if !usable {
            log::warn!(
                "{} is not egressmon's filter list: its filters are left",
                pin.display()
            );
        }
        usable
    }
}

/// The tc hook and interface name a TCX link pin is named after.
fn parse_tc_link(file_name: &str) -> Option<(Hook, &str)> {
    let rest = file_name.strip_prefix(LINK_PREFIX)?;
    Hook::ALL
        .iter()
        .copied()
        .filter(|h| h.is_tc())
        .find_map(|hook| {
            let name = rest.strip_prefix(hook.name())?.strip_prefix('_')?;
            (!name.is_empty()).then_some((hook, name))
        })
}

/// Detaches the link pinned at `pin` and removes the pin, quietly (it may
/// be gone already).
pub(crate) fn remove_link(pin: &Path) {
    if let Ok(fd) = bpf_sys::obj_get(pin) {
        let _ = bpf_sys::link_detach(fd.as_fd());
    }
    let _ = std::fs::remove_file(pin);
}

/// Detaches the link pinned at `pin`, for `detach` (which then removes the
/// pin).
fn detach_link(pin: &Path) {
    match bpf_sys::obj_get(pin) {
        Ok(fd) => {
            if let Err(e) = bpf_sys::link_detach(fd.as_fd()) {
                // Pre-5.9 kernels: removing the last reference detaches.
                log::debug!("BPF_LINK_DETACH {}: {e}", pin.display());
            }
        }
        Err(e) => log::warn!("opening {}: {e}", pin.display()),
    }
}

/// What `detach` did.
#[derive(Debug, Default)]
pub(crate) struct DetachReport {
    /// Hooks detached (`hook`, `hook_interface` or `hook/interface`).
    pub(crate) links: Vec<String>,
    /// egressmon's pins removed.
    pub(crate) pins: Vec<String>,
    /// Entries of the pin directory egressmon did not make, left in place.
    pub(crate) foreign: Vec<String>,
    /// Whether the directory itself was removed (never while something
    /// foreign is in it, never a mount point such as /sys/fs/bpf).
    pub(crate) dir_removed: bool,
}

/// The entries of a pin directory: egressmon's pins, and everything else.
#[derive(Debug, Default)]
struct PinDirContents {
    maps: Vec<String>,
    links: Vec<String>,
    foreign: Vec<String>,
}

fn open_dir_no_follow(dir: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .with_context(|| format!("opening {}", dir.display()))
}

/// What a pin directory is checked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinDirUse {
    /// Pinning and adopting maps: only root may add anything to it.
    Run,
    /// Removing root's own pins by name: others may add entries where the
    /// sticky bit keeps them from renaming or removing root's (as in
    /// /sys/fs/bpf itself); what they add is not root's, so it stays.
    Detach,
}

/// What is wrong with a pin directory of this lstat mode and owner, with
/// what to do about it.
fn pin_dir_problem(mode: u32, uid: u32, used_for: PinDirUse) -> Option<String> {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => {}
        libc::S_IFLNK => {
            return Some(
                "is a symbolic link: egressmon does not follow links for its pins (whoever made \
                 the link would choose where root's pins go); remove the link or pass the real \
                 directory in --pin-dir"
                    .into(),
            )
        }
        _ => return Some("is not a directory: remove it or choose another --pin-dir".into()),
    }
    if uid != 0 {
        return Some(format!(
            "is owned by uid {uid}, not root: its owner could plant maps for the agent or take \
             egressmon's pins away; remove it (egressmon makes it again, owned by root, mode \
             0700) or choose another --pin-dir"
        ));
    }
    let sticky_is_enough = used_for == PinDirUse::Detach && mode & libc::S_ISVTX != 0;
    if mode & system::GROUP_OR_OTHER_WRITE != 0 && !sticky_is_enough {
        return Some(format!(
            "is writable by group or others (mode {:03o}): they could plant maps for the agent \
             or take egressmon's pins away; `chmod 700` it or choose another --pin-dir",
            mode & 0o7777
        ));
    }
    None
}

/// How one pinned map must look for this build to use it: the agent reads
/// it with buffers sized from these (a planted or version-skewed map of
/// another value size would make the batched read overflow them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MapSpec {
    name: &'static str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    /// The `run` option that sets `max_entries`, if one does.
    option: Option<&'static str>,
}

impl MapSpec {
    const fn new(name: &'static str, map_type: u32, key: usize, value: usize, max: u32) -> Self {
        MapSpec {
            name,
            map_type,
            key_size: key as u32,
            value_size: value as u32,
            max_entries: max,
            option: None,
        }
    }

    const fn set_by(self, option: &'static str) -> Self {
        MapSpec {
            option: Some(option),
            ..self
        }
    }
}

const TC_FILTERS_SPEC: MapSpec = MapSpec::new(
    MAP_TC_FILTERS,
    bpf_sys::BPF_MAP_TYPE_ARRAY,
    4,
    size_of::<TcFilter>(),
    TC_FILTER_SLOTS,
);

const LAYOUT_VERSION_SPEC: MapSpec =
    MapSpec::new(MAP_LAYOUT_VERSION, bpf_sys::BPF_MAP_TYPE_ARRAY, 4, 4, 1);

/// Every map egressmon pins: the eBPF object's pinned maps and the layout
/// version. A map the object pins but this list lacks would be refused as
/// foreign when the next agent starts.
pub(crate) const PINNED_MAPS: [&str; 13] = [
    MAP_FLOWS,
    MAP_UID_TOTALS,
    MAP_UID_DIRECT,
    MAP_EVENTS,
    MAP_PAYLOADS,
    MAP_STATS,
    MAP_CAPTURE,
    MAP_CAPTURE_FILTER,
    MAP_CAPTURE_UIDS,
    MAP_BLOCKS,
    MAP_BLOCK_GEN,
    MAP_TC_FILTERS,
    MAP_LAYOUT_VERSION,
];

/// Every map egressmon pins (in the order of `PINNED_MAPS`), as this build
/// and `options` make it.
fn pinned_map_specs(options: &LoadOptions) -> [MapSpec; 13] {
    use bpf_sys::*;
    let flows = options.flow_entries;
    let ring = ring_bytes(options.ringbuf_bytes);
    let capture = capture_specs();
    [
        MapSpec::new(
            MAP_FLOWS,
            BPF_MAP_TYPE_LRU_HASH,
            size_of::<FlowKey>(),
            size_of::<FlowValue>(),
            flows,
        )
        .set_by("--flow-entries"),
        MapSpec::new(
            MAP_UID_TOTALS,
            BPF_MAP_TYPE_PERCPU_HASH,
            size_of::<UidKey>(),
            size_of::<UidTotals>(),
            options.uid_entries,
        )
        .set_by("--uid-entries"),
        MapSpec::new(
            MAP_UID_DIRECT,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            size_of::<u32>(),
            size_of::<UidTotals>(),
            DIRECT_UID_SLOTS,
        ),
        MapSpec::new(MAP_EVENTS, BPF_MAP_TYPE_RINGBUF, 0, 0, ring).set_by("--ringbuf-bytes"),
        MapSpec::new(
            MAP_PAYLOADS,
            BPF_MAP_TYPE_RINGBUF,
            0,
            0,
            ring_bytes(DEFAULT_PAYLOAD_RING_BYTES),
        ),
        MapSpec::new(
            MAP_STATS,
            BPF_MAP_TYPE_PERCPU_ARRAY,
            size_of::<u32>(),
            size_of::<u64>(),
            STAT_COUNT,
        ),
        capture[0],
        capture[1],
        capture[2],
        MapSpec::new(
            MAP_BLOCKS,
            BPF_MAP_TYPE_LPM_TRIE,
            size_of::<u32>() + size_of::<BlockKey>(),
            size_of::<BlockEntry>(),
            BLOCK_ENTRIES,
        ),
        MapSpec::new(
            MAP_BLOCK_GEN,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<u32>(),
            1,
        ),
        TC_FILTERS_SPEC,
        LAYOUT_VERSION_SPEC,
    ]
}

/// The capture's maps (sizes fixed by this build: `CAPTURE`,
/// `CAPTURE_FILTER`, `CAPTURE_UIDS`), checked again by `egressmon capture`
/// before it reads or writes them.
fn capture_specs() -> [MapSpec; 3] {
    use bpf_sys::*;
    [
        MapSpec::new(
            MAP_CAPTURE,
            BPF_MAP_TYPE_RINGBUF,
            0,
            0,
            ring_bytes(CAPTURE_RING_BYTES),
        ),
        MapSpec::new(
            MAP_CAPTURE_FILTER,
            BPF_MAP_TYPE_ARRAY,
            size_of::<u32>(),
            size_of::<CaptureFilter>(),
            1,
        ),
        MapSpec::new(
            MAP_CAPTURE_UIDS,
            BPF_MAP_TYPE_HASH,
            size_of::<u32>(),
            size_of::<u8>(),
            CAPTURE_UID_ENTRIES,
        ),
    ]
}

/// A ring buffer's size as aya makes it: a power-of-two number of pages.
pub(crate) fn ring_bytes(requested: u32) -> u32 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
    page * requested.div_ceil(page).next_power_of_two()
}

/// The first 15 bytes of `name`: all the kernel keeps of a map's name.
fn kernel_name(name: &str) -> &str {
    &name[..name.len().min(15)]
}

/// How `info` differs from `spec`, in words ("value size 8, expected 56").
fn map_differences(spec: &MapSpec, info: &MapInfo) -> Vec<String> {
    let mut differences = Vec::new();
    if info.name() != kernel_name(spec.name) {
        differences.push(format!("named {:?} in the kernel", info.name()));
    }
    let numbers = [
        ("type", info.map_type, spec.map_type),
        ("key size", info.key_size, spec.key_size),
        ("value size", info.value_size, spec.value_size),
        ("max entries", info.max_entries, spec.max_entries),
    ];
    for (what, found, expected) in numbers {
        if found != expected {
            differences.push(format!("{what} {found}, expected {expected}"));
        }
    }
    differences
}

/// Why the map pinned as `spec.name` under `pin_dir` must not be used, with
/// what to do; `None` when it is exactly the map this build makes.
fn adoption_problem(spec: &MapSpec, info: &MapInfo, pin_dir: &Path) -> Option<String> {
    let differences = map_differences(spec, info);
    if differences.is_empty() {
        return None;
    }
    let pin = pin_dir.join(spec.name);
    let dir = pin_dir.display();
    let only_size = differences.len() == 1 && info.max_entries != spec.max_entries;
    if let (true, Some(option)) = (only_size, spec.option) {
        return Some(format!(
            "{} was made for {pinned} max entries, this run asks for {}: start with {option} \
             {pinned} to keep counting into it, or run `egressmon detach --pin-dir {dir}` first \
             to resize it (the counts in it are lost)",
            pin.display(),
            spec.max_entries,
            pinned = info.max_entries,
        ));
    }
    Some(format!(
        "{} is not a map this egressmon can use ({}): an egressmon of another version left it \
         there, or something else put it there. Run `egressmon detach --pin-dir {dir}` to remove \
         egressmon's pins (the counts in them are lost), then start again",
        pin.display(),
        differences.join(", ")
    ))
}

fn check_map(spec: &MapSpec, fd: BorrowedFd<'_>, pin_dir: &Path) -> Result<()> {
    let info = bpf_sys::map_info(fd)
        .with_context(|| format!("checking {}", pin_dir.join(spec.name).display()))?;
    match adoption_problem(spec, &info, pin_dir) {
        Some(problem) => bail!(problem),
        None => Ok(()),
    }
}

/// What kind of object egressmon pins under `name`, if it pins anything
/// under that name: its maps (and the layout version), and links named
/// `link_<hook>`, or `link_<tc hook>_<interface>`.
fn kind_of_our_pin(name: &str) -> Option<ObjKind> {
    if PINNED_MAPS.contains(&name) {
        return Some(ObjKind::Map);
    }
    let hook = name.strip_prefix(LINK_PREFIX)?;
    let cgroup_link = Hook::ALL.iter().any(|h| !h.is_tc() && h.name() == hook);
    (cgroup_link || parse_tc_link(name).is_some()).then_some(ObjKind::Link)
}

/// Whether the pin at `path` holds what egressmon pins under that name:
/// a map that the kernel knows by the same name, or a link.
fn holds_our_object(path: &Path, name: &str, kind: ObjKind) -> bool {
    let Ok(fd) = bpf_sys::obj_get(path) else {
        return false;
    };
    match bpf_sys::obj_kind(fd.as_fd()) {
        Ok(ObjKind::Map) if kind == ObjKind::Map => {
            bpf_sys::map_info(fd.as_fd()).is_ok_and(|info| info.name() == kernel_name(name))
        }
        Ok(found) => found == kind,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(flow_entries: u32) -> LoadOptions {
        LoadOptions {
            cgroup: PathBuf::from("/sys/fs/cgroup"),
            pin_dir: PathBuf::from("/sys/fs/bpf/egressmon"),
            hooks: None,
            flow_entries,
            uid_entries: DEFAULT_UID_ENTRIES,
            ringbuf_bytes: DEFAULT_RINGBUF_BYTES,
            tc_ifaces: None,
        }
    }

    fn info_of(spec: &MapSpec) -> MapInfo {
        let mut info = MapInfo {
            map_type: spec.map_type,
            key_size: spec.key_size,
            value_size: spec.value_size,
            max_entries: spec.max_entries,
            ..Default::default()
        };
        let name = kernel_name(spec.name).as_bytes();
        info.name[..name.len()].copy_from_slice(name);
        info
    }

    fn flows_spec(flow_entries: u32) -> MapSpec {
        pinned_map_specs(&options(flow_entries))[0]
    }

    #[test]
    fn the_map_egressmon_makes_is_adopted() {
        let dir = Path::new("/sys/fs/bpf/egressmon");
        for spec in pinned_map_specs(&options(DEFAULT_FLOW_ENTRIES)) {
            assert_eq!(adoption_problem(&spec, &info_of(&spec), dir), None);
        }
    }

    #[test]
    fn a_flow_map_of_another_value_size_is_refused_with_detach() {
        let spec = flows_spec(1024);
        let planted = MapInfo {
            value_size: 48,
            ..info_of(&spec)
        };
        let problem = adoption_problem(&spec, &planted, Path::new("/p")).unwrap();
        assert!(
            problem.starts_with(
                "/p/FLOWS is not a map this egressmon can use (value size 48, expected 80)"
            ) && problem.contains("`egressmon detach --pin-dir /p`"),
            "{problem}"
        );
    }

    #[test]
    fn a_map_named_otherwise_in_the_kernel_is_not_ours() {
        let spec = flows_spec(1024);
        let mut other = info_of(&spec);
        other.name = *b"netd_map\0\0\0\0\0\0\0\0";
        let problem = adoption_problem(&spec, &other, Path::new("/p")).unwrap();
        assert!(
            problem.contains("(named \"netd_map\" in the kernel)"),
            "{problem}"
        );
    }

    #[test]
    fn another_size_names_the_option_that_sets_it() {
        let pinned = info_of(&flows_spec(4096));
        let problem = adoption_problem(&flows_spec(8192), &pinned, Path::new("/p")).unwrap();
        assert!(
            problem.starts_with("/p/FLOWS was made for 4096 max entries, this run asks for 8192")
                && problem.contains("start with --flow-entries 4096 to keep counting")
                && problem.contains("`egressmon detach --pin-dir /p`"),
            "{problem}"
        );
    }

    #[test]
    fn every_pinned_map_has_a_spec() {
        let specs = pinned_map_specs(&options(DEFAULT_FLOW_ENTRIES));
        assert_eq!(specs.map(|s| s.name), PINNED_MAPS);
    }

    #[test]
    fn our_pin_names() {
        for name in ["FLOWS", "TC_FILTERS", "LAYOUT_VERSION"] {
            assert_eq!(kind_of_our_pin(name), Some(ObjKind::Map), "{name}");
        }
        for name in ["link_connect4", "link_skb_egress", "link_tc_egress_wlan0"] {
            assert_eq!(kind_of_our_pin(name), Some(ObjKind::Link), "{name}");
        }
        let foreign = [
            "CONFIG",
            "map_netd_cookie_tag_map",
            "link_",
            "link_connect4_eth0",
            "link_tc_egress",
            "link_tc_egress_",
            "link_bogus",
            "flows",
        ];
        for name in foreign {
            assert_eq!(kind_of_our_pin(name), None, "{name}");
        }
    }

    #[test]
    fn rings_are_whole_pages() {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u32;
        assert_eq!(ring_bytes(page), page);
        assert_eq!(ring_bytes(page * 4), page * 4);
        assert_eq!(ring_bytes(page * 3), page * 4);
        assert_eq!(ring_bytes(1), page);
    }

    #[test]
    fn pin_dirs_only_root_controls_pass() {
        for used_for in [PinDirUse::Run, PinDirUse::Detach] {
            for mode in [0o700, 0o755, 0o1700] {
                assert_eq!(pin_dir_problem(libc::S_IFDIR | mode, 0, used_for), None);
            }
        }
    }

    #[test]
    fn pin_dir_problems_say_what_is_wrong() {
        let problem = |mode, uid| pin_dir_problem(mode, uid, PinDirUse::Run).unwrap();
        assert!(problem(libc::S_IFLNK | 0o777, 0).starts_with("is a symbolic link"));
        assert!(problem(libc::S_IFREG | 0o600, 0).starts_with("is not a directory"));
        let owner = problem(libc::S_IFDIR | 0o700, 65534);
        assert!(
            owner.starts_with("is owned by uid 65534, not root"),
            "{owner}"
        );
        for mode in [0o770, 0o702, 0o1777] {
            let writable = problem(libc::S_IFDIR | mode, 0);
            let expected = format!("is writable by group or others (mode {mode:03o})");
            assert!(writable.starts_with(&expected), "{writable}");
        }
    }

    #[test]
    fn detach_accepts_a_sticky_directory_only_root_owns() {
        let detach = |mode, uid| pin_dir_problem(libc::S_IFDIR | mode, uid, PinDirUse::Detach);
        assert_eq!(detach(0o1777, 0), None);
        assert!(detach(0o777, 0).is_some());
        assert!(detach(0o1777, 1000).is_some());
        assert!(pin_dir_problem(libc::S_IFLNK | 0o1777, 0, PinDirUse::Detach).is_some());
    }

    #[test]
    fn link_pins_name_hook_and_interface() {
        let pin = PinDir::new(Path::new("/p")).tc_link(Hook::TcIngress, "rmnet_data0");
        let name = pin.file_name().unwrap().to_str().unwrap();
        assert_eq!(parse_tc_link(name), Some((Hook::TcIngress, "rmnet_data0")));
        assert_eq!(
            parse_tc_link("link_tc_egress_wlan0"),
            Some((Hook::TcEgress, "wlan0"))
        );
        assert_eq!(parse_tc_link("link_tc_egress"), None);
        assert_eq!(parse_tc_link("link_tc_egress_"), None);
        assert_eq!(parse_tc_link("link_skb_egress"), None);
        assert_eq!(parse_tc_link("FLOWS"), None);
    }
}
