//! `bench-gen`: the load generator of `cargo xtask bench`.
//!
//! `connect` and `udp` are one process, one thread, holding both ends of
//! the traffic (the listening or receiving socket and the client), so a
//! workload pinned to one CPU measures the kernel's network path and the
//! hooks on it rather than the scheduler's wake-up latency between a client
//! and a server. `udp --port` with `udp-recv` is the exception on purpose:
//! two processes, so that the receiving side costs what a separate
//! receiving process costs on a phone.
//!
//! With `--client-cgroup DIR` the process makes its listening or receiving
//! sockets where it was started (the server cgroup), then moves itself into
//! DIR before making the client sockets: a socket belongs to the cgroup it
//! was created in, so only the client side passes the hooks attached there.
//! Without it, both ends stay where the process was started (W1b: started
//! in the watched cgroup, both ends pass its hooks).
//!
//! - `connect`: TCP connect + close on loopback. The same process accepts
//!   each connection and closes it at once (FIN); the client then closes
//!   with `SO_LINGER {1, 0}` (an RST), so no TIME_WAIT state builds up from
//!   round to round. The client sends SYN, ACK, RST (and ACKs the FIN when
//!   it arrives before the RST). With `--ports N` it spreads connections
//!   over N listening ports (and with `--addrs K` over K loopback addresses
//!   each, for N × K destinations where the descriptor limit does not
//!   allow one listener per destination); with `--uids a,b,...` one block of
//!   connections per uid (switching the real and effective uid, keeping
//!   root as saved uid).
//! - `udp`: unconnected UDP `sendto` of `--size`-byte datagrams to a socket
//!   of the same process on loopback, drained every 64 datagrams; with
//!   `--port P`, to 127.0.0.1:P instead, where a `udp-recv` process listens
//!   (no socket of its own to drain).
//! - `udp-recv`: the other process of that pair (W3b, where sender and
//!   receiver both sit in the watched cgroup, as every socket does on a
//!   phone): binds 127.0.0.1:`--port` and receives until it has `--count`
//!   datagrams, nothing came for `--quiet-ms`, or SIGTERM/SIGINT asks it to
//!   stop (then it takes what is queued). Its socket buffer is raised so that
//!   a sender running ahead on the shared CPU is queued, not dropped: every
//!   datagram sent passes the receiver's ingress hook and is read.
//!
//! Sending modes print one line: `ops=N elapsed_ns=N cpu_ns=N` plus
//! mode-specific `key=value` pairs; `udp-recv` prints `received=N cpu_ns=N`.
//! `elapsed_ns` and `cpu_ns` (user + system time from getrusage) cover the
//! traffic loop only, not the set-up.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

