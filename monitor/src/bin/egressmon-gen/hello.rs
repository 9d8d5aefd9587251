//! A TLS 1.3 ClientHello with a server_name, written by hand (RFC 8446
//! section 4.1.2 layout): what any HTTPS client sends first. Test processes
//! send it to a real TLS server so the kernel sees a genuine handshake start.

fn u16be(v: usize) -> [u8; 2] {
    (v as u16).to_be_bytes()
}

fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = kind.to_be_bytes().to_vec();
    out.extend_from_slice(&u16be(body.len()));
    out.extend_from_slice(body);
    out
}

/// The record carrying the ClientHello for `host`. `seed` varies the random
/// and key share bytes (they need not be secret for a test).
pub fn client_hello(host: &str, seed: u64) -> Vec<u8> {
    let mut bytes = seed.to_le_bytes().repeat(4);
    let random: Vec<u8> = bytes
        .iter()
        .map(|b| b.wrapping_mul(31).wrapping_add(7))
        .collect();
    bytes.reverse();
    let key_share: Vec<u8> = bytes
        .iter()
        .map(|b| b.wrapping_mul(17).wrapping_add(3))
        .collect();

    let mut server_name = Vec::new();
    server_name.extend_from_slice(&u16be(host.len() + 3));
    server_name.push(0); // host_name
    server_name.extend_from_slice(&u16be(host.len()));
    server_name.extend_from_slice(host.as_bytes());

    let mut share = vec![0x00, 0x1d]; // x25519
    share.extend_from_slice(&u16be(32));
    share.extend_from_slice(&key_share);
    let mut key_shares = u16be(share.len()).to_vec();
    key_shares.extend_from_slice(&share);

    let mut extensions = Vec::new();
    extensions.extend(extension(0x0000, &server_name));
    extensions.extend(extension(0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17])); // groups: x25519, P-256
    extensions.extend(extension(
        0x000d,
        &[0, 6, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01],
    )); // signature algorithms
    extensions.extend(extension(0x002b, &[2, 0x03, 0x04])); // supported_versions: TLS 1.3
    extensions.extend(extension(0x0033, &key_shares));

    let mut hello = vec![0x03, 0x03];
    hello.extend_from_slice(&random);
    hello.push(0); // no session id
    hello.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0x13, 0x03]);
    hello.extend_from_slice(&[1, 0]); // null compression
    hello.extend_from_slice(&u16be(extensions.len()));
    hello.extend_from_slice(&extensions);

    let mut handshake = vec![0x01, 0];
    handshake.extend_from_slice(&u16be(hello.len()));
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16be(handshake.len()));
    record.extend_from_slice(&handshake);
    record
}

#[cfg(test)]
mod tests {
    #[test]
    fn carries_the_host_name() {
        let hello = super::client_hello("app.example.org", 1);
        assert_eq!(&hello[..3], &[0x16, 0x03, 0x01]);
        assert_eq!(
            u16::from_be_bytes([hello[3], hello[4]]) as usize,
            hello.len() - 5
        );
        assert!(hello.windows(15).any(|w| w == b"app.example.org"));
    }
}
