//! The rtnetlink requests the tc fallback makes where there is no TCX
//! (kernels before 6.6): add a `clsact` qdisc, list the bpf filters on one
//! side of it, and add, replace or delete one filter. Every request names the
//! interface by index, never by name: an interface deleted and re-created
//! under the same name is another interface, and must not be confused with
//! the old one.
//!
//! Message layouts are those of include/uapi/linux/{netlink,rtnetlink,
//! pkt_sched,pkt_cls}.h.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

const RTM_NEWQDISC: u16 = 36;
const RTM_NEWTFILTER: u16 = 44;
const RTM_DELTFILTER: u16 = 45;
const RTM_GETTFILTER: u16 = 46;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_ECHO: u16 = 0x8;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_CHAIN: u16 = 11;
const TCA_BPF_FD: u16 = 6;
const TCA_BPF_NAME: u16 = 7;
const TCA_BPF_FLAGS: u16 = 8;
const TCA_BPF_ID: u16 = 11;
const TCA_BPF_FLAG_ACT_DIRECT: u32 = 1;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = 0x3fff;

const TC_H_CLSACT: u32 = 0xffff_fff1;
const TC_H_MIN_INGRESS: u32 = 0xfff2;
const TC_H_MIN_EGRESS: u32 = 0xfff3;
/// Every protocol, as a filter's protocol in network byte order.
const ETH_P_ALL_BE: u16 = 0x0003u16.to_be();

const HEADER_LEN: usize = 16;
const TCMSG_LEN: usize = 20;

/// Which side of the `clsact` qdisc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Side {
    Ingress,
    Egress,
}

impl Side {
    fn parent(self) -> u32 {
        let minor = match self {
            Side::Ingress => TC_H_MIN_INGRESS,
            Side::Egress => TC_H_MIN_EGRESS,
        };
        (TC_H_CLSACT & 0xffff_0000) | minor
    }
}

/// One bpf filter as the kernel lists it. A filter is named by its
/// interface, side, priority, protocol and handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BpfFilter {
    pub(crate) priority: u16,
    /// In network byte order, as in `tcm_info`.
    pub(crate) protocol: u16,
    pub(crate) handle: u32,
    /// The name the filter was given (`TCA_BPF_NAME`).
    pub(crate) name: String,
    /// The id of the program it runs.
    pub(crate) prog_id: u32,
}

/// The header every tc request carries after the netlink header.
#[derive(Debug, Default, Clone, Copy)]
struct TcMsg {
    ifindex: u32,
    handle: u32,
    parent: u32,
    info: u32,
}

/// One request: a netlink header, a `tcmsg`, then attributes.
struct Request {
    buf: Vec<u8>,
}

