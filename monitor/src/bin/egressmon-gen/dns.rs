//! A tiny DNS server and stub resolver for test networks: the server answers
//! A queries from a fixed zone (name=ipv4 pairs), the resolver sends one
//! query over UDP and returns the first A record. Enough to make a test
//! process resolve a name through a real DNS exchange the kernel sees.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

/// Encodes `name` as DNS labels.
fn labels(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

/// Reads an uncompressed name at `pos`; returns it and the position after.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut parts = Vec::new();
    loop {
        let len = *msg.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            return Some((parts.join("."), pos));
        }
        if len & 0xc0 != 0 {
            return None;
        }
        parts.push(String::from_utf8_lossy(msg.get(pos..pos + len)?).into_owned());
        pos += len;
    }
}

pub fn query(id: u16, name: &str) -> Vec<u8> {
    let mut msg = Vec::new();
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD, 1 question
    msg.extend_from_slice(&labels(name));
    msg.extend_from_slice(&[0, 1, 0, 1]); // A, IN
    msg
}

/// The response to `request` from `zone` (NXDOMAIN for unknown names).
pub fn answer(request: &[u8], zone: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    if request.len() < 12 {
        return None;
    }
    let (name, end) = read_name(request, 12)?;
    let question = request.get(12..end + 4)?;
    let found = zone.get(&name.to_ascii_lowercase());
    let mut msg = Vec::new();
    msg.extend_from_slice(&request[..2]);
    msg.extend_from_slice(&[0x81, if found.is_some() { 0x80 } else { 0x83 }]);
    msg.extend_from_slice(&[0, 1, 0, found.is_some() as u8, 0, 0, 0, 0]);
    msg.extend_from_slice(question);
    if let Some(ip) = found {
        msg.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]); // pointer to the question name
        msg.extend_from_slice(&300u32.to_be_bytes());
        msg.extend_from_slice(&[0, 4]);
        msg.extend_from_slice(&ip.octets());
    }
    Some(msg)
}

/// Parses `name=ipv4` pairs.
pub fn parse_zone(entries: &[String]) -> Result<HashMap<String, Ipv4Addr>> {
    entries
        .iter()
        .map(|e| {
            let (name, ip) = e
                .split_once('=')
                .context("zone entries look like name=10.0.0.1")?;
            Ok((
                name.to_ascii_lowercase(),
                ip.parse()
                    .with_context(|| format!("bad IPv4 address in {e}"))?,
            ))
        })
        .collect()
}

pub fn serve(
    listen: SocketAddr,
    zone: HashMap<String, Ipv4Addr>,
) -> Result<std::thread::JoinHandle<()>> {
    let socket = UdpSocket::bind(listen).with_context(|| format!("bind dns {listen}"))?;
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if let Some(reply) = answer(&buf[..n], &zone) {
                let _ = socket.send_to(&reply, peer);
            }
        }
    }))
}

/// Resolves `name` with one UDP query to `resolver`.
pub fn resolve(resolver: SocketAddr, name: &str) -> Result<Ipv4Addr> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(3)))?;
    socket.send_to(&query(0x4242, name), resolver)?;
    let mut buf = [0u8; 512];
    let (n, _) = socket
        .recv_from(&mut buf)
        .with_context(|| format!("no answer from {resolver} for {name}"))?;
    let msg = &buf[..n];
    if msg.len() < 12 || msg[3] & 0x0f != 0 || u16::from_be_bytes([msg[6], msg[7]]) == 0 {
        bail!("{resolver} has no A record for {name}");
    }
    let (_, end) = read_name(msg, 12).context("malformed answer")?;
    let rdata = msg
        .get(end + 4 + 12..end + 4 + 16)
        .context("truncated answer")?;
    Ok(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_what_the_zone_holds() {
        let zone = parse_zone(&["zzhc.example.cn=10.200.0.2".into()]).unwrap();
        let reply = answer(&query(7, "zzhc.example.cn"), &zone).unwrap();
        assert_eq!(&reply[..2], &7u16.to_be_bytes());
        assert_eq!(&reply[reply.len() - 4..], &[10, 200, 0, 2]);
        let nx = answer(&query(8, "other.example"), &zone).unwrap();
        assert_eq!(nx[3] & 0x0f, 3, "NXDOMAIN");
    }
}