#[derive(Parser)]
#[command(name = "bench-gen", about = "load generator of cargo xtask bench")]
struct Cli {
    /// cgroup v2 directory to move into before making the client sockets.
    #[arg(long)]
    client_cgroup: Option<std::path::PathBuf>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// TCP connect + close (RST) on 127.0.0.1, accepted in-process.
    Connect {
        /// Connections in total (split evenly over --uids).
        #[arg(long)]
        count: u64,
        /// Distinct destination ports, from --base-port upward.
        #[arg(long, default_value_t = 1)]
        ports: u32,
        #[arg(long, default_value_t = 10000)]
        base_port: u16,
        /// Destination addresses 127.0.0.1 upward (distinct destinations:
        /// ports × addrs).
        #[arg(long, default_value_t = 1)]
        addrs: u8,
        /// Comma-separated uids, one block of connections each (default: stay root).
        #[arg(long, value_delimiter = ',')]
        uids: Vec<u32>,
    },
    /// Unconnected UDP sendto on 127.0.0.1, received in-process (or by a
    /// udp-recv process on --port).
    Udp {
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Send to 127.0.0.1:PORT (a udp-recv process) instead of a socket
        /// of this process.
        #[arg(long)]
        port: Option<u16>,
    },
    /// Receives the datagrams of a `udp --port` sender.
    UdpRecv {
        #[arg(long)]
        port: u16,
        /// Datagrams expected: stop once they are all in.
        #[arg(long)]
        count: u64,
        /// Stop when nothing arrived for this long.
        #[arg(long, default_value_t = 5000)]
        quiet_ms: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.mode {
        Mode::Connect {
            count,
            ports,
            base_port,
            addrs,
            uids,
        } => connect(
            cli.client_cgroup,
            Connects {
                count,
                ports: ports.max(1),
                base_port,
                addrs,
                uids: &uids,
            },
        ),
        Mode::Udp { count, size, port } => udp(cli.client_cgroup, count, size, port),
        Mode::UdpRecv {
            port,
            count,
            quiet_ms,
        } => udp_recv(port, count, std::time::Duration::from_millis(quiet_ms)),
    };
    match result {
        Ok(line) => println!("{line}"),
        Err(err) => {
            eprintln!("bench-gen: {err:#}");
            std::process::exit(1);
        }
    }
}

fn check(ret: libc::c_int, what: &str) -> Result<libc::c_int> {
    if ret < 0 {
        return Err(io::Error::last_os_error()).context(what.to_string());
    }
    Ok(ret)
}

fn socket(kind: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the new fd is owned by the returned OwnedFd.
    let fd = check(
        unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0) },
        "socket",
    )?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn loopback(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
        },
        sin_zero: [0; 8],
    }
}

const SIN_LEN: libc::socklen_t = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;

fn bind(fd: RawFd, addr: &libc::sockaddr_in) -> Result<()> {
    // SAFETY: `addr` is a valid sockaddr_in of SIN_LEN bytes.
    check(
        unsafe { libc::bind(fd, addr as *const _ as *const libc::sockaddr, SIN_LEN) },
        "bind",
    )
    .map(drop)
}

fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: setsockopt with a c_int option value.
    check(
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                &value as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        },
        "setsockopt",
    )
    .map(drop)
}

/// User + system CPU time of this process, in ns.
fn cpu_ns() -> u64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Raises the soft descriptor limit to `wanted` (never above the hard limit,
/// which only CAP_SYS_RESOURCE could raise).
fn raise_fd_limit(wanted: u64) -> Result<()> {
    // SAFETY: getrlimit/setrlimit with valid structs.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    check(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        "getrlimit",
    )?;
    if limit.rlim_cur >= wanted {
        return Ok(());
    }
    if limit.rlim_max < wanted {
        bail!(
            "{wanted} file descriptors needed, the hard limit is {}: use fewer --ports \
             (and more --addrs)",
            limit.rlim_max
        );
    }
    limit.rlim_cur = wanted;
    check(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) },
        "raising RLIMIT_NOFILE",
    )
    .map(drop)
}

fn set_uid(uid: u32) -> Result<()> {
    // Real and effective uid change (what bpf_get_current_uid_gid and new
    // sockets' owner see); the saved uid stays root so we can switch again.
    // Going back to root first: an unprivileged euid cannot pick another uid.
    // SAFETY: credential syscalls on this single-threaded process.
    check(unsafe { libc::setresuid(0, 0, 0) }, "setresuid(0)")?;
    check(unsafe { libc::setresuid(uid, uid, 0) }, "setresuid")?;
    Ok(())
}

fn accept_one(listener: RawFd) -> Result<()> {
    for _ in 0..2 {
        // SAFETY: accept4 without an address; the fd is closed right away.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            unsafe { libc::close(fd) };
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EAGAIN) {
            return Err(err).context("accept");
        }
        // The handshake normally completes inside connect() on loopback; if
        // the ACK is still queued, wait for it.
        let mut pfd = libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
    }
    bail!("no connection to accept after 1 s")
}

/// Moves this process into the client cgroup (server sockets stay behind).
fn enter_client(cgroup: Option<std::path::PathBuf>) -> Result<()> {
    if let Some(dir) = cgroup {
        std::fs::write(dir.join("cgroup.procs"), "0")
            .with_context(|| format!("moving into {}", dir.display()))?;
    }
    Ok(())
}

