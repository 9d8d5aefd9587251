//! Who is on the other end of a local TCP connection: the uid that owns the
//! client's socket, asked from the kernel over NETLINK_SOCK_DIAG by the
//! connection's 4-tuple (what `ss -tnpe` shows as `uid:`). The unix control
//! socket needs none of this: SO_PEERCRED names its peer directly.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const TCP_STATES_ALL: u32 = !0;
const INET_DIAG_NOCOOKIE: u32 = !0;

/// `struct inet_diag_sockid` (include/uapi/linux/inet_diag.h): ports and
/// addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct nlmsghdr` followed by `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// Offset of `idiag_uid` in a reply: nlmsghdr (16) + family, state, timer,
/// retrans (4) + sockid (48) + expires, rqueue, wqueue (12).
const UID_OFFSET: usize = 16 + 4 + 48 + 12;

fn address_bytes(ip: IpAddr) -> (u8, [u8; 16]) {
    let mut out = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            out[..4].copy_from_slice(&v4.octets());
            (libc::AF_INET as u8, out)
        }
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets()),
    }
}

/// The socket owner's uid of the *client* end of a TCP connection whose
/// client is at `peer` and whose server end is at `local` (both in this
/// network namespace). `Ok(None)` when the kernel knows no such socket (the
/// client is on another host, or already closed).
pub(crate) fn tcp_client_uid(local: SocketAddr, peer: SocketAddr) -> io::Result<Option<u32>> {
    let (peer_ip, local_ip) = match (peer.ip().to_canonical(), local.ip().to_canonical()) {
        // A dual-stack listener sees IPv4 clients as mapped addresses; the
        // client's own socket is an IPv4 one.
        (p @ IpAddr::V4(_), IpAddr::V6(l)) if l.is_unspecified() => {
            (p, IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
        }
        (p, l) => (p, l),
    };
    let (family, src) = address_bytes(peer_ip);
    let (_, dst) = address_bytes(local_ip);
    let request = Request {
        len: std::mem::size_of::<Request>() as u32,
        kind: SOCK_DIAG_BY_FAMILY,
        flags: NLM_F_REQUEST,
        family,
        protocol: libc::IPPROTO_TCP as u8,
        states: TCP_STATES_ALL,
        id: SockId {
            sport: peer.port().to_be_bytes(),
            dport: local.port().to_be_bytes(),
            src,
            dst,
            cookie: [INET_DIAG_NOCOOKIE; 2],
            ..Default::default()
        },
        ..Default::default()
    };
    let socket = diag_socket()?;
    // SAFETY: `request` is a plain repr(C) value read by the kernel.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            &request as *const Request as *const libc::c_void,
            std::mem::size_of::<Request>(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = [0u8; 512];
    // SAFETY: the kernel writes at most `reply.len()` bytes into our buffer.
    let got = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr() as *mut libc::c_void,
            reply.len(),
            0,
        )
    };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_reply(&reply[..got as usize])
}

fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // A reply that never comes must not hold an API worker.
    let timeout = libc::timeval {
        tv_sec: 1,
        tv_usec: 0,
    };
    // SAFETY: valid option value of the declared size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    Ok(socket)
}

fn parse_reply(reply: &[u8]) -> io::Result<Option<u32>> {
    let u16_at = |at: usize| u16::from_ne_bytes([reply[at], reply[at + 1]]);
    let u32_at = |at: usize| u32::from_ne_bytes(reply[at..at + 4].try_into().unwrap());
    if reply.len() < 20 {
        return Err(io::Error::other("short sock_diag reply"));
    }
    match u16_at(4) {
        SOCK_DIAG_BY_FAMILY if reply.len() >= UID_OFFSET + 4 => Ok(Some(u32_at(UID_OFFSET))),
        NLMSG_ERROR => match -(u32_at(16) as i32) {
            libc::ENOENT => Ok(None),
            errno => Err(io::Error::from_raw_os_error(errno)),
        },
        other => Err(io::Error::other(format!(
            "unexpected sock_diag reply type {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn request_layout_matches_the_kernel() {
        // nlmsghdr 16 + inet_diag_req_v2 56.
        assert_eq!(std::mem::size_of::<Request>(), 72);
        assert_eq!(std::mem::size_of::<SockId>(), 48);
    }

    #[test]
    fn finds_the_uid_of_a_loopback_client() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, peer) = listener.accept().unwrap();
        let local = server_side.local_addr().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        assert_eq!(tcp_client_uid(local, peer).unwrap(), Some(me));
        drop(client);
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(tcp_client_uid(local, gone).unwrap(), None);
    }
}
