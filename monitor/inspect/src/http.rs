//! The host a cleartext HTTP/1.x request is for.
//!
//! Owns: recognising an HTTP/1.x request from its first bytes (the request
//! line `METHOD SP request-target SP HTTP/1.x`, RFC 9112 3) and reading its
//! Host header (name matched case-insensitively, value trimmed, port and
//! IPv6 brackets stripped), falling back to the authority of an
//! absolute-form or authority-form (CONNECT) request target.
//!
//! Only the first bytes of a flow are captured (512): a request line cut
//! short is still recognised when its method is a well-known one, and a
//! header line counts only when its end (LF) was captured, so a cut-off
//! Host value is never mistaken for a whole one. Nothing here panics.

use super::normalize_host;

/// Methods of RFC 9110 and the common WebDAV ones.
const KNOWN_METHODS: &[&str] = &[
    "GET",
    "HEAD",
    "POST",
    "PUT",
    "DELETE",
    "CONNECT",
    "OPTIONS",
    "TRACE",
    "PATCH",
    "PROPFIND",
    "PROPPATCH",
    "MKCOL",
    "COPY",
    "MOVE",
    "LOCK",
    "UNLOCK",
    "REPORT",
    "SEARCH",
    // SSDP and other HTTP-over-UDP discovery
    "M-SEARCH",
    "NOTIFY",
];
/// Longest method token accepted for methods not in the list.
const MAX_METHOD: usize = 24;

/// The parts of a request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    pub target: &'a str,
    /// "HTTP/1.0" or "HTTP/1.1"; None if the line was cut off before it.
    pub version: Option<&'a str>,
}

/// Whether `data` starts with an HTTP/1.x request.
pub fn is_request(data: &[u8]) -> bool {
    request_line(data).is_some()
}

/// The request line at the start of `data`. A complete line needs any
/// token method, a target and `HTTP/1.x`; a line cut off by the end of the
/// capture is accepted if its method is a well-known one and a target has
/// begun.
pub fn request_line(data: &[u8]) -> Option<RequestLine<'_>> {
    let (line, complete) = match data.iter().position(|&b| b == b'\n') {
        Some(end) => (strip_cr(&data[..end]), true),
        None => (data, false),
    };
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.splitn(3, ' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next();
    let known = KNOWN_METHODS.contains(&method);
    if !known && !is_token(method) {
        return None;
    }
    if target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return None;
    }
    match version {
        Some(v) if is_http1(v) => {}
        // Cut off inside the version: accept a prefix of "HTTP/1.x".
        Some(v) if !complete && known && "HTTP/1.1".starts_with(v) => {
            return Some(RequestLine {
                method,
                target,
                version: None,
            });
        }
        Some(_) => return None,
        None if !complete && known => {}
        None => return None,
    }
    Some(RequestLine {
        method,
        target,
        version: version.filter(|v| is_http1(v)),
    })
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_METHOD
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
}

fn is_http1(v: &str) -> bool {
    v.len() == 8 && v.starts_with("HTTP/1.") && v.as_bytes()[7].is_ascii_digit()
}

/// The host an HTTP/1.x request is for: its Host header, else the authority
/// of an absolute-form or CONNECT target. Lowercase, without port.
pub fn host(data: &[u8]) -> Option<String> {
    let line = request_line(data)?;
    let mut rest = data;
    // Skip the request line; header lines follow, each ending in LF.
    let mut first = true;
    while let Some(end) = rest.iter().position(|&b| b == b'\n') {
        let header = strip_cr(&rest[..end]);
        rest = &rest[end + 1..];
        if first {
            first = false;
            continue;
        }
        if header.is_empty() {
            break; // end of the header block
        }
        if let Some(value) = header_value(header, b"host") {
            return authority_host(trim(value));
        }
    }
    target_host(line.method, line.target)
}

/// The value of `header` if its name is `name` (case-insensitively).
fn header_value<'a>(header: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let colon = header.iter().position(|&b| b == b':')?;
    header[..colon]
        .eq_ignore_ascii_case(name)
        .then(|| &header[colon + 1..])
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// `host`, `host:port`, `[v6]` or `[v6]:port` -> the host. Userinfo
/// (`user@host`) is dropped.
fn authority_host(authority: &[u8]) -> Option<String> {
    let authority = match authority.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    if let Some(rest) = authority.strip_prefix(b"[") {
        let close = rest.iter().position(|&b| b == b']')?;
        let after = &rest[close + 1..];
        if !(after.is_empty() || valid_port(after)) {
            return None;
        }
        let v6 = std::str::from_utf8(&rest[..close]).ok()?;
        let addr: std::net::Ipv6Addr = v6.parse().ok()?;
        return Some(addr.to_string());
    }
    let host = match authority.iter().position(|&b| b == b':') {
        Some(colon) => {
            if !valid_port(&authority[colon..]) {
                return None;
            }
            &authority[..colon]
        }
        None => authority,
    };
    normalize_host(host)
}