/// The connect mode's shape: how many connections to which destinations.
struct Connects<'a> {
    count: u64,
    ports: u32,
    base_port: u16,
    /// Destination addresses 127.0.0.1 .. 127.0.0.N (N > 1: listeners on
    /// 0.0.0.0, so one listener serves every address).
    addrs: u8,
    uids: &'a [u32],
}

fn connect(client_cgroup: Option<std::path::PathBuf>, c: Connects) -> Result<String> {
    let Connects {
        count,
        ports,
        base_port,
        addrs,
        uids,
    } = c;
    if u32::from(base_port) + ports > 65536 {
        bail!("--base-port {base_port} + --ports {ports} exceeds 65535");
    }
    let addrs = addrs.max(1);
    raise_fd_limit(u64::from(ports) + 64)?;
    let mut listeners = Vec::with_capacity(ports as usize);
    for i in 0..ports {
        let fd = socket(libc::SOCK_STREAM | libc::SOCK_NONBLOCK)?;
        set_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
        let mut at = loopback(base_port + i as u16);
        if addrs > 1 {
            at.sin_addr.s_addr = 0; // INADDR_ANY: every 127.0.0.x
        }
        bind(fd.as_raw_fd(), &at)
            .with_context(|| format!("listening on port {}", base_port + i as u16))?;
        // SAFETY: listen on our socket.
        check(unsafe { libc::listen(fd.as_raw_fd(), 64) }, "listen")?;
        listeners.push(fd);
    }
    enter_client(client_cgroup)?;
    // Destination i: port i % ports, address (i / ports) % addrs.
    let destinations = u64::from(ports) * u64::from(addrs);
    let targets: Vec<libc::sockaddr_in> = (0..destinations)
        .map(|i| {
            let mut t = loopback(base_port + (i % u64::from(ports)) as u16);
            let host = 1 + (i / u64::from(ports)) as u32;
            t.sin_addr.s_addr = (u32::from(Ipv4Addr::new(127, 0, 0, 0)) + host).to_be();
            t
        })
        .collect();
    let blocks: Vec<Option<u32>> = if uids.is_empty() {
        vec![None]
    } else {
        uids.iter().copied().map(Some).collect()
    };
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let start_cpu = cpu_ns();
    let start = Instant::now();
    let mut done = 0u64;
    for (b, uid) in blocks.iter().enumerate() {
        if let Some(uid) = uid {
            set_uid(*uid)?;
        }
        let n = count / blocks.len() as u64 + u64::from((b as u64) < count % blocks.len() as u64);
        for i in 0..n {
            let dst = (i % destinations) as usize;
            let slot = dst % ports as usize;
            let client = socket(libc::SOCK_STREAM)?;
            // SAFETY: connect to a valid sockaddr_in.
            let ret = unsafe {
                libc::connect(
                    client.as_raw_fd(),
                    &targets[dst] as *const _ as *const libc::sockaddr,
                    SIN_LEN,
                )
            };
            check(ret, "connect")?;
            accept_one(listeners[slot].as_raw_fd())?;
            // SAFETY: SO_LINGER with a valid struct linger: close sends RST.
            unsafe {
                libc::setsockopt(
                    client.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    &linger as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::linger>() as libc::socklen_t,
                )
            };
            drop(client);
            done += 1;
        }
    }
    let elapsed = start.elapsed().as_nanos() as u64;
    let cpu = cpu_ns() - start_cpu;
    if !uids.is_empty() {
        set_uid(0)?;
    }
    Ok(format!(
        "ops={done} elapsed_ns={elapsed} cpu_ns={cpu} ports={ports} addrs={addrs} uids={}",
        blocks.len()
    ))
}

