//! The server name in a QUIC client's first packet.
//!
//! Owns: parsing a QUIC long header (RFC 9000 17.2), deriving the client's
//! Initial keys from the Destination Connection ID (RFC 9001 5.2: HKDF-SHA256
//! with the version's salt, then HKDF-Expand-Label "client in", "quic key",
//! "quic iv", "quic hp"), removing header protection (RFC 9001 5.4: an
//! AES-128-ECB mask over a 16-byte sample), decrypting the payload
//! (AES-128-GCM, RFC 9001 5.3), walking its frames (PADDING, PING, ACK,
//! CRYPTO, CONNECTION_CLOSE), reassembling CRYPTO data by offset, and
//! reading the ClientHello's server_name with [`super::tls`]. QUIC v1
//! (RFC 9000) and v2 (RFC 9369: its own salt, labels and Initial type) are
//! decrypted; other versions are only recognised.
//!
//! The kernel copies only the first bytes of a datagram (512), while an
//! Initial is padded to at least 1200. When the whole packet is there the
//! payload is decrypted and authenticated; when it was cut short, the
//! captured prefix is decrypted with the GCM keystream (AES-CTR from
//! counter 2) without checking the tag, and the server name is taken only
//! if it parses as a whole name from that prefix. Nothing here panics.

use super::tls;
use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::Aes128;
use aes_gcm::aead::AeadInOut;
use aes_gcm::Aes128Gcm;
use hkdf::Hkdf;
use sha2::Sha256;

/// QUIC version 1 (RFC 9000).
pub const VERSION_1: u32 = 0x0000_0001;
/// QUIC version 2 (RFC 9369).
pub const VERSION_2: u32 = 0x6b33_43cf;

/// RFC 9001 5.2 initial_salt for version 1.
const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
/// RFC 9369 3.3.1 initial_salt for version 2.
const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb,
    0xf9, 0xbd, 0x2e, 0xd9,
];
const MAX_CID: usize = 20;
const SAMPLE_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// CRYPTO data reassembled at most: far more than any ClientHello.
const MAX_CRYPTO: u64 = 16 * 1024;
/// CRYPTO frames kept from one packet.
const MAX_CHUNKS: usize = 64;

/// The fields of a long header up to the (protected) packet number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongHeader<'a> {
    pub version: u32,
    pub dcid: &'a [u8],
    pub scid: &'a [u8],
    /// The two type bits of the first byte (their meaning depends on the
    /// version: Initial is 0 in v1 and 1 in v2).
    pub packet_type: u8,
    /// Token of an Initial packet (empty for other types).
    pub token: &'a [u8],
    /// The Length field: packet number and protected payload.
    pub length: usize,
    /// Offset of the packet number in the datagram.
    pub pn_offset: usize,
}

impl LongHeader<'_> {
    /// Whether this is an Initial packet of a version decrypted here.
    pub fn is_initial(&self) -> bool {
        initial_type(self.version) == Some(self.packet_type)
    }
}

fn initial_type(version: u32) -> Option<u8> {
    match version {
        VERSION_1 => Some(0),
        VERSION_2 => Some(1),
        _ => None,
    }
}

/// Whether `version` is one a client sends in a long header: v1, v2, the
/// IETF drafts (0xff0000xx) and Google QUIC over IETF headers ("Q0xx",
/// "T0xx").
pub fn is_known_version(version: u32) -> bool {
    let [a, b, _, _] = version.to_be_bytes();
    matches!(version, VERSION_1 | VERSION_2)
        || version >> 8 == 0x00ff_0000
        || (matches!(a, b'Q' | b'T') && b == b'0')
}

/// Reads a variable-length integer (RFC 9000 16) at `*pos`.
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *buf.get(*pos)?;
    let len = 1usize << (first >> 6);
    let bytes = buf.get(*pos..pos.checked_add(len)?)?;
    let mut v = u64::from(first & 0x3f);
    for &b in &bytes[1..] {
        v = v << 8 | u64::from(b);
    }
    *pos += len;
    Some(v)
}

