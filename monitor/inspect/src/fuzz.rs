//! Entry points for fuzzing the parsers, shared by the cargo-fuzz targets
//! (`monitor/fuzz/fuzz_targets/*.rs`) and the corpus replay that runs under
//! plain `cargo test`.
//!
//! Owns: one function per fuzz target that feeds arbitrary bytes to every
//! parser of its protocol (or to the identifier matcher of [`leaks`]) and
//! checks what must hold whatever the input (beyond not panicking): host
//! names come out normalised, DNS names are bounded, the DNS cache stays
//! within its capacity, the TCP framing of DNS agrees with the bare
//! message, and an identifier put into a payload is found there. A broken
//! invariant panics, which the fuzzer reports as a crash.

use super::leaks::{Form, Found, Matcher, MIN_VALUE_LEN};
use super::{classify, dns, host_from_payload, http, normalize_host, quic, tls, HostSource};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use monitor_common::{PROTO_TCP, PROTO_UDP};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

/// The fuzz targets, by name (the directory names under
/// `monitor/fuzz/corpus/`).
pub const TARGETS: [&str; 5] = ["dns", "tls", "http", "quic", "leaks"];

/// Runs the target called `name` on `data`; false if there is no such
/// target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "dns" => dns_target(data),
        "tls" => tls_target(data),
        "http" => http_target(data),
        "quic" => quic_target(data),
        "leaks" => leaks_target(data),
        _ => return false,
    }
    true
}

fn check_host(host: &str) {
    assert_eq!(
        normalize_host(host.as_bytes()).as_deref(),
        Some(host),
        "host names come out normalised"
    );
}

fn check_payload(data: &[u8]) {
    for proto in [PROTO_TCP, PROTO_UDP, 1] {
        for port in [53, 80, 443, 5353, 9999] {
            let _ = classify(proto, port, data);
            if let Some((host, source)) = host_from_payload(proto, port, data) {
                assert_ne!(source, HostSource::Dns);
                if source == HostSource::Sni {
                    check_host(&host);
                }
            }
        }
    }
}

/// DNS: parse bare and framed, resolve CNAME chains, fill a small cache.
pub fn dns_target(data: &[u8]) {
    let msg = dns::parse(data);
    if let Some(msg) = &msg {
        // Escaping at most quadruples the 255 bytes of a wire name.
        for q in &msg.questions {
            assert!(!q.name.is_empty() && q.name.len() <= 4 * 255);
        }
        for res in msg.resolutions() {
            assert!(!res.query.is_empty() && !res.name.is_empty());
            assert!(res.query.len() <= 4 * 255 && res.name.len() <= 4 * 255);
        }
    }
    if let Ok(len) = u16::try_from(data.len()) {
        if data.len() >= 12 {
            let mut framed = len.to_be_bytes().to_vec();
            framed.extend_from_slice(data);
            assert_eq!(dns::parse_tcp(&framed), msg, "TCP framing agrees");
        }
    }
    let _ = dns::parse_tcp(data);
    let now = Instant::now();
    let mut cache = dns::DnsCache::new(dns::DnsCacheOptions {
        capacity: 4,
        per_uid: 2,
        min_ttl: Duration::from_secs(1),
        max_ttl: Duration::from_secs(60),
    });
    for (uid, proto) in [(1, PROTO_UDP), (2, PROTO_TCP), (3, PROTO_UDP)] {
        cache.observe_payload(uid, proto, data, now);
        assert!(cache.len() <= 4);
        assert!(cache.held_by(uid) <= 2);
    }
    if let Some(msg) = &msg {
        for res in msg.resolutions() {
            let _ = cache.lookup(9, res.addr, now);
        }
    }
    let _ = cache.lookup(1, IpAddr::V4(Ipv4Addr::LOCALHOST), now);
    cache.purge_expired(now + Duration::from_secs(61));
    assert!(cache.is_empty(), "everything expires by the ceiling");
    check_payload(data);
}

/// TLS: record detection and the ClientHello server_name, with and without
/// the record layer.
pub fn tls_target(data: &[u8]) {
    if let Some(host) = tls::sni(data) {
        assert!(tls::is_client_hello(data));
        check_host(&host);
    }
    if let Some(host) = tls::client_hello_sni(data) {
        check_host(&host);
    }
    let _ = tls::is_record(data);
    check_payload(data);
}

