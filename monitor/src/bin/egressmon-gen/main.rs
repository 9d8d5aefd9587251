//! `egressmon-gen`: a small traffic generator and sink used by the test suite
//! (and handy to check a setup by hand). It can enter a network namespace and
//! a cgroup and drop to a uid before sending, so the traffic is attributed
//! exactly as a real app's would be. A binary of its own, beside `egressmon`:
//! the agent that `cargo xtask dist` ships does not carry it.

mod dns;
mod hello;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Generate test traffic, or serve as its sink (used by the test suite).
#[derive(Parser, Debug)]
#[command(name = "egressmon-gen")]
struct Cli {
    #[command(flatten)]
    args: GenArgs,
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli.args) {
        eprintln!("egressmon-gen: {err:#}");
        std::process::exit(1);
    }
}

#[derive(Args, Debug)]
pub struct GenArgs {
    /// Enter this network namespace first (e.g. /run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Move into this cgroup (a cgroup2 directory) first.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Switch to this uid (and gid) before sending.
    #[arg(long)]
    pub uid: Option<u32>,
    /// Stay alive this long after sending (so /proc still shows the sender).
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    #[command(subcommand)]
    pub what: GenKind,
}

#[derive(Subcommand, Debug)]
pub enum GenKind {
    /// TCP: connect, send --bytes, half-close, wait for the peer to close.
    Tcp {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 1)]
        threads: u64,
        #[arg(long, default_value_t = 0)]
        bytes: usize,
        /// Spread connections over this many consecutive destination ports.
        #[arg(long, default_value_t = 1)]
        ports: u16,
    },
    /// One TCP connection that writes CHUNK bytes every INTERVAL_MS for
    /// DURATION_MS, then closes (a connection that stays open while a
    /// block rule arrives). Prints "writes N" at the end.
    TcpStream {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value_t = 200)]
        chunk: usize,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        #[arg(long, default_value_t = 5000)]
        duration_ms: u64,
    },
    /// UDP on a connected socket: connect() once, then send().
    UdpConnected {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// UDP on an unconnected socket: sendto() each datagram.
    UdpSendto {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Send from an AF_INET6 socket (for IPv4-mapped destinations).
        #[arg(long)]
        v6_socket: bool,
        /// IPv6: put an 8-byte destination-options extension header before
        /// the UDP header of every datagram (needs CAP_NET_RAW, i.e. uid 0).
        #[arg(long)]
        dest_opts: bool,
    },
    /// UDP to `count` distinct IPv4 addresses from `base` upward (e.g.
    /// 127.1.0.0 in a namespace of its own: all loopback, no neighbours).
    UdpSpray {
        #[arg(long)]
        base: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 9)]
        port: u16,
        #[arg(long, default_value_t = 1)]
        count: u64,
        #[arg(long, default_value_t = 16)]
        size: usize,
    },
    /// Resolve HOST through RESOLVER, then POST BYTES of form data over
    /// cleartext HTTP/1.1 to it (as a device activation call would).
    HttpPost {
        #[arg(long)]
        host: String,
        #[arg(long)]
        resolver: SocketAddr,
        #[arg(long, default_value_t = 80)]
        port: u16,
        #[arg(long, default_value_t = 256)]
        bytes: usize,
        /// Send this file's contents as the body instead of BYTES of form
        /// data (a file, so the body is not in the sender's command line).
        #[arg(long)]
        body_file: Option<PathBuf>,
        /// Send the headers and the body as separate segments (the body in
        /// a later packet, as a client streaming its request would).
        #[arg(long)]
        split: bool,
    },
    /// Resolve HOST through RESOLVER, then send BYTES of binary data over TCP.
    Connect {
        #[arg(long)]
        host: String,
        #[arg(long)]
        resolver: SocketAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 100)]
        bytes: usize,
    },
    /// Resolve HOST through RESOLVER, then open TLS to it: a ClientHello with
    /// HOST as server_name, reading the server's answer.
    Tls {
        #[arg(long)]
        host: String,
        #[arg(long)]
        resolver: SocketAddr,
        #[arg(long, default_value_t = 443)]
        port: u16,
        /// After the ClientHello, send this file's contents as the payload
        /// of a TLS application-data record (what a session's encrypted
        /// data would ride in).
        #[arg(long)]
        then_file: Option<PathBuf>,
    },
    /// TCP connect() attempts to DST, one after the other, each given up
    /// after TIMEOUT_MS; every socket stays open until the end. Against a
    /// `serve --tcp-stalled` listener the first connects and the next one's
    /// SYN goes unanswered, so the kernel retransmits it.
    StalledConnects {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value_t = 2)]
        count: u64,
        #[arg(long, default_value_t = 3_500)]
        timeout_ms: u64,
    },
    /// A DNS answer nobody asked for: "NAME is ADDR", sent from port 53 to
    /// DST (how one uid would try to name another uid's destinations).
    DnsAnswer {
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long)]
        addr: std::net::Ipv4Addr,
        /// The DNS id the answer carries.
        #[arg(long, default_value_t = 0x4243)]
        id: u16,
    },
    /// One DNS query for NAME with id ID from local port PORT to RESOLVER,
    /// then wait up to WAIT_MS for an answer (the socket stays open).
    DnsQuery {
        #[arg(long)]
        resolver: SocketAddr,
        #[arg(long)]
        name: String,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        id: u16,
        #[arg(long, default_value_t = 2000)]
        wait_ms: u64,
    },
    /// Sink: accept TCP and drain UDP on the given addresses until killed.
    Serve {
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        #[arg(long)]
        udp: Vec<SocketAddr>,
        /// A listener with a backlog of 0 that never accepts: once one
        /// connection waits in its queue, the kernel drops further SYNs.
        #[arg(long)]
        tcp_stalled: Vec<SocketAddr>,
        /// Answer DNS A queries on this address from --zone.
        #[arg(long)]
        dns: Option<SocketAddr>,
        /// name=ipv4 records for --dns.
        #[arg(long)]
        zone: Vec<String>,
    },
}

