//! Network fixtures that need no external tool, so the same tests run on a
//! host and inside a minimal VM guest: named network namespaces (made the
//! iproute2 way, a namespace file bind-mounted at /run/netns/NAME), a veth
//! pair with IPv4 and IPv6 addresses configured over rtnetlink, and a packet
//! capture on the server's end of the veth as an independent count of what
//! the client sent. Everything is removed on drop, also when a test fails.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const SERVER4: &str = "10.200.0.2";
pub const CLIENT4: &str = "10.200.0.1";
pub const SERVER6: &str = "fd00:200::2";
pub const CLIENT6: &str = "fd00:200::1";
/// Where named namespaces live, as with `ip netns`.
pub const NETNS_DIR: &str = "/run/netns";

fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

fn cstr(path: &Path) -> CString {
    CString::new(path.as_os_str().as_encoded_bytes()).expect("path without NUL")
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(err.kind(), format!("{what}: {err}")));
    }
    Ok(())
}

/// Unmounts and removes /run/netns/NAME (errors ignored: it may not exist).
fn remove_netns(name: &str) {
    let path = netns_path(name);
    let c = cstr(&path);
    // SAFETY: valid NUL-terminated path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_file(&path);
}

/// Makes a new network namespace and keeps it alive at /run/netns/NAME.
fn create_netns(name: &str) -> io::Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    remove_netns(name); // a crashed earlier run may have left one
    let path = netns_path(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)?;
    // unshare() acts on the calling thread only: do it in a thread of its own
    // so the test's threads stay where they are.
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        // SAFETY: plain syscalls on this thread.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNET), "unshare(CLONE_NEWNET)")?;
            let own = cstr(Path::new(&format!(
                "/proc/self/task/{}/ns/net",
                libc::gettid()
            )));
            let dst = cstr(&target);
            check(
                libc::mount(
                    own.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ),
                "bind-mounting the namespace",
            )
        }
    })
    .join()
    .expect("netns thread");
    if made.is_err() {
        remove_netns(name);
    }
    made
}

/// Runs `f` on a thread that has entered the namespace at `ns`.
pub fn in_netns<T: Send>(ns: &Path, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(ns)
                    .unwrap_or_else(|e| panic!("opening {}: {e}", ns.display()));
                // SAFETY: setns on a namespace fd we hold, for this thread only.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                check(rc, "setns").unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
                f()
            })
            .join()
            .expect("thread in the namespace")
    })
}

/// A synchronous rtnetlink connection in the namespace it was opened in.
struct Rtnl {
    socket: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        Ok(Rtnl { socket, seq: 0 })
    }

    /// Sends one request and waits for the kernel's acknowledgement.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        loop {
            let (data, _) = self.socket.recv_from_full()?;
            let mut offset = 0;
            while offset < data.len() {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[offset..])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += (len + 3) & !3;
                if reply.header.sequence_number != self.seq {
                    continue;
                }
                if let NetlinkPayload::Error(err) = reply.payload {
                    return match err.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
            }
        }
    }

    fn link_up(&mut self, index: u32) -> io::Result<()> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.flags = LinkFlags::Up;
        link.header.change_mask = LinkFlags::Up;
        self.request(RouteNetlinkMessage::SetLink(link), 0)
    }

    fn add_address(&mut self, index: u32, addr: IpAddr, prefix_len: u8) -> io::Result<()> {
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = prefix_len;
        match addr {
            IpAddr::V4(_) => {
                message.header.family = AddressFamily::Inet;
                message.attributes.push(AddressAttribute::Local(addr));
            }
            IpAddr::V6(_) => {
                message.header.family = AddressFamily::Inet6;
                // No duplicate address detection: usable at once.
                message.header.flags = AddressHeaderFlags::Nodad;
            }
        }
        message.attributes.push(AddressAttribute::Address(addr));
        self.request(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }

    /// `ip link add NAME type veth peer name PEER netns PEER_NS`.
    fn add_veth(&mut self, name: &str, peer: &str, peer_ns: &std::fs::File) -> io::Result<()> {
        let mut peer_link = LinkMessage::default();
        peer_link
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        peer_link
            .attributes
            .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        let mut link = LinkMessage::default();
        link.attributes
            .push(LinkAttribute::IfName(name.to_string()));
        link.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_link))),
        ]));
        self.request(
            RouteNetlinkMessage::NewLink(link),
            NLM_F_CREATE | NLM_F_EXCL,
        )
    }
}