/// HTTP: request line and Host.
pub fn http_target(data: &[u8]) {
    let line = http::request_line(data);
    assert_eq!(line.is_some(), http::is_request(data));
    if let Some(host) = http::host(data) {
        assert!(line.is_some());
        assert!(!host.is_empty());
        assert!(!host.contains(|c: char| c.is_whitespace() || c.is_control()));
    }
    check_payload(data);
}

/// QUIC: long header, Initial decryption, CRYPTO reassembly, SNI.
pub fn quic_target(data: &[u8]) {
    if let Some(initial) = quic::decrypt_initial(data) {
        assert!(quic::is_initial(data));
        let stream = quic::crypto_stream(&initial.plaintext);
        assert!(stream.len() <= 16 * 1024);
    }
    if let Some(host) = quic::sni(data) {
        check_host(&host);
    }
    let _ = quic::crypto_stream(data);
    check_payload(data);
}

/// Identifiers every leaks input is searched for, besides its own: one
/// of each shape the matcher treats apart, and one too short to match.
const LEAK_IDENTIFIERS: [(&str, &str); 5] = [
    ("imei", "356938035643809"),
    ("mac", "02:42:ac:11:00:02"),
    ("serial", "R58M12ABCDE"),
    ("android_id", "9774d56d682e549c"),
    ("pin", "12345"),
];

/// Splits a leaks input. Its first byte says how many identifiers of its
/// own it names (0 to 3, the byte modulo 4), each a length byte (modulo
/// 64) and that many bytes of value (lossy UTF-8); the rest is the
/// payload. Returns the fixed identifiers followed by those.
fn leak_input(data: &[u8]) -> (Vec<(String, String)>, &[u8]) {
    let mut ids: Vec<(String, String)> = LEAK_IDENTIFIERS
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let Some((&count, mut rest)) = data.split_first() else {
        return (ids, data);
    };
    for i in 0..count % 4 {
        let Some((&len, after)) = rest.split_first() else {
            break;
        };
        let (value, after) = after.split_at(usize::from(len % 64).min(after.len()));
        let value = String::from_utf8_lossy(value).into_owned();
        ids.push((format!("input{i}"), value));
        rest = after;
    }
    (ids, rest)
}