/// Parses the long header at the start of a datagram: form and fixed bits
/// set, connection IDs of at most 20 bytes, and for Initial packets of v1
/// and v2 the token and Length. Version negotiation (version 0) is not a
/// client packet and is refused.
pub fn long_header(data: &[u8]) -> Option<LongHeader<'_>> {
    let first = *data.first()?;
    if first & 0xc0 != 0xc0 {
        return None;
    }
    let version = u32::from_be_bytes(data.get(1..5)?.try_into().ok()?);
    if version == 0 {
        return None;
    }
    let mut pos = 5;
    let dcid_len = usize::from(*data.get(pos)?);
    if dcid_len > MAX_CID {
        return None;
    }
    let dcid = data.get(pos + 1..pos + 1 + dcid_len)?;
    pos += 1 + dcid_len;
    let scid_len = usize::from(*data.get(pos)?);
    if scid_len > MAX_CID {
        return None;
    }
    let scid = data.get(pos + 1..pos + 1 + scid_len)?;
    pos += 1 + scid_len;
    let packet_type = (first >> 4) & 0x03;
    let mut header = LongHeader {
        version,
        dcid,
        scid,
        packet_type,
        token: &[],
        length: 0,
        pn_offset: pos,
    };
    if initial_type(version).is_some() {
        if header.is_initial() {
            let token_len = usize::try_from(varint(data, &mut pos)?).ok()?;
            header.token = data.get(pos..pos.checked_add(token_len)?)?;
            pos += token_len;
        }
        // Retry packets (type 3 in v1, 0 in v2) have no Length.
        let retry = if version == VERSION_2 { 0 } else { 3 };
        if packet_type != retry {
            header.length = usize::try_from(varint(data, &mut pos)?).ok()?;
        }
        header.pn_offset = pos;
    }
    Some(header)
}

/// Whether `data` starts with a QUIC long-header packet of a known version.
pub fn is_long_header(data: &[u8]) -> bool {
    long_header(data).is_some_and(|h| is_known_version(h.version))
}

/// Whether `data` starts with a QUIC v1 or v2 Initial packet.
pub fn is_initial(data: &[u8]) -> bool {
    long_header(data).is_some_and(|h| h.is_initial())
}

/// The client's Initial packet protection keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialKeys {
    pub key: [u8; 16],
    pub iv: [u8; 12],
    pub hp: [u8; 16],
}

/// HKDF-Expand-Label (RFC 8446 7.1) with an empty context.
fn expand_label(secret: &Hkdf<Sha256>, label: &str, out: &mut [u8]) {
    let full = format!("tls13 {label}");
    let mut info = Vec::with_capacity(4 + full.len());
    info.extend_from_slice(&(out.len() as u16).to_be_bytes());
    info.push(full.len() as u8);
    info.extend_from_slice(full.as_bytes());
    info.push(0);
    secret
        .expand(&info, out)
        .expect("QUIC key lengths are far below HKDF-SHA256's limit");
}

/// Derives the client's Initial keys of `version` from the Destination
/// Connection ID of the client's first Initial (RFC 9001 5.2, RFC 9369 3.3).
pub fn client_initial_keys(version: u32, dcid: &[u8]) -> Option<InitialKeys> {
    let (salt, prefix) = match version {
        VERSION_1 => (&SALT_V1, "quic"),
        VERSION_2 => (&SALT_V2, "quicv2"),
        _ => return None,
    };
    let initial = Hkdf::<Sha256>::new(Some(salt), dcid);
    let mut client_secret = [0u8; 32];
    expand_label(&initial, "client in", &mut client_secret);
    let client = Hkdf::<Sha256>::from_prk(&client_secret).ok()?;
    let mut keys = InitialKeys {
        key: [0; 16],
        iv: [0; 12],
        hp: [0; 16],
    };
    expand_label(&client, &format!("{prefix} key"), &mut keys.key);
    expand_label(&client, &format!("{prefix} iv"), &mut keys.iv);
    expand_label(&client, &format!("{prefix} hp"), &mut keys.hp);
    Some(keys)
}

/// AES-128-ECB of one block: the header protection mask (RFC 9001 5.4.3).
fn aes_block(key: &[u8; 16], block: &[u8; 16]) -> [u8; 16] {
    let cipher = Aes128::new(key.into());
    let mut b = (*block).into();
    cipher.encrypt_block(&mut b);
    b.into()
}

/// A decrypted Initial packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initial {
    pub version: u32,
    pub packet_number: u64,
    /// The decrypted frames (the captured prefix if `authenticated` is
    /// false).
    pub plaintext: Vec<u8>,
    /// True when the whole packet was there and its AEAD tag verified.
    pub authenticated: bool,
}