/// The index of interface `name` in the calling thread's namespace.
fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {name}: {}", io::Error::last_os_error()),
        )),
        index => Ok(index),
    }
}

/// In the calling thread's namespace: lo up, addresses on `dev`, `dev` up.
fn configure(rtnl: &mut Rtnl, dev: &str, v4: &str, v6: &str) -> io::Result<()> {
    rtnl.link_up(if_index("lo")?)?;
    let index = if_index(dev)?;
    rtnl.add_address(index, v4.parse().unwrap(), 24)?;
    rtnl.add_address(index, v6.parse().unwrap(), 64)?;
    rtnl.link_up(index)
}

/// Two namespaces, client and server, joined by veth with IPv4 and IPv6:
/// veth0 (10.200.0.1, fd00:200::1) in the client, veth1 (10.200.0.2,
/// fd00:200::2) in the server.
pub struct NetPair {
    pub client: String,
    pub server: String,
}

impl NetPair {
    pub fn new(tag: &str) -> NetPair {
        let pair = NetPair {
            client: format!("{tag}-c"),
            server: format!("{tag}-s"),
        };
        // From here on, Drop removes whatever was made.
        for ns in [&pair.client, &pair.server] {
            create_netns(ns).unwrap_or_else(|e| panic!("creating netns {ns}: {e}"));
        }
        let client_ns = PathBuf::from(NetPair::path(&pair.client));
        let server_ns = PathBuf::from(NetPair::path(&pair.server));
        let server_file = std::fs::File::open(&server_ns).expect("open server netns");
        in_netns(&client_ns, || -> io::Result<()> {
            let mut rtnl = Rtnl::open()?;
            rtnl.add_veth("veth0", "veth1", &server_file)?;
            configure(&mut rtnl, "veth0", CLIENT4, CLIENT6)
        })
        .unwrap_or_else(|e| panic!("setting up veth0 in {}: {e}", pair.client));
        in_netns(&server_ns, || -> io::Result<()> {
            configure(&mut Rtnl::open()?, "veth1", SERVER4, SERVER6)
        })
        .unwrap_or_else(|e| panic!("setting up veth1 in {}: {e}", pair.server));
        pair
    }

    /// A path `setns` can open for namespace `ns`.
    pub fn path(ns: &str) -> String {
        netns_path(ns).to_string_lossy().into_owned()
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        // The veth pair goes with the namespaces once their last user exits.
        remove_netns(&self.client);
        remove_netns(&self.server);
    }
}

const ETH_HEADER: usize = 14;
const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const PACKET_OUTGOING: u8 = 4;

/// Packets and IP-level bytes per (protocol, destination, port).
type Tally = HashMap<(u8, IpAddr, u16), (u64, u64)>;

/// A capture on the server's veth end (AF_PACKET): the frames the client
/// sent, counted per (protocol, destination address, destination port) as
/// packets and IP-level bytes (frame length minus the Ethernet header).
/// veth hands GSO skbs over whole, so a frame here is one skb at the
/// client's cgroup egress hook.
pub struct Capture {
    fd: OwnedFd,
    ifindex: i32,
    tally: Mutex<(Tally, u64)>,
}

