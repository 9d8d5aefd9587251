//! The state files' encoding: LEB128 integers, length-prefixed strings,
//! written and read as a stream (a full flow map's state is megabytes: it
//! never sits in memory whole).

use monitor_common::{FlowKey, FlowValue};
use std::io::{self, BufRead, Write};

/// Writes values to a stream, a block at a time (a full map's state is
/// millions of small values: one write call each would cost more than the
/// encoding).
pub(crate) struct Enc<W: Write> {
    out: W,
    buf: Vec<u8>,
}

const BLOCK: usize = 1 << 16;

impl<W: Write> Enc<W> {
    pub(crate) fn new(out: W) -> Enc<W> {
        Enc {
            out,
            buf: Vec::with_capacity(BLOCK + 64),
        }
    }

    /// Writes what is buffered; returns the stream.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&self.buf)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn spill(&mut self) -> io::Result<()> {
        if self.buf.len() >= BLOCK {
            self.out.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    /// Bytes as they are.
    pub(crate) fn raw(&mut self, v: &[u8]) -> io::Result<()> {
        self.buf.extend_from_slice(v);
        self.spill()
    }

    pub(crate) fn u64(&mut self, mut v: u64) -> io::Result<()> {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
        self.spill()
    }

    pub(crate) fn u32(&mut self, v: u32) -> io::Result<()> {
        self.u64(v.into())
    }

    pub(crate) fn bool(&mut self, v: bool) -> io::Result<()> {
        self.u64(v.into())
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) -> io::Result<()> {
        self.u64(v.len() as u64)?;
        self.raw(v)
    }

    pub(crate) fn str(&mut self, v: &str) -> io::Result<()> {
        self.bytes(v.as_bytes())
    }

    pub(crate) fn opt_str(&mut self, v: Option<&str>) -> io::Result<()> {
        self.bool(v.is_some())?;
        v.map_or(Ok(()), |s| self.str(s))
    }

    pub(crate) fn strs<'a>(&mut self, v: impl ExactSizeIterator<Item = &'a str>) -> io::Result<()> {
        self.u64(v.len() as u64)?;
        v.into_iter().try_for_each(|s| self.str(s))
    }

    pub(crate) fn key(&mut self, k: &FlowKey) -> io::Result<()> {
        self.u32(k.uid)?;
        self.u32(k.port.into())?;
        self.u32(k.proto.into())?;
        self.u32(k.family.into())?;
        self.raw(&k.addr)
    }

    pub(crate) fn value(&mut self, v: &FlowValue) -> io::Result<()> {
        for n in [
            v.connects,
            v.udp_sends,
            v.tx_packets,
            v.tx_bytes,
            v.first_seen,
            v.last_seen,
        ] {
            self.u64(n)?;
        }
        Ok(())
    }
}

/// Reads what [`Enc`] wrote; anything short or malformed is an error (the
/// caller then starts without state).
pub(crate) struct Dec<R: BufRead>(pub(crate) R);

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Strings and lists in a state file are bounded: a damaged length must not
/// make the reader allocate gigabytes.
const MAX_LEN: u64 = 1 << 20;

impl<R: BufRead> Dec<R> {
    pub(crate) fn u64(&mut self) -> io::Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let mut byte = [0u8];
            self.0.read_exact(&mut byte)?;
            v |= u64::from(byte[0] & 0x7f) << shift;
            if byte[0] & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(bad("integer too long"))
    }

    pub(crate) fn u32(&mut self) -> io::Result<u32> {
        u32::try_from(self.u64()?).map_err(|_| bad("integer out of range"))
    }

    pub(crate) fn bool(&mut self) -> io::Result<bool> {
        match self.u64()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(bad("not a boolean")),
        }
    }

    /// A count of items that follow (bounded, see `MAX_LEN`).
    pub(crate) fn len(&mut self) -> io::Result<usize> {
        let n = self.u64()?;
        if n > MAX_LEN {
            return Err(bad("length out of range"));
        }
        Ok(n as usize)
    }

    pub(crate) fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let mut v = vec![0u8; self.len()?];
        self.0.read_exact(&mut v)?;
        Ok(v)
    }

    pub(crate) fn str(&mut self) -> io::Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| bad("not UTF-8"))
    }

    pub(crate) fn opt_str(&mut self) -> io::Result<Option<String>> {
        if self.bool()? {
            self.str().map(Some)
        } else {
            Ok(None)
        }
    }

    pub(crate) fn strs(&mut self) -> io::Result<Vec<String>> {
        (0..self.len()?).map(|_| self.str()).collect()
    }

    pub(crate) fn key(&mut self) -> io::Result<FlowKey> {
        let small = |v: u32, max: u32| {
            if v <= max {
                Ok(v)
            } else {
                Err(bad("flow key field out of range"))
            }
        };
        let uid = self.u32()?;
        let port = small(self.u32()?, u16::MAX.into())? as u16;
        let proto = small(self.u32()?, u8::MAX.into())? as u8;
        let family = small(self.u32()?, u8::MAX.into())? as u8;
        let mut addr = [0u8; 16];
        self.0.read_exact(&mut addr)?;
        Ok(FlowKey {
            uid,
            port,
            proto,
            family,
            addr,
        })
    }

    pub(crate) fn value(&mut self) -> io::Result<FlowValue> {
        Ok(FlowValue {
            connects: self.u64()?,
            udp_sends: self.u64()?,
            tx_packets: self.u64()?,
            tx_bytes: self.u64()?,
            first_seen: self.u64()?,
            last_seen: self.u64()?,
            ..FlowValue::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_truncation() {
        let key = FlowKey {
            uid: 10123,
            port: 443,
            proto: 6,
            family: 2,
            addr: [7; 16],
        };
        let value = FlowValue {
            connects: 1,
            udp_sends: 0,
            tx_packets: u64::MAX,
            tx_bytes: 1 << 40,
            first_seen: 12,
            last_seen: 13,
            ..FlowValue::default()
        };
        let mut enc = Enc::new(Vec::new());
        enc.u64(0).unwrap();
        enc.u64(u64::MAX).unwrap();
        enc.str("grüße").unwrap();
        enc.opt_str(None).unwrap();
        enc.key(&key).unwrap();
        enc.value(&value).unwrap();
        let bytes = enc.finish().unwrap();
        let mut dec = Dec(&bytes[..]);
        assert_eq!(dec.u64().unwrap(), 0);
        assert_eq!(dec.u64().unwrap(), u64::MAX);
        assert_eq!(dec.str().unwrap(), "grüße");
        assert_eq!(dec.opt_str().unwrap(), None);
        assert_eq!(dec.key().unwrap(), key);
        assert_eq!(dec.value().unwrap(), value);
        for cut in 0..bytes.len() {
            let mut dec = Dec(&bytes[..cut]);
            let all = (|| -> io::Result<()> {
                dec.u64()?;
                dec.u64()?;
                dec.str()?;
                dec.opt_str()?;
                dec.key()?;
                dec.value()?;
                Ok(())
            })();
            assert!(all.is_err(), "cut at {cut} read as whole");
        }
        let mut huge = Enc::new(Vec::new());
        huge.u64(MAX_LEN + 1).unwrap();
        assert!(Dec(&huge.finish().unwrap()[..]).str().is_err());
    }
}