/// Removes the protection of the client Initial at the start of `data`.
/// Returns None if it is not a v1/v2 Initial, is too short to sample, or
/// (whole packets only) fails authentication.
pub fn decrypt_initial(data: &[u8]) -> Option<Initial> {
    let header = long_header(data)?;
    if !header.is_initial() {
        return None;
    }
    let keys = client_initial_keys(header.version, header.dcid)?;
    let pn_offset = header.pn_offset;
    let sample: [u8; SAMPLE_LEN] = data
        .get(pn_offset + 4..pn_offset + 4 + SAMPLE_LEN)?
        .try_into()
        .ok()?;
    if header.length < 4 + SAMPLE_LEN {
        return None;
    }
    let mask = aes_block(&keys.hp, &sample);
    let first = data[0] ^ (mask[0] & 0x0f);
    let pn_len = usize::from(first & 0x03) + 1;
    let mut packet_number = 0u64;
    let mut aad = data[..pn_offset + pn_len].to_vec();
    aad[0] = first;
    for i in 0..pn_len {
        aad[pn_offset + i] ^= mask[1 + i];
        packet_number = packet_number << 8 | u64::from(aad[pn_offset + i]);
    }
    let mut nonce = keys.iv;
    for (i, b) in packet_number.to_be_bytes().iter().enumerate() {
        nonce[4 + i] ^= b;
    }
    let payload_start = pn_offset + pn_len;
    let packet_end = pn_offset.checked_add(header.length)?;
    if packet_end < payload_start + TAG_LEN {
        return None;
    }
    let tag_start = packet_end - TAG_LEN;
    if data.len() >= packet_end {
        let mut plaintext = data[payload_start..tag_start].to_vec();
        let cipher = Aes128Gcm::new(&keys.key.into());
        let tag = data[tag_start..packet_end].try_into().ok()?;
        cipher
            .decrypt_inout_detached(&nonce.into(), &aad, plaintext.as_mut_slice().into(), tag)
            .ok()?;
        return Some(Initial {
            version: header.version,
            packet_number,
            plaintext,
            authenticated: true,
        });
    }
    let available = data.get(payload_start..data.len().min(tag_start))?;
    let mut plaintext = available.to_vec();
    gcm_keystream(&keys.key, &nonce, &mut plaintext);
    Some(Initial {
        version: header.version,
        packet_number,
        plaintext,
        authenticated: false,
    })
}

/// XORs `data` with the AES-GCM keystream of `nonce` (a 96-bit IV: counter
/// blocks nonce || n, starting at n = 2, NIST SP 800-38D 7.1). This is GCM
/// decryption without the tag check, for packets captured in part.
fn gcm_keystream(key: &[u8; 16], nonce: &[u8; 12], data: &mut [u8]) {
    let cipher = Aes128::new(key.into());
    for (i, chunk) in data.chunks_mut(16).enumerate() {
        let mut block = [0u8; 16];
        block[..12].copy_from_slice(nonce);
        block[12..].copy_from_slice(&(i as u32).wrapping_add(2).to_be_bytes());
        let mut b = block.into();
        cipher.encrypt_block(&mut b);
        let stream: [u8; 16] = b.into();
        for (d, k) in chunk.iter_mut().zip(stream) {
            *d ^= k;
        }
    }
}