impl Capture {
    pub fn new(net: &NetPair) -> Capture {
        let server = PathBuf::from(NetPair::path(&net.server));
        let (fd, ifindex) = in_netns(&server, || -> io::Result<(OwnedFd, i32)> {
            let ifindex = if_index("veth1")? as i32;
            // SAFETY: plain socket syscalls on an fd we own.
            unsafe {
                let raw = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    i32::from(ETH_P_ALL.to_be()),
                );
                check(raw, "socket(AF_PACKET)")?;
                let fd = OwnedFd::from_raw_fd(raw);
                // Room for every frame of a test between two reads.
                let size: libc::c_int = 64 << 20;
                check(
                    libc::setsockopt(
                        raw,
                        libc::SOL_SOCKET,
                        libc::SO_RCVBUFFORCE,
                        &size as *const _ as *const libc::c_void,
                        std::mem::size_of_val(&size) as u32,
                    ),
                    "SO_RCVBUFFORCE",
                )?;
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = ETH_P_ALL.to_be();
                sll.sll_ifindex = ifindex;
                check(
                    libc::bind(
                        raw,
                        &sll as *const _ as *const libc::sockaddr,
                        std::mem::size_of_val(&sll) as u32,
                    ),
                    "binding the capture to veth1",
                )?;
                Ok((fd, ifindex))
            }
        })
        .unwrap_or_else(|e| panic!("capture in {}: {e}", net.server));
        let capture = Capture {
            fd,
            ifindex,
            tally: Mutex::new((HashMap::new(), 0)),
        };
        capture.drain();
        capture
    }

    /// Reads every queued frame into the tally.
    fn drain(&self) {
        let mut guard = self.tally.lock().unwrap();
        let (tally, drops) = &mut *guard;
        let mut buf = vec![0u8; 128];
        loop {
            // SAFETY: recvfrom into buffers we own; MSG_TRUNC returns the
            // frame's real length even though only its headers are copied.
            let (n, sll) = unsafe {
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                let mut len = std::mem::size_of_val(&sll) as u32;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_TRUNC,
                    &mut sll as *mut _ as *mut libc::sockaddr,
                    &mut len,
                );
                (n, sll)
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                assert_eq!(err.kind(), io::ErrorKind::WouldBlock, "capture: {err}");
                break;
            }
            if sll.sll_ifindex != self.ifindex || sll.sll_pkttype == PACKET_OUTGOING {
                continue;
            }
            let n = n as usize;
            if let Some(key) = parse_frame(&buf[..n.min(buf.len())]) {
                let entry = tally.entry(key).or_default();
                entry.0 += 1;
                entry.1 += (n - ETH_HEADER) as u64;
            }
        }
        // SAFETY: getsockopt into a struct we own (reading resets it).
        unsafe {
            let mut stats: libc::tpacket_stats = std::mem::zeroed();
            let mut len = std::mem::size_of_val(&stats) as u32;
            if libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                &mut stats as *mut _ as *mut libc::c_void,
                &mut len,
            ) == 0
            {
                *drops += u64::from(stats.tp_drops);
            }
        }
    }

    /// (packets, IP-level bytes) the client sent to `dst`:`port` over
    /// `proto` ("tcp" or "udp") so far.
    pub fn read(&self, proto: &str, dst: &str, port: u16) -> (u64, u64) {
        self.drain();
        let proto = match proto {
            "tcp" => libc::IPPROTO_TCP as u8,
            "udp" => libc::IPPROTO_UDP as u8,
            other => panic!("capture counts tcp and udp, not {other}"),
        };
        let dst: IpAddr = dst.parse().expect("destination address");
        let guard = self.tally.lock().unwrap();
        assert_eq!(guard.1, 0, "the capture dropped frames: counts incomplete");
        guard
            .0
            .get(&(proto, dst, port))
            .copied()
            .unwrap_or_default()
    }
}

/// (protocol, destination address, destination port) of an Ethernet frame
/// carrying IPv4 or IPv6 (port 0 for non-first fragments).
pub fn parse_frame(frame: &[u8]) -> Option<(u8, IpAddr, u16)> {
    let ethertype = u16::from_be_bytes(frame.get(12..14)?.try_into().ok()?);
    let ip = frame.get(ETH_HEADER..)?;
    let port_at = |offset: usize| -> Option<u16> {
        Some(u16::from_be_bytes(
            ip.get(offset + 2..offset + 4)?.try_into().ok()?,
        ))
    };
    match ethertype {
        ETH_P_IP => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let proto = *ip.get(9)?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            let fragment_offset = u16::from_be_bytes(ip.get(6..8)?.try_into().ok()?) & 0x1fff;
            let port = if fragment_offset == 0 {
                port_at(ihl)?
            } else {
                0
            };
            Some((proto, IpAddr::from(dst), port))
        }
        ETH_P_IPV6 => {
            let proto = *ip.get(6)?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let port = match proto {
                6 | 17 => port_at(40)?,
                _ => 0,
            };
            Some((proto, IpAddr::from(dst), port))
        }
        _ => None,
    }
}