/// Leaks: the identifiers an input names, searched for in the rest of it,
/// then in that payload with each value added plainly and base64-encoded.
pub fn leaks_target(data: &[u8]) {
    let (ids, payload) = leak_input(data);
    let values: Vec<&[u8]> = ids.iter().map(|(_, v)| v.trim().as_bytes()).collect();
    let (matcher, skipped) = Matcher::new(&ids);
    let short: Vec<&String> = ids
        .iter()
        .zip(&values)
        .filter(|(_, v)| v.len() < MIN_VALUE_LEN)
        .map(|((name, _), _)| name)
        .collect();
    assert_eq!(
        skipped.iter().collect::<Vec<_>>(),
        short,
        "the short ones skipped"
    );
    assert!(!matcher.is_empty(), "the fixed identifiers are long enough");
    let found = matcher.find(payload);
    assert!(found.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
    for f in &found {
        let value = values.get(f.identifier).expect("an index into the list");
        assert!(value.len() >= MIN_VALUE_LEN, "a skipped value is not found");
    }
    for (identifier, value) in values.iter().enumerate() {
        if value.len() < MIN_VALUE_LEN {
            continue;
        }
        let plain = Found {
            identifier,
            form: Form::Plain,
        };
        let spelled = [
            value.to_vec(),
            value.to_ascii_lowercase(),
            value.to_ascii_uppercase(),
        ];
        if found.contains(&plain) {
            assert!(spelled.iter().any(|s| contains(payload, s)), "plain: there");
        }
        if contains(payload, value) {
            assert!(found.contains(&plain), "plain: there, so found");
        }
        let added = [payload, value].concat();
        assert!(matcher.find(&added).contains(&plain), "plain: added");
        // From 7 bytes on, every alignment keeps a long enough run.
        if value.len() >= 7 {
            let base64 = Found {
                identifier,
                form: Form::Base64,
            };
            for k in 0..3 {
                let before = payload.get(..k).unwrap_or(&b"xy"[..k]);
                let encoded = STANDARD.encode([before, value, payload].concat());
                assert!(matcher.find(encoded.as_bytes()).contains(&base64), "base64");
            }
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn corpus_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
    }

    /// Every file of every seed corpus (and whatever a fuzzing run found
    /// and someone committed there) goes through its target.
    #[test]
    fn replay_fuzz_corpora() {
        let mut total = 0;
        for target in TARGETS {
            let dir = corpus_root().join(target);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            assert!(files.len() >= 3, "{target}: at least 3 seeds");
            for file in files {
                let data = std::fs::read(&file).unwrap();
                assert!(run(target, &data), "{target}");
                total += 1;
            }
        }
        assert!(total >= 12);
        assert!(!run("nope", b""));
    }

    /// Seeds must exercise the paths that matter, not just exist.
    #[test]
    fn seeds_reach_the_interesting_paths() {
        let read = |t: &str, f: &str| std::fs::read(corpus_root().join(t).join(f)).unwrap();
        assert_eq!(
            quic::sni(&read("quic", "rfc9001-a2-client-initial")).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            quic::sni(&read("quic", "rfc9001-a2-first-512")).as_deref(),
            Some("example.com")
        );
        assert_eq!(
            tls::sni(&read("tls", "sni-last-fragmented")).as_deref(),
            Some("fragmented.example.org")
        );
        assert_eq!(
            http::host(&read("http", "post-activation")).as_deref(),
            Some("zzhc.example.cn")
        );
        assert_eq!(
            dns::parse(&read("dns", "response-cname-chain"))
                .unwrap()
                .resolutions()
                .len(),
            2
        );
        let leaks = |seed: &str| {
            let data = read("leaks", seed);
            let (ids, payload) = leak_input(&data);
            Matcher::new(&ids)
                .0
                .find(payload)
                .into_iter()
                .map(|f| (ids[f.identifier].0.clone(), f.form))
                .collect::<Vec<_>>()
        };
        let at = |name: &str, form| (name.to_string(), form);
        assert_eq!(
            leaks("http-form-imei-md5"),
            [at("imei", Form::Plain), at("imei", Form::Md5)]
        );
        assert_eq!(leaks("json-base64-serial"), [at("serial", Form::Base64)]);
        assert_eq!(
            leaks("query-mac-hex-urlencoded"),
            [at("mac", Form::Hex), at("mac", Form::Urlencoded)]
        );
        assert_eq!(
            leaks("own-identifier-upper"),
            [at("input0", Form::Plain), at("input1", Form::Sha1)]
        );
    }

    /// The seed corpora are what the builders below make, byte for byte.
    /// After changing a builder, rewrite them with
    /// `EGRESSMON_WRITE_FIXTURES=1 cargo test -p monitor --lib seed_corpora`.
    #[test]
    fn seed_corpora_match_their_builders() {
        use crate::dns::build as d;
        use crate::quic::build as q;
        use crate::tls::build as t;
        let rewrite = std::env::var_os("EGRESSMON_WRITE_FIXTURES").is_some();
        let write = |target: &str, name: &str, bytes: &[u8]| {
            let dir = corpus_root().join(target);
            if rewrite {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(name), bytes).unwrap();
            } else {
                let stored = std::fs::read(dir.join(name))
                    .unwrap_or_else(|e| panic!("seed {target}/{name}: {e}"));
                assert!(
                    stored == bytes,
                    "seed {target}/{name} differs from its builder: rewrite the corpora"
                );
            }
        };
        let v4 = |s: &str| s.parse::<Ipv4Addr>().unwrap();

        write(
            "dns",
            "query-a",
            &d::query(0x2b1c, "zzhc.example.cn", dns::TYPE_A),
        );
        write(
            "dns",
            "query-aaaa",
            &d::query(7, "www.example.org", dns::TYPE_AAAA),
        );
        let chain = d::response(
            0x2b1c,
            "www.example.org",
            &["edge.cdn.example.net"],
            &[v4("192.0.2.10")],
            300,
        );
        let mut chain2 = chain.clone();
        d::record(
            &mut chain2,
            d::Owner::Pointer(12),
            dns::TYPE_A,
            30,
            &[192, 0, 2, 11],
        );
        chain2[7] += 1;
        write("dns", "response-cname-chain", &chain2);
        write("dns", "response-tcp-framed", &d::tcp(&chain));
        write("dns", "response-truncated", &chain[..chain.len() - 3]);
        let mut nx = d::response(3, "gone.example", &[], &[], 0);
        nx[3] = 0x83;
        write("dns", "response-nxdomain", &nx);
        let mut aaaa = d::header(9, 0x8400, 0, 1);
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        addr[15] = 0x42;
        d::record(
            &mut aaaa,
            d::Owner::Name("printer.local"),
            dns::TYPE_AAAA,
            120,
            &addr,
        );
        write("dns", "mdns-announcement", &aaaa);
        let mut looped = d::header(1, 0x8180, 1, 0);
        looped.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        write("dns", "pointer-loop", &looped);

        write(
            "tls",
            "sni-first",
            &t::records(&t::typical("www.example.com", true), 16384),
        );
        write(
            "tls",
            "sni-last-fragmented",
            &t::records(&t::typical("fragmented.example.org", false), 200),
        );
        let late = t::records(&t::typical("late.example.net", false), 16384);
        write("tls", "sni-beyond-capture", &late[..late.len().min(300)]);
        write(
            "tls",
            "no-sni",
            &t::records(&t::client_hello(&[(10, vec![0, 2, 0, 0x1d])]), 16384),
        );
        write(
            "tls",
            "server-hello-header",
            &[22, 3, 3, 0, 0x5a, 2, 0, 0, 0x56, 3, 3],
        );

        write(
            "http",
            "post-activation",
            b"POST /activate HTTP/1.1\r\nHost: zzhc.example.cn:80\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 34\r\n\r\nimei=356938035643809&model=TA-1046",
        );
        write(
            "http",
            "get-ipv6-host",
            b"GET /index.html HTTP/1.0\r\nhost: [2001:db8::1]:8080\r\nAccept: */*\r\n\r\n",
        );
        write(
            "http",
            "connect",
            b"CONNECT secure.example.com:443 HTTP/1.1\r\n\r\n",
        );
        write(
            "http",
            "absolute-form",
            b"GET http://proxy.example.com/x?y=1 HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
        );
        let long = format!(
            "GET /{} HTTP/1.1\r\nHost: cut.example\r\n\r\n",
            "a".repeat(600)
        );
        write("http", "truncated-request-line", &long.as_bytes()[..512]);
        write(
            "http",
            "ssdp-m-search",
            b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nMAN: \"ssdp:discover\"\r\nMX: 1\r\nST: ssdp:all\r\n\r\n",
        );

        let rfc = q::hex(include_str!("testdata/rfc9001-a2-client-initial.hex"));
        write("quic", "rfc9001-a2-client-initial", &rfc);
        write("quic", "rfc9001-a2-first-512", &rfc[..512]);
        write(
            "quic",
            "rfc9369-a2-v2-first-512",
            &q::hex(include_str!("testdata/rfc9369-a2-client-initial.hex"))[..512],
        );
        let ch = t::typical("quic.example.org", false);
        let mut frames = q::crypto_frame(200, &ch[200..]);
        frames.extend([0x01, 0x00, 0x00]);
        frames.extend(q::crypto_frame(0, &ch[..200]));
        frames.extend([0x02, 3, 0, 0, 0]);
        let reordered = q::initial(quic::VERSION_1, &[0x5a; 8], &frames, 0);
        write("quic", "reordered-crypto-first-512", &reordered[..512]);
        write("quic", "reordered-crypto-whole", &reordered);

        // Leaks seeds: a first byte of 0 names no identifier of its own.
        write(
            "leaks",
            "http-form-imei-md5",
            b"\x00POST /a HTTP/1.1\r\nHost: t.example\r\n\r\nimei=356938035643809&sig=AF2D48F2495881AED1737BB21017F9B6",
        );
        let blob = STANDARD.encode(r#"{"serial":"R58M12ABCDE","os":"14"}"#);
        write(
            "leaks",
            "json-base64-serial",
            format!(
                "\x00{{\"v\":2,\"blob\":\"{}\"}}",
                blob.trim_end_matches('=')
            )
            .as_bytes(),
        );
        write(
            "leaks",
            "query-mac-hex-urlencoded",
            b"\x00GET /c?m=02%3A42%3Aac%3A11%3A00%3A02&h=0242AC110002 HTTP/1.1\r\n\r\n",
        );
        // Two of its own: a hex id, and a name whose SHA-1 is sent.
        write(
            "leaks",
            "own-identifier-upper",
            b"\x02\x10f00dfacecafebeef\x0aPixel Jo 7id=F00DFACECAFEBEEF&u=630C4780353B4F037C053451BF31AF60C019D465",
        );
    }
}
