//! The pcapng file a capture writes, per the pcapng specification
//! (draft-ietf-opsawg-pcapng): a Section Header Block (section 4.1), one
//! Interface Description Block (4.2) of link type LINKTYPE_RAW (101: every
//! packet starts at its IP header) with nanosecond timestamps
//! (`if_tsresol` 9), an Enhanced Packet Block (4.3) per packet carrying an
//! `opt_comment` and the `epb_flags` direction bits (4.3.1: 01 inbound,
//! 10 outbound), and an Interface Statistics Block (4.6) at the end with
//! the packets delivered and those the capture ring had no room for.
//! Options are padded to 32 bits (3.5); the pcap-file crate lays the blocks
//! out.

use anyhow::{Context, Result};
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::blocks::interface_statistics::{
    InterfaceStatisticsBlock, InterfaceStatisticsOption,
};
use pcap_file::pcapng::blocks::section_header::{SectionHeaderBlock, SectionHeaderOption};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::{DataLink, Endianness};
use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

/// `if_tsresol` 9: timestamps count nanoseconds (pcap-file writes EPB
/// timestamps in nanoseconds, so the IDB must say so).
const NANOSECONDS: u8 = 9;
/// `epb_flags` bits 0-1.
const EPB_INBOUND: u32 = 0b01;
const EPB_OUTBOUND: u32 = 0b10;
/// Option values carry a 16-bit length.
const MAX_OPTION_BYTES: usize = u16::MAX as usize - 3;

/// Which way a packet went, as `epb_flags` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Inbound,
    Outbound,
}

/// A pcapng file being written: its header blocks are written (and
/// flushed) by [`PcapNg::new`], before any packet.
pub(crate) struct PcapNg<W: Write> {
    writer: PcapNgWriter<W>,
    packets: u64,
}

impl<W: Write> PcapNg<W> {
    /// Writes the Section Header Block and the one Interface Description
    /// Block (raw IP, `snaplen`, nanoseconds) to `out`, and flushes them.
    pub(crate) fn new(out: W, snaplen: u32, description: &str) -> Result<PcapNg<W>> {
        let section = SectionHeaderBlock {
            endianness: Endianness::native(),
            options: vec![
                SectionHeaderOption::UserApplication(Cow::Owned(format!(
                    "egressmon {}",
                    env!("CARGO_PKG_VERSION")
                ))),
                SectionHeaderOption::OS(Cow::Owned(format!(
                    "Linux {}",
                    crate::bpf::system::kernel_release()
                ))),
            ],
            ..Default::default()
        };
        let mut writer =
            PcapNgWriter::with_section_header(out, section).context("writing the pcapng header")?;
        let interface = InterfaceDescriptionBlock {
            linktype: DataLink::RAW,
            snaplen,
            options: vec![
                InterfaceDescriptionOption::IfName(Cow::Borrowed("egressmon")),
                InterfaceDescriptionOption::IfDescription(Cow::Owned(option_text(description))),
                InterfaceDescriptionOption::IfTsResol(NANOSECONDS),
            ],
        };
        writer
            .write_pcapng_block(interface)
            .context("writing the pcapng interface block")?;
        writer
            .get_mut()
            .flush()
            .context("writing the pcapng header")?;
        Ok(PcapNg { writer, packets: 0 })
    }

    /// One Enhanced Packet Block: `data` (raw IP, possibly cut at the snap
    /// length) of a packet `original_len` bytes long, sent or received at
    /// `time` (since the Unix epoch), with `comment`.
    pub(crate) fn packet(
        &mut self,
        time: Duration,
        data: &[u8],
        original_len: u32,
        direction: Direction,
        comment: &str,
    ) -> Result<()> {
        let flags = match direction {
            Direction::Inbound => EPB_INBOUND,
            Direction::Outbound => EPB_OUTBOUND,
        };
        let block = EnhancedPacketBlock {
            interface_id: 0,
            timestamp: time,
            original_len: original_len.max(data.len() as u32),
            data: Cow::Borrowed(data),
            options: vec![
                EnhancedPacketOption::Comment(Cow::Owned(option_text(comment))),
                EnhancedPacketOption::Flags(flags),
            ],
        };
        self.writer
            .write_pcapng_block(block)
            .context("writing a packet")?;
        self.packets += 1;
        Ok(())
    }