impl Request {
    fn new(kind: u16, flags: u16, tc: TcMsg) -> Request {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // sequence, set in finish
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        buf.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        buf.extend_from_slice(&(tc.ifindex as i32).to_ne_bytes());
        buf.extend_from_slice(&tc.handle.to_ne_bytes());
        buf.extend_from_slice(&tc.parent.to_ne_bytes());
        buf.extend_from_slice(&tc.info.to_ne_bytes());
        Request { buf }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    /// A nested attribute holding what `fill` adds.
    fn nested(&mut self, kind: u16, fill: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        fill(self);
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// A filter's program and name, as attributes of an add or replace.
fn bpf_options(request: &mut Request, prog: BorrowedFd<'_>, name: &str) {
    let mut c_name = name.as_bytes().to_vec();
    c_name.push(0);
    request.nested(TCA_OPTIONS, |options| {
        options
            .attr(TCA_BPF_FD, &prog.as_raw_fd().to_ne_bytes())
            .attr(TCA_BPF_NAME, &c_name)
            .attr(TCA_BPF_FLAGS, &TCA_BPF_FLAG_ACT_DIRECT.to_ne_bytes());
    });
}

/// One message of an answer.
struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The messages in one datagram from the kernel.
fn messages(mut data: &[u8]) -> io::Result<Vec<Message<'_>>> {
    let mut out = Vec::new();
    while data.len() >= HEADER_LEN {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        if len < HEADER_LEN || len > data.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        out.push(Message {
            kind: u16::from_ne_bytes(data[4..6].try_into().unwrap()),
            seq: u32::from_ne_bytes(data[8..12].try_into().unwrap()),
            payload: &data[HEADER_LEN..len],
        });
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    Ok(out)
}

/// The attributes in `data`, as (type without flags, value).
fn attributes(mut data: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let len = u16::from_ne_bytes([data[0], data[1]]) as usize;
        let kind = u16::from_ne_bytes([data[2], data[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > data.len() {
            break;
        }
        out.push((kind, &data[4..len]));
        data = &data[len.next_multiple_of(4).min(data.len())..];
    }
    out
}

fn c_string(data: &[u8]) -> String {
    let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    String::from_utf8_lossy(&data[..end]).into_owned()
}

/// A bpf filter of chain 0 from a RTM_NEWTFILTER message; `None` for the
/// entries without a handle (one per priority), other kinds and chains.
fn parse_filter(payload: &[u8]) -> Option<BpfFilter> {
    let tcm = payload.get(..TCMSG_LEN)?;
    let handle = u32::from_ne_bytes(tcm[8..12].try_into().ok()?);
    let info = u32::from_ne_bytes(tcm[16..20].try_into().ok()?);
    if handle == 0 {
        return None;
    }
    let mut filter = BpfFilter {
        priority: (info >> 16) as u16,
        protocol: info as u16,
        handle,
        name: String::new(),
        prog_id: 0,
    };
    let mut is_bpf = false;
    for (kind, value) in attributes(&payload[TCMSG_LEN..]) {
        match kind {
            TCA_KIND => is_bpf = c_string(value) == "bpf",
            TCA_CHAIN if value.get(..4)? != [0; 4] => return None,
            TCA_OPTIONS => {
                for (kind, value) in attributes(value) {
                    match kind {
                        TCA_BPF_NAME => filter.name = c_string(value),
                        TCA_BPF_ID => {
                            filter.prog_id = u32::from_ne_bytes(value.get(..4)?.try_into().ok()?)
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    is_bpf.then_some(filter)
}

/// A route netlink socket of the calling thread's network namespace.
struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    fn open() -> io::Result<Rtnl> {
        // SAFETY: plain socket calls on a descriptor we own.
        unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            // The agent holds its kernel lock around these requests: never
            // wait for ever on an answer.
            let timeout = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &timeout as *const _ as *const libc::c_void,
                std::mem::size_of_val(&timeout) as u32,
            );
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            if libc::bind(
                raw,
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&addr) as u32,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(Rtnl { fd, seq: 0 })
        }
    }

    /// Sends `request` and returns the payloads of the RTM_NEWTFILTER
    /// messages answering it (a dump's entries, or an echo), once the
    /// kernel acknowledged it or ended the dump.
    fn transact(&mut self, request: Request) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let buf = request.finish(self.seq);
        // SAFETY: sending a buffer we own.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                buf.as_ptr() as *const libc::c_void,
                buf.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut answers = Vec::new();
        let mut data = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receiving into a buffer we own.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    data.as_mut_ptr() as *mut libc::c_void,
                    data.len(),
                    0,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for message in messages(&data[..n as usize])? {
                if message.seq != self.seq {
                    continue;
                }
                match message.kind {
                    NLMSG_ERROR => {
                        let code = message
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(-libc::EIO);
                        return match code {
                            0 => Ok(answers),
                            code => Err(io::Error::from_raw_os_error(-code)),
                        };
                    }
                    NLMSG_DONE => return Ok(answers),
                    RTM_NEWTFILTER => answers.push(message.payload.to_vec()),
                    _ => {}
                }
            }
        }
    }
}

/// Adds a `clsact` qdisc to interface `ifindex`, unless it has one (netd's,
/// or one left by an earlier run).
pub(crate) fn add_clsact(ifindex: u32) -> io::Result<()> {
    let mut request = Request::new(
        RTM_NEWQDISC,
        NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        TcMsg {
            ifindex,
            handle: TC_H_CLSACT & 0xffff_0000,
            parent: TC_H_CLSACT,
            info: 0,
        },
    );
    request.attr(TCA_KIND, b"clsact\0");
    match Rtnl::open()?.transact(request) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other.map(drop),
    }
}

/// The bpf filters on `side` of interface `ifindex` (none without a
/// `clsact` qdisc).
pub(crate) fn filters(ifindex: u32, side: Side) -> io::Result<Vec<BpfFilter>> {
    let request = Request::new(
        RTM_GETTFILTER,
        NLM_F_DUMP,
        TcMsg {
            ifindex,
            parent: side.parent(),
            ..TcMsg::default()
        },
    );
    let answers = Rtnl::open()?.transact(request)?;
    Ok(answers.iter().filter_map(|p| parse_filter(p)).collect())
}

/// Adds a filter running `prog` in direct-action mode under `name`; the
/// kernel picks its priority and handle. Returns the filter it made.
pub(crate) fn add(
    ifindex: u32,
    side: Side,
    prog: BorrowedFd<'_>,
    name: &str,
) -> io::Result<BpfFilter> {
    let mut request = Request::new(
        RTM_NEWTFILTER,
        NLM_F_ACK | NLM_F_ECHO | NLM_F_CREATE | NLM_F_EXCL,
        TcMsg {
            ifindex,
            parent: side.parent(),
            info: u32::from(ETH_P_ALL_BE),
            ..TcMsg::default()
        },
    );
    request.attr(TCA_KIND, b"bpf\0");
    bpf_options(&mut request, prog, name);
    let answers = Rtnl::open()?.transact(request)?;
    answers
        .iter()
        .find_map(|p| parse_filter(p))
        .ok_or_else(|| io::Error::other("the kernel did not echo the new tc filter"))
}

/// Swaps the program `filter` runs for `prog`, in place: the kernel
/// replaces it atomically, so every packet runs exactly one of the two.
pub(crate) fn replace(
    ifindex: u32,
    side: Side,
    filter: &BpfFilter,
    prog: BorrowedFd<'_>,
    name: &str,
) -> io::Result<()> {
    // Without NLM_F_CREATE the kernel changes an existing filter and
    // refuses to make one.
    let mut request = Request::new(RTM_NEWTFILTER, NLM_F_ACK, filter_msg(ifindex, side, filter));
    request.attr(TCA_KIND, b"bpf\0");
    bpf_options(&mut request, prog, name);
    Rtnl::open()?.transact(request).map(drop)
}

/// Deletes `filter` from `side` of interface `ifindex`.
pub(crate) fn delete(ifindex: u32, side: Side, filter: &BpfFilter) -> io::Result<()> {
    let request = Request::new(RTM_DELTFILTER, NLM_F_ACK, filter_msg(ifindex, side, filter));
    Rtnl::open()?.transact(request).map(drop)
}

fn filter_msg(ifindex: u32, side: Side, filter: &BpfFilter) -> TcMsg {
    TcMsg {
        ifindex,
        handle: filter.handle,
        parent: side.parent(),
        info: (u32::from(filter.priority) << 16) | u32::from(filter.protocol),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let mut request = Request::new(
            RTM_GETTFILTER,
            NLM_F_DUMP,
            TcMsg {
                ifindex: 7,
                parent: Side::Egress.parent(),
                ..TcMsg::default()
            },
        );
        request.attr(TCA_KIND, b"bpf\0");
        let buf = request.finish(9);
        assert_eq!(buf.len(), HEADER_LEN + TCMSG_LEN + 8);
        assert_eq!(u32::from_ne_bytes(buf[0..4].try_into().unwrap()), 44);
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 9);
        assert_eq!(Side::Egress.parent(), 0xffff_fff3);
        assert_eq!(Side::Ingress.parent(), 0xffff_fff2);
    }

    #[test]
    fn parses_a_listed_filter() {
        let mut request = Request::new(
            RTM_NEWTFILTER,
            0,
            TcMsg {
                ifindex: 3,
                handle: 1,
                parent: Side::Egress.parent(),
                info: (49152 << 16) | u32::from(ETH_P_ALL_BE),
            },
        );
        request.attr(TCA_KIND, b"bpf\0").nested(TCA_OPTIONS, |o| {
            o.attr(TCA_BPF_NAME, b"tc_egress\0")
                .attr(TCA_BPF_ID, &42u32.to_ne_bytes());
        });
        let buf = request.finish(1);
        let parsed = messages(&buf).unwrap();
        assert_eq!(parsed.len(), 1);
        let filter = parse_filter(parsed[0].payload).unwrap();
        assert_eq!(
            filter,
            BpfFilter {
                priority: 49152,
                protocol: ETH_P_ALL_BE,
                handle: 1,
                name: "tc_egress".into(),
                prog_id: 42,
            }
        );
    }
}