/// The CRYPTO stream of one packet's frames, reassembled by offset from 0
/// as far as it is contiguous. Stops at the first frame it does not know
/// (frames allowed in Initial packets: PADDING, PING, ACK, CRYPTO,
/// CONNECTION_CLOSE). A CRYPTO frame cut short by the end of the capture
/// contributes what is there.
pub fn crypto_stream(frames: &[u8]) -> Vec<u8> {
    let mut chunks: Vec<(u64, &[u8])> = Vec::new();
    let mut pos = 0;
    while pos < frames.len() && chunks.len() < MAX_CHUNKS {
        let Some(frame_type) = varint(frames, &mut pos) else {
            break;
        };
        match frame_type {
            0x00 | 0x01 => {} // PADDING, PING
            0x02 | 0x03 => {
                // ACK: largest, delay, range count, first range, ranges, ECN.
                let mut ok = (0..2).all(|_| varint(frames, &mut pos).is_some());
                let count = if ok { varint(frames, &mut pos) } else { None };
                let Some(count) = count else { break };
                ok = varint(frames, &mut pos).is_some();
                let mut extra = count.saturating_mul(2);
                if frame_type == 0x03 {
                    extra = extra.saturating_add(3);
                }
                if extra > frames.len() as u64 {
                    break;
                }
                for _ in 0..extra {
                    ok = ok && varint(frames, &mut pos).is_some();
                }
                if !ok {
                    break;
                }
            }
            0x06 => {
                let (Some(offset), Some(len)) =
                    (varint(frames, &mut pos), varint(frames, &mut pos))
                else {
                    break;
                };
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                let end = pos.saturating_add(len).min(frames.len());
                let data = &frames[pos..end];
                pos = end;
                if offset < MAX_CRYPTO {
                    chunks.push((offset, data));
                }
            }
            _ => break, // CONNECTION_CLOSE ends the packet; others are not allowed.
        }
    }
    chunks.sort_by_key(|(offset, _)| *offset);
    let mut out: Vec<u8> = Vec::new();
    for (offset, data) in chunks {
        let have = out.len() as u64;
        if offset > have {
            break; // a gap
        }
        let skip = usize::try_from(have - offset).unwrap_or(usize::MAX);
        if skip < data.len() {
            let room = usize::try_from(MAX_CRYPTO - have).unwrap_or(0);
            let new = &data[skip..];
            out.extend_from_slice(&new[..new.len().min(room)]);
        }
    }
    out
}

/// The server_name of the ClientHello in the client Initial at the start of
/// a UDP datagram, or None if it is not one, cannot be decrypted, or the
/// name lies beyond the bytes captured.
pub fn sni(datagram: &[u8]) -> Option<String> {
    let initial = decrypt_initial(datagram)?;
    tls::client_hello_sni(&crypto_stream(&initial.plaintext))
}

/// Builds protected Initial packets for tests and fuzz seeds.
#[cfg(test)]
pub(crate) mod build {
    use super::*;

    pub fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn put_varint(out: &mut Vec<u8>, v: u64) {
        if v < 64 {
            out.push(v as u8);
        } else if v < 16384 {
            out.extend_from_slice(&(v as u16 | 0x4000).to_be_bytes());
        } else {
            out.extend_from_slice(&(v as u32 | 0x8000_0000).to_be_bytes());
        }
    }

    pub fn crypto_frame(offset: u64, data: &[u8]) -> Vec<u8> {
        let mut out = vec![0x06];
        put_varint(&mut out, offset);
        put_varint(&mut out, data.len() as u64);
        out.extend_from_slice(data);
        out
    }

    /// A protected client Initial of `version` with these frames, padded to
    /// 1200 bytes, packet number `pn` in 4 bytes.
    pub fn initial(version: u32, dcid: &[u8], frames: &[u8], pn: u32) -> Vec<u8> {
        let keys = client_initial_keys(version, dcid).unwrap();
        let type_bits = initial_type(version).unwrap();
        let mut header = vec![0xc3 | type_bits << 4];
        header.extend_from_slice(&version.to_be_bytes());
        header.push(dcid.len() as u8);
        header.extend_from_slice(dcid);
        header.push(0); // no SCID
        header.push(0); // no token
        let payload_len = (1200 - header.len() - 2 - 4 - TAG_LEN).max(frames.len());
        let mut payload = frames.to_vec();
        payload.resize(payload_len, 0);
        let length = 4 + payload_len + TAG_LEN;
        header.extend_from_slice(&(length as u16 | 0x4000).to_be_bytes());
        let pn_offset = header.len();
        header.extend_from_slice(&pn.to_be_bytes());
        let mut nonce = keys.iv;
        for (i, b) in u64::from(pn).to_be_bytes().iter().enumerate() {
            nonce[4 + i] ^= b;
        }
        let cipher = Aes128Gcm::new(&keys.key.into());
        let tag = cipher
            .encrypt_inout_detached(&nonce.into(), &header, payload.as_mut_slice().into())
            .unwrap();
        let mut packet = header;
        packet.extend_from_slice(&payload);
        packet.extend_from_slice(&tag);
        let sample: [u8; 16] = packet[pn_offset + 4..pn_offset + 20].try_into().unwrap();
        let mask = aes_block(&keys.hp, &sample);
        packet[0] ^= mask[0] & 0x0f;
        for i in 0..4 {
            packet[pn_offset + i] ^= mask[1 + i];
        }
        packet
    }
}