fn enter(args: &GenArgs) -> Result<()> {
    if let Some(ns) = &args.netns {
        let file = std::fs::File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        // SAFETY: setns on a namespace fd we hold.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setns");
        }
    }
    if let Some(cg) = &args.cgroup {
        std::fs::write(cg.join("cgroup.procs"), std::process::id().to_string())
            .with_context(|| format!("joining cgroup {}", cg.display()))?;
    }
    if let Some(uid) = args.uid {
        // SAFETY: plain credential syscalls; gid first while still root.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error()).context("dropping to the test uid");
            }
        }
    }
    Ok(())
}

pub fn run(args: GenArgs) -> Result<()> {
    // Enter namespace/cgroup/uid before any thread exists: setns and setuid
    // act on the calling thread only.
    enter(&args)?;
    let hold = std::time::Duration::from_millis(args.hold_ms);
    let result = send(args.what);
    std::thread::sleep(hold);
    result
}

fn send(what: GenKind) -> Result<()> {
    match what {
        GenKind::Tcp {
            dst,
            count,
            threads,
            bytes,
            ports,
        } => tcp(dst, count, threads.max(1), bytes, ports.max(1)),
        GenKind::TcpStream {
            dst,
            chunk,
            interval_ms,
            duration_ms,
        } => {
            let mut stream = std::net::TcpStream::connect(dst)?;
            let payload = vec![0x5au8; chunk];
            let end = std::time::Instant::now() + std::time::Duration::from_millis(duration_ms);
            let mut writes = 0u64;
            while std::time::Instant::now() < end {
                // A dropped segment is retransmitted by the kernel; writes
                // go on filling the send buffer until it is full.
                stream.set_nonblocking(true)?;
                if std::io::Write::write(&mut stream, &payload).is_ok() {
                    writes += 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(interval_ms));
            }
            println!("writes {writes}");
            Ok(())
        }
        GenKind::UdpConnected { dst, count, size } => {
            let socket = UdpSocket::bind(unspecified(dst, false))?;
            socket.connect(dst)?;
            let payload = vec![0x5au8; size];
            for _ in 0..count {
                socket.send(&payload)?;
            }
            Ok(())
        }
        GenKind::UdpSendto {
            dst,
            count,
            size,
            v6_socket,
            dest_opts,
        } => {
            let socket = UdpSocket::bind(unspecified(dst, v6_socket))?;
            if dest_opts {
                set_dest_opts(&socket)?;
            }
            let payload = vec![0x5au8; size];
            let target = match (dst, v6_socket) {
                (SocketAddr::V4(v4), true) => {
                    SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                }
                _ => dst,
            };
            for _ in 0..count {
                socket.send_to(&payload, target)?;
            }
            Ok(())
        }
        GenKind::UdpSpray {
            base,
            port,
            count,
            size,
        } => {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            let payload = vec![0x5au8; size];
            let base = u32::from(base);
            for i in 0..count {
                let dst = SocketAddr::new(
                    std::net::Ipv4Addr::from(base.wrapping_add(i as u32)).into(),
                    port,
                );
                socket.send_to(&payload, dst)?;
            }
            Ok(())
        }
        GenKind::HttpPost {
            host,
            resolver,
            port,
            bytes,
            body_file,
            split,
        } => {
            let ip = dns::resolve(resolver, &host)?;
            let body = match body_file {
                Some(path) => std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?,
                None => "k=".to_string() + &"v".repeat(bytes.saturating_sub(2)),
            };
            let headers = format!(
                "POST /activate HTTP/1.1
Host: {host}
Content-Type: application/x-www-form-urlencoded
Content-Length: {}
Connection: close

",
                body.len()
            );
            let dst = SocketAddr::new(ip.into(), port);
            if split {
                let parts: [&[u8]; 2] = [headers.as_bytes(), body.as_bytes()];
                return tcp_in_parts(dst, &parts);
            }
            one_tcp(dst, (headers + &body).as_bytes())
        }
        GenKind::Connect {
            host,
            resolver,
            port,
            bytes,
        } => {
            let ip = dns::resolve(resolver, &host)?;
            one_tcp(SocketAddr::new(ip.into(), port), &vec![0xa5u8; bytes])
        }
        GenKind::Tls {
            host,
            resolver,
            port,
            then_file,
        } => {
            let ip = dns::resolve(resolver, &host)?;
            let mut stream = TcpStream::connect(SocketAddr::new(ip.into(), port))?;
            stream.set_nodelay(true)?;
            stream.write_all(&hello::client_hello(&host, std::process::id() as u64))?;
            if let Some(path) = then_file {
                let text =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                std::thread::sleep(std::time::Duration::from_millis(50));
                let mut record = vec![0x17, 0x03, 0x03];
                record.extend_from_slice(&(text.len() as u16).to_be_bytes());
                record.extend_from_slice(&text);
                stream.write_all(&record)?;
            }
            stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            let mut reply = [0u8; 4096];
            let n = stream.read(&mut reply).unwrap_or(0);
            println!("tls: {n} bytes from the server");
            Ok(())
        }
        GenKind::DnsQuery {
            resolver,
            name,
            port,
            id,
            wait_ms,
        } => {
            let socket = UdpSocket::bind(SocketAddr::new(unspecified(resolver, false).ip(), port))?;
            socket.send_to(&dns::query(id, &name), resolver)?;
            socket.set_read_timeout(Some(std::time::Duration::from_millis(wait_ms.max(1))))?;
            let mut buf = [0u8; 512];
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => println!("dns-query: {n} bytes from {from}"),
                Err(_) => println!("dns-query: no answer"),
            }
            Ok(())
        }
        GenKind::DnsAnswer {
            dst,
            name,
            addr,
            id,
        } => {
            let socket = UdpSocket::bind(SocketAddr::new(unspecified(dst, false).ip(), 53))?;
            let zone = [(name.to_ascii_lowercase(), addr)].into_iter().collect();
            let answer =
                dns::answer(&dns::query(id, &name), &zone).context("building the DNS answer")?;
            socket.send_to(&answer, dst)?;
            Ok(())
        }
        GenKind::StalledConnects {
            dst,
            count,
            timeout_ms,
        } => stalled_connects(dst, count, std::time::Duration::from_millis(timeout_ms)),
        GenKind::Serve {
            tcp,
            udp,
            tcp_stalled,
            dns: dns_listen,
            zone,
        } => {
            let resolver = match dns_listen {
                Some(listen) => Some(dns::serve(listen, dns::parse_zone(&zone)?)?),
                None => None,
            };
            let stalled = tcp_stalled
                .into_iter()
                .map(stalled_listener)
                .collect::<Result<Vec<_>>>()?;
            serve(tcp, udp, resolver, stalled)
        }
    }
}