    /// Packets written so far.
    pub(crate) fn packets(&self) -> u64 {
        self.packets
    }

    /// Writes the Interface Statistics Block (`isb_starttime`,
    /// `isb_endtime`, `isb_usrdeliv` = packets written, `isb_ifdrop` =
    /// `dropped`) and flushes; returns the output.
    pub(crate) fn finish(mut self, start: Duration, end: Duration, dropped: u64) -> Result<W> {
        let nanos = |t: Duration| t.as_nanos() as u64;
        let statistics = InterfaceStatisticsBlock {
            interface_id: 0,
            timestamp: nanos(end),
            options: vec![
                InterfaceStatisticsOption::IsbStartTime(nanos(start)),
                InterfaceStatisticsOption::IsbEndTime(nanos(end)),
                InterfaceStatisticsOption::IsbUsrDeliv(self.packets),
                InterfaceStatisticsOption::IsbIfDrop(dropped),
            ],
        };
        self.writer
            .write_pcapng_block(statistics)
            .context("writing the pcapng statistics block")?;
        let mut out = self.writer.into_inner();
        out.flush().context("flushing the capture file")?;
        Ok(out)
    }
}

/// `text` cut to what one option can hold, at a character boundary.
fn option_text(text: &str) -> String {
    if text.len() <= MAX_OPTION_BYTES {
        return text.to_string();
    }
    let mut end = MAX_OPTION_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHB: u32 = 0x0A0D_0D0A;
    const IDB: u32 = 1;
    const EPB: u32 = 6;
    const ISB: u32 = 5;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes(b[at..at + 4].try_into().unwrap())
    }

    /// The blocks of a file: (type, body without the two lengths),
    /// checking each block's two length fields agree and are multiples of 4.
    fn blocks(file: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < file.len() {
            let kind = u32_at(file, at);
            let len = u32_at(file, at + 4) as usize;
            assert_eq!(len % 4, 0, "block at {at} not padded to 32 bits");
            assert!(at + len <= file.len(), "block at {at} runs past the end");
            assert_eq!(u32_at(file, at + len - 4) as usize, len, "trailing length");
            out.push((kind, file[at + 8..at + len - 4].to_vec()));
            at += len;
        }
        assert_eq!(at, file.len());
        out
    }

    /// Options from `at` in `body`: (code, value), checking the padding.
    fn options(body: &[u8], mut at: usize) -> Vec<(u16, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let (code, len) = (u16_at(body, at), u16_at(body, at + 2) as usize);
            if code == 0 {
                assert_eq!(len, 0);
                assert_eq!(at + 4, body.len(), "opt_endofopt ends the block");
                return out;
            }
            out.push((code, body[at + 4..at + 4 + len].to_vec()));
            at += 4 + len.div_ceil(4) * 4;
        }
    }

    fn written(packets: &[(&[u8], &str, Direction)]) -> Vec<u8> {
        let mut file = PcapNg::new(Vec::new(), 1536, "test").unwrap();
        for (i, (data, comment, direction)) in packets.iter().enumerate() {
            let time = Duration::new(1_700_000_000, i as u32 * 1000 + 7);
            file.packet(time, data, data.len() as u32 + 100, *direction, comment)
                .unwrap();
        }
        assert_eq!(file.packets(), packets.len() as u64);
        file.finish(Duration::from_secs(1), Duration::from_secs(2), 3)
            .unwrap()
    }

    #[test]
    fn header_blocks_come_first_and_say_raw_ip_in_nanoseconds() {
        let file = PcapNg::new(Vec::new(), 1536, "uid 1001").unwrap();
        let bytes = file.writer.get_ref().clone();
        let blocks = blocks(&bytes);
        assert_eq!(
            blocks.iter().map(|b| b.0).collect::<Vec<_>>(),
            [SHB, IDB],
            "SHB and IDB before any packet"
        );
        let shb = &blocks[0].1;
        assert_eq!(u32_at(shb, 0), 0x1A2B_3C4D, "byte-order magic");
        assert_eq!((u16_at(shb, 4), u16_at(shb, 6)), (1, 0), "version 1.0");
        let idb = &blocks[1].1;
        assert_eq!(u16_at(idb, 0), 101, "LINKTYPE_RAW");
        assert_eq!(u32_at(idb, 4), 1536, "snaplen");
        let opts = options(idb, 8);
        assert!(opts.contains(&(9, vec![9])), "if_tsresol 9: {opts:?}");
        assert!(opts.contains(&(2, b"egressmon".to_vec())), "if_name");
    }

    #[test]
    fn every_packet_has_its_comment_and_direction() {
        let odd = [0x45u8, 0, 0, 21, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let bytes = written(&[
            (
                &odd,
                "uid=1001 owner=radio origin=platform firmware=true",
                Direction::Outbound,
            ),
            (&[0x60; 40], "uid=1001 owner=radio x", Direction::Inbound),
        ]);
        let blocks = blocks(&bytes);
        let kinds: Vec<u32> = blocks.iter().map(|b| b.0).collect();
        assert_eq!(kinds, [SHB, IDB, EPB, EPB, ISB]);
        let epb = &blocks[2].1;
        assert_eq!(u32_at(epb, 0), 0, "interface 0");
        let ts = (u64::from(u32_at(epb, 4)) << 32) | u64::from(u32_at(epb, 8));
        assert_eq!(ts, 1_700_000_000_000_000_007, "nanoseconds since the epoch");
        assert_eq!(u32_at(epb, 12), odd.len() as u32, "captured length");
        assert_eq!(u32_at(epb, 16), odd.len() as u32 + 100, "original length");
        assert_eq!(&epb[20..20 + odd.len()], &odd);
        let data_end = 20 + odd.len().div_ceil(4) * 4;
        assert!(
            epb[20 + odd.len()..data_end].iter().all(|&b| b == 0),
            "zero padding"
        );
        let opts = options(epb, data_end);
        assert_eq!(
            opts[0],
            (
                1,
                b"uid=1001 owner=radio origin=platform firmware=true".to_vec()
            ),
            "opt_comment"
        );
        assert_eq!(
            opts[1],
            (2, EPB_OUTBOUND.to_ne_bytes().to_vec()),
            "epb_flags"
        );
        let inbound = options(&blocks[3].1, 20 + 40);
        assert_eq!(inbound[1], (2, EPB_INBOUND.to_ne_bytes().to_vec()));
        let isb = options(&blocks[4].1, 12);
        assert!(
            isb.contains(&(5, 3u64.to_ne_bytes().to_vec())),
            "isb_ifdrop: {isb:?}"
        );
        assert!(
            isb.contains(&(8, 2u64.to_ne_bytes().to_vec())),
            "isb_usrdeliv"
        );
    }

    #[test]
    fn the_file_reads_back_with_a_pcapng_reader() {
        let bytes = written(&[(&[0x45; 28], "uid=0 owner=root", Direction::Outbound)]);
        let mut reader = pcap_file::pcapng::PcapNgReader::new(&bytes[..]).unwrap();
        let mut comments = Vec::new();
        while let Some(block) = reader.next_block() {
            if let Some(epb) = block.unwrap().into_enhanced_packet() {
                for option in epb.options {
                    if let EnhancedPacketOption::Comment(c) = option {
                        comments.push(c.into_owned());
                    }
                }
            }
        }
        assert_eq!(comments, ["uid=0 owner=root"]);
    }

    #[test]
    fn long_comments_are_cut_at_a_character() {
        let long = "é".repeat(40_000);
        let cut = option_text(&long);
        assert!(cut.len() <= MAX_OPTION_BYTES && long.starts_with(&cut));
    }
}