/// `:` followed by 0-5 digits (an empty port is allowed by RFC 3986).
fn valid_port(p: &[u8]) -> bool {
    p.first() == Some(&b':') && p.len() <= 6 && p[1..].iter().all(u8::is_ascii_digit)
}

fn target_host(method: &str, target: &str) -> Option<String> {
    if method == "CONNECT" {
        return authority_host(target.as_bytes());
    }
    let lower = target.get(..8).map(str::to_ascii_lowercase)?;
    let rest = if lower.starts_with("http://") {
        &target[7..]
    } else if lower.starts_with("https://") {
        &target[8..]
    } else {
        return None;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    authority_host(&rest.as_bytes()[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_header_is_read_case_insensitively_without_port() {
        let req = b"POST /activate HTTP/1.1\r\nUser-Agent: x\r\nhOsT:  ZZHC.Example.CN:8080 \r\nContent-Length: 5\r\n\r\nhello";
        assert!(is_request(req));
        assert_eq!(host(req).as_deref(), Some("zzhc.example.cn"));
        let req = b"GET / HTTP/1.0\nHost: plain.test\n\n";
        assert_eq!(host(req).as_deref(), Some("plain.test"));
    }

    #[test]
    fn ipv6_and_ipv4_literals() {
        let req = b"GET / HTTP/1.1\r\nHost: [2001:DB8::1]:80\r\n\r\n";
        assert_eq!(host(req).as_deref(), Some("2001:db8::1"));
        let req = b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n";
        assert_eq!(host(req).as_deref(), Some("192.0.2.1"));
        let req = b"GET / HTTP/1.1\r\nHost: [nonsense]\r\n\r\n";
        assert_eq!(host(req), None);
    }

    #[test]
    fn absolute_and_connect_targets_are_a_fallback() {
        let req = b"GET http://Proxy.Target.test:8080/x?y HTTP/1.1\r\n\r\n";
        assert_eq!(host(req).as_deref(), Some("proxy.target.test"));
        let req = b"CONNECT secure.test:443 HTTP/1.1\r\n\r\n";
        assert_eq!(host(req).as_deref(), Some("secure.test"));
        let req = b"GET /relative HTTP/1.1\r\nAccept: */*\r\n\r\n";
        assert!(is_request(req));
        assert_eq!(host(req), None);
        // The Host header wins over the target.
        let req = b"GET http://a.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n";
        assert_eq!(host(req).as_deref(), Some("b.test"));
    }

    #[test]
    fn request_line_checks() {
        assert_eq!(
            request_line(b"PROPFIND /dav HTTP/1.1\r\n"),
            Some(RequestLine {
                method: "PROPFIND",
                target: "/dav",
                version: Some("HTTP/1.1")
            })
        );
        assert!(is_request(b"BREW /pot HTTP/1.1\r\n"), "any token method");
        assert!(!is_request(b"BREW /pot HTTP/2.0\r\n"));
        assert!(!is_request(b"get / HTTP/1.1\r\n"), "methods are uppercase");
        assert!(!is_request(b"GET  / HTTP/1.1\r\n"), "empty target");
        assert!(!is_request(b"GET / HTTP/1.1 extra\r\n"));
        assert!(!is_request(b"SSH-2.0-OpenSSH_9.2\r\n"));
        assert!(!is_request(b"\x16\x03\x01\x02\x00\x01"));
        assert!(!is_request(b""));
        // SSDP over UDP is HTTP-formatted.
        assert!(is_request(
            b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n\r\n"
        ));
    }

    #[test]
    fn truncated_requests() {
        // A long URL cut off by the capture: still HTTP, host unknown.
        let req = format!("GET /{} HTTP/1.1\r\nHost: late.test\r\n", "a".repeat(600));
        let cut = &req.as_bytes()[..512];
        assert!(is_request(cut));
        assert_eq!(request_line(cut).unwrap().version, None);
        assert_eq!(host(cut), None);
        assert!(is_request(b"GET /x HTT"));
        assert!(
            !is_request(b"BREW /x HTT"),
            "unknown methods need a full line"
        );
        // A Host line without its end does not count.
        let req = b"GET / HTTP/1.1\r\nHost: exam";
        assert_eq!(host(req), None);
        let req = b"GET / HTTP/1.1\r\nHost: example.test\r";
        assert_eq!(host(req), None);
        let full =
            b"POST /upload HTTP/1.1\r\nHost: cut.test\r\nContent-Type: text/plain\r\n\r\nbody";
        for n in 0..=full.len() {
            if let Some(h) = host(&full[..n]) {
                assert_eq!(h, "cut.test");
            }
        }
    }

    #[test]
    fn bad_host_values() {
        for value in ["", "a b", "x:99999999", "x:port", "bad\x01.test"] {
            let req = format!("GET / HTTP/1.1\r\nHost: {value}\r\n\r\n");
            assert_eq!(host(req.as_bytes()), None, "{value:?}");
        }
        let req = b"GET / HTTP/1.1\r\nHost: user@real.test:81\r\n\r\n";
        assert_eq!(host(req).as_deref(), Some("real.test"));
    }
}