#[cfg(test)]
mod tests {
    use super::build::*;
    use super::*;
    use crate::tls::build as hello;

    /// RFC 9001 Appendix A.2: the client Initial (DCID 0x8394c8f03e515708,
    /// packet number 2) carrying a ClientHello for "example.com".
    fn rfc9001_packet() -> Vec<u8> {
        hex(include_str!("testdata/rfc9001-a2-client-initial.hex"))
    }

    /// RFC 9369 Appendix A.2: the same ClientHello in a QUIC v2 Initial.
    fn rfc9369_packet() -> Vec<u8> {
        hex(include_str!("testdata/rfc9369-a2-client-initial.hex"))
    }

    /// RFC 9001 Appendix A.2: the unprotected CRYPTO frame of that packet.
    const RFC9001_CRYPTO_FRAME: &str = "060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e86804fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578616d706c652e636f6dff01000100000a00080006001d0017001800100007000504616c706e000500050100000000003300260024001d00209370b2c9caa47fbabaf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b0003020304000d0010000e0403050306030203080408050806002d00020101001c00024001003900320408ffffffffffffffff05048000ffff07048000ffff0801100104800075300901100f088394c8f03e51570806048000ffff";

    #[test]
    fn rfc9001_a1_keys() {
        let keys = client_initial_keys(VERSION_1, &hex("8394c8f03e515708")).unwrap();
        assert_eq!(keys.key.to_vec(), hex("1f369613dd76d5467730efcbe3b1a22d"));
        assert_eq!(keys.iv.to_vec(), hex("fa044b2f42a3fd3b46fb255c"));
        assert_eq!(keys.hp.to_vec(), hex("9f50449e04a0e810283a1e9933adedd2"));
        let sample: [u8; 16] = hex("d1b1c98dd7689fb8ec11d242b123dc9b").try_into().unwrap();
        assert_eq!(aes_block(&keys.hp, &sample)[..5], hex("437b9aec36")[..]);
    }

    #[test]
    fn rfc9001_a2_client_initial_decrypts_to_example_com() {
        let packet = rfc9001_packet();
        assert_eq!(packet.len(), 1200);
        assert!(is_initial(&packet));
        assert!(is_long_header(&packet));
        let header = long_header(&packet).unwrap();
        assert_eq!(header.dcid, &hex("8394c8f03e515708")[..]);
        assert_eq!(header.length, 0x049e);
        let initial = decrypt_initial(&packet).unwrap();
        assert!(initial.authenticated);
        assert_eq!(initial.packet_number, 2);
        let frame = hex(RFC9001_CRYPTO_FRAME);
        assert_eq!(initial.plaintext[..frame.len()], frame[..]);
        assert!(initial.plaintext[frame.len()..].iter().all(|&b| b == 0));
        assert_eq!(sni(&packet).as_deref(), Some("example.com"));
    }

    #[test]
    fn rfc9369_a2_v2_client_initial_decrypts_to_example_com() {
        let packet = rfc9369_packet();
        let header = long_header(&packet).unwrap();
        assert_eq!(header.version, VERSION_2);
        assert!(header.is_initial());
        let initial = decrypt_initial(&packet).unwrap();
        assert!(initial.authenticated);
        assert_eq!(initial.packet_number, 2);
        assert_eq!(sni(&packet).as_deref(), Some("example.com"));
    }

    #[test]
    fn a_captured_prefix_decrypts_without_the_tag() {
        let packet = rfc9001_packet();
        let whole = decrypt_initial(&packet).unwrap();
        let cut = decrypt_initial(&packet[..512]).unwrap();
        assert!(!cut.authenticated);
        assert_eq!(cut.plaintext[..], whole.plaintext[..cut.plaintext.len()]);
        assert_eq!(sni(&packet[..512]).as_deref(), Some("example.com"));
        // The name's last byte is byte 95 of the packet (22 bytes of header,
        // then 73 of CRYPTO frame up to the end of "example.com").
        assert_eq!(sni(&packet[..95]).as_deref(), Some("example.com"));
        assert_eq!(sni(&packet[..94]), None);
        for n in 0..=packet.len() {
            if let Some(name) = sni(&packet[..n]) {
                assert_eq!(name, "example.com");
                assert!(n >= 95, "{n}");
            }
        }
    }