/// A non-blocking UDP socket on 127.0.0.1 (port 0: any) and its address.
fn udp_socket(port: u16) -> Result<(OwnedFd, libc::sockaddr_in)> {
    let fd = socket(libc::SOCK_DGRAM | libc::SOCK_NONBLOCK)?;
    bind(fd.as_raw_fd(), &loopback(port)).with_context(|| format!("binding UDP port {port}"))?;
    let mut bound = loopback(0);
    let mut len = SIN_LEN;
    // SAFETY: getsockname into a sockaddr_in.
    check(
        unsafe {
            libc::getsockname(
                fd.as_raw_fd(),
                &mut bound as *mut _ as *mut libc::sockaddr,
                &mut len,
            )
        },
        "getsockname",
    )?;
    Ok((fd, bound))
}

/// Reads every datagram queued on non-blocking `fd`; returns how many.
fn drain(fd: RawFd, sink: &mut [u8]) -> u64 {
    let mut n = 0;
    // SAFETY: recv into our buffer.
    while unsafe { libc::recv(fd, sink.as_mut_ptr() as *mut libc::c_void, sink.len(), 0) } >= 0 {
        n += 1;
    }
    n
}

fn udp(
    client_cgroup: Option<std::path::PathBuf>,
    count: u64,
    size: usize,
    port: Option<u16>,
) -> Result<String> {
    // Our own receiving socket (made before moving to the client cgroup),
    // unless a udp-recv process receives.
    let rx = match port {
        None => Some(udp_socket(0)?),
        Some(_) => None,
    };
    let dest = rx.as_ref().map_or(loopback(port.unwrap_or(0)), |r| r.1);
    enter_client(client_cgroup)?;
    let tx = socket(libc::SOCK_DGRAM)?;
    let payload = vec![0x5au8; size];
    let mut sink = vec![0u8; 65536];
    let mut received = 0u64;
    let start_cpu = cpu_ns();
    let start = Instant::now();
    for i in 0..count {
        // SAFETY: sendto a valid sockaddr_in with our payload.
        let n = unsafe {
            libc::sendto(
                tx.as_raw_fd(),
                payload.as_ptr() as *const libc::c_void,
                payload.len(),
                0,
                &dest as *const _ as *const libc::sockaddr,
                SIN_LEN,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("sendto");
        }
        if let Some((rx, _)) = &rx {
            if i % 64 == 63 {
                received += drain(rx.as_raw_fd(), &mut sink);
            }
        }
    }
    let mut line = String::new();
    if let Some((rx, _)) = &rx {
        received += drain(rx.as_raw_fd(), &mut sink);
        line = format!(" received={received}");
    }
    let elapsed = start.elapsed().as_nanos() as u64;
    let cpu = cpu_ns() - start_cpu;
    Ok(format!(
        "ops={count} elapsed_ns={elapsed} cpu_ns={cpu}{line}"
    ))
}

/// Set by SIGTERM/SIGINT: udp-recv stops and reports.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Socket buffer of the receiver: room for tens of thousands of small
/// datagrams, so that a sender running ahead of it on the shared CPU is
/// queued rather than dropped.
const RECV_BUFFER: libc::c_int = 16 << 20;

fn udp_recv(port: u16, count: u64, quiet: std::time::Duration) -> Result<String> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_stop as *const () as libc::sighandler_t);
    }
    let (rx, _) = udp_socket(port)?;
    let fd = rx.as_raw_fd();
    // FORCE passes net.core.rmem_max (we run as root); plain SO_RCVBUF is
    // capped by it.
    if set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RECV_BUFFER).is_err() {
        set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RECV_BUFFER)?;
    }
    let mut sink = vec![0u8; 65536];
    let mut received = 0u64;
    let start_cpu = cpu_ns();
    let mut last = Instant::now();
    while received < count && !STOP.load(Ordering::SeqCst) && last.elapsed() < quiet {
        let got = drain(fd, &mut sink);
        if got > 0 {
            received += got;
            last = Instant::now();
            continue;
        }
        // Sleep in poll until the next datagram; wake now and then to see
        // the stop flag and the quiet time.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
    }
    received += drain(fd, &mut sink);
    let cpu = cpu_ns() - start_cpu;
    Ok(format!("received={received} cpu_ns={cpu}"))
}