fn unspecified(dst: SocketAddr, force_v6: bool) -> SocketAddr {
    if dst.is_ipv6() || force_v6 {
        "[::]:0".parse().unwrap()
    } else {
        "0.0.0.0:0".parse().unwrap()
    }
}

fn tcp(dst: SocketAddr, count: u64, threads: u64, bytes: usize, ports: u16) -> Result<()> {
    let per_thread = count / threads;
    let extra = count % threads;
    let workers: Vec<_> = (0..threads)
        .map(|i| {
            let n = per_thread + u64::from(i < extra);
            std::thread::spawn(move || -> Result<()> {
                let payload = vec![0xa5u8; bytes];
                for j in 0..n {
                    let mut target = dst;
                    target.set_port(dst.port() + (j % ports as u64) as u16);
                    one_tcp(target, &payload)?;
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
    }
    Ok(())
}

fn one_tcp(dst: SocketAddr, payload: &[u8]) -> Result<()> {
    let mut stream = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
    stream.set_nodelay(true)?;
    if !payload.is_empty() {
        stream.write_all(payload)?;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut sink = [0u8; 64];
    while stream.read(&mut sink)? > 0 {}
    Ok(())
}

/// One TCP connection that sends each part in a segment of its own (a
/// pause between them keeps the kernel from merging them).
fn tcp_in_parts(dst: SocketAddr, parts: &[&[u8]]) -> Result<()> {
    let mut stream = TcpStream::connect(dst).with_context(|| format!("connect {dst}"))?;
    stream.set_nodelay(true)?;
    for part in parts {
        stream.write_all(part)?;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut sink = [0u8; 64];
    while stream.read(&mut sink)? > 0 {}
    Ok(())
}

fn stalled_connects(dst: SocketAddr, count: u64, timeout: std::time::Duration) -> Result<()> {
    let mut open = Vec::new();
    let mut timed_out = 0;
    for _ in 0..count {
        match TcpStream::connect_timeout(&dst, timeout) {
            Ok(stream) => open.push(stream),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => timed_out += 1,
            Err(e) => return Err(e).with_context(|| format!("connect {dst}")),
        }
    }
    println!(
        "stalled-connects: {} connected, {timed_out} unanswered",
        open.len()
    );
    Ok(())
}

/// A bound TCP socket listening with a backlog of 0, never accepted from.
fn stalled_listener(addr: SocketAddr) -> Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .and_then(|()| socket.listen(0))
        .with_context(|| format!("listening (backlog 0) on {addr}"))?;
    Ok(socket)
}

/// Serves until killed.
fn serve(
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
    resolver: Option<std::thread::JoinHandle<()>>,
    stalled: Vec<socket2::Socket>,
) -> Result<()> {
    if tcp.is_empty() && udp.is_empty() && resolver.is_none() && stalled.is_empty() {
        bail!("serve needs at least one --tcp, --udp, --tcp-stalled or --dns address");
    }
    let mut handles: Vec<_> = resolver.into_iter().collect();
    for addr in tcp {
        let listener = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
        handles.push(std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        }));
    }
    for addr in udp {
        let socket = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
        handles.push(std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while socket.recv(&mut buf).is_ok() {}
        }));
    }
    if !stalled.is_empty() {
        // Held open, never accepted from, until the sink is killed.
        handles.push(std::thread::spawn(move || {
            let _held = stalled;
            loop {
                std::thread::park();
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// Makes every datagram of `socket` carry a destination-options header
/// holding one PadN option (8 bytes in all; the kernel fills next-header).
fn set_dest_opts(socket: &UdpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const IPV6_DSTOPTS: libc::c_int = 59;
    let header: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
    // SAFETY: an 8-byte option buffer of the declared length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IPV6,
            IPV6_DSTOPTS,
            header.as_ptr() as *const libc::c_void,
            header.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