    #[test]
    fn tampering_with_a_whole_packet_fails_authentication() {
        let mut packet = rfc9001_packet();
        packet[600] ^= 1;
        assert!(decrypt_initial(&packet).is_none());
        assert_eq!(sni(&packet), None);
    }

    #[test]
    fn crypto_frames_out_of_order_are_reassembled() {
        let ch = hello::typical("quic.example.test", false);
        let (a, b) = ch.split_at(100);
        let (b, c) = b.split_at(150);
        let mut frames = vec![0x01]; // PING
        frames.extend(crypto_frame(250, c));
        frames.extend([0, 0, 0]); // PADDING
        frames.extend(crypto_frame(0, a));
        frames.extend([0x02, 5, 0, 0, 1]); // ACK
        frames.extend(crypto_frame(100, b));
        let packet = initial(VERSION_1, &[1, 2, 3, 4, 5, 6, 7, 8], &frames, 0);
        assert_eq!(packet.len(), 1200);
        assert_eq!(sni(&packet).as_deref(), Some("quic.example.test"));
        // Overlapping retransmitted data is fine too.
        let mut frames = crypto_frame(0, &ch[..200]);
        frames.extend(crypto_frame(150, &ch[150..]));
        let packet = initial(VERSION_2, &[9; 20], &frames, 7);
        assert_eq!(sni(&packet).as_deref(), Some("quic.example.test"));
    }

    #[test]
    fn a_gap_in_crypto_data_hides_the_name() {
        let ch = hello::typical("gap.test", false);
        let frames = crypto_frame(100, &ch[100..]);
        let packet = initial(VERSION_1, &[1; 8], &frames, 0);
        assert_eq!(sni(&packet), None);
        assert!(decrypt_initial(&packet).unwrap().authenticated);
    }

    #[test]
    fn other_packets_are_not_initials() {
        assert!(!is_initial(b""));
        assert!(!is_initial(&[0x40, 0, 0, 0, 1])); // short header
        let mut packet = rfc9001_packet();
        packet[0] = 0xe0 | (packet[0] & 0x0f); // Handshake type
        assert!(!is_initial(&packet));
        assert!(decrypt_initial(&packet).is_none());
        // Unknown versions are recognised as QUIC but not decrypted.
        let mut draft = rfc9001_packet();
        draft[1..5].copy_from_slice(&0xff00_001du32.to_be_bytes());
        assert!(is_long_header(&draft));
        assert!(!is_initial(&draft));
        assert_eq!(sni(&draft), None);
        let mut other = rfc9001_packet();
        other[1..5].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        assert!(!is_long_header(&other));
        // Version negotiation and oversized connection IDs.
        let mut vn = rfc9001_packet();
        vn[1..5].copy_from_slice(&[0; 4]);
        assert!(long_header(&vn).is_none());
        let mut big_cid = rfc9001_packet();
        big_cid[5] = 21;
        assert!(long_header(&big_cid).is_none());
    }

    #[test]
    fn hostile_frames_are_bounded() {
        // A CRYPTO frame claiming a huge offset or length.
        let mut frames = vec![0x06];
        frames.extend([0xff; 8]);
        frames.extend([0xbf, 0xff, 0xff, 0xff]);
        assert!(crypto_stream(&frames).is_empty());
        // An ACK with an absurd range count.
        let frames = [0x02, 0, 0, 0xbf, 0xff, 0xff, 0xff, 0];
        assert!(crypto_stream(&frames).is_empty());
        // Many tiny frames.
        let frames: Vec<u8> = (0..1000).flat_map(|_| crypto_frame(0, b"x")).collect();
        assert_eq!(crypto_stream(&frames), b"x");
    }

    #[test]
    fn every_prefix_and_many_bit_flips_are_safe() {
        let packet = rfc9001_packet();
        for n in 0..=packet.len() {
            let _ = sni(&packet[..n]);
        }
        for i in 0..64 {
            for bit in 0..8 {
                let mut p = packet[..512].to_vec();
                p[i] ^= 1 << bit;
                let _ = sni(&p);
            }
        }
    }
}
