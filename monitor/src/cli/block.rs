//! `egressmon block` and `egressmon unblock`: block rules added to and
//! removed from a running agent through its control socket (root only).
//! A rule is sent as the rules file would hold it, so the agent checks it
//! the same way.

use crate::cli::Target;
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub(crate) struct BlockArgs {
    /// The rule's name (the metric label; `unblock NAME` removes it).
    pub(crate) name: String,
    /// Uids it applies to.
    #[arg(long)]
    pub(crate) uid: Vec<u32>,
    /// Owner globs (matched against the owner and each of its packages).
    #[arg(long)]
    pub(crate) owner: Vec<String>,
    /// Package globs.
    #[arg(long)]
    pub(crate) package: Vec<String>,
    /// Origins: app, preinstalled, platform, user, system, unknown.
    #[arg(long)]
    pub(crate) origin: Vec<String>,
    /// Only firmware (preinstalled and platform) senders.
    #[arg(long)]
    pub(crate) firmware: bool,
    /// Destination addresses or networks (203.0.113.0/24, 2001:db8::/32).
    #[arg(long)]
    pub(crate) dst: Vec<String>,
    /// Host globs, learnt from the DNS answers each uid receives.
    #[arg(long)]
    pub(crate) host: Vec<String>,
    /// Countries (ISO codes), expanded to networks from --geoip data.
    #[arg(long)]
    pub(crate) country: Vec<String>,
    /// Autonomous system numbers, expanded like countries.
    #[arg(long)]
    pub(crate) asn: Vec<u32>,
    /// Destination ports (at most 4).
    #[arg(long)]
    pub(crate) port: Vec<u16>,
    /// tcp or udp.
    #[arg(long)]
    pub(crate) proto: Vec<String>,
    /// Identifier globs: destinations of flows that carried one.
    #[arg(long)]
    pub(crate) leak: Vec<String>,
    /// Refuse (connect() and sends fail with EPERM, packets are dropped);
    /// without it the rule is a dry run that only counts.
    #[arg(long)]
    pub(crate) enforce: bool,
    /// Allow a rule that refuses uids the device needs (root, system, dns,
    /// network_stack) or every uid.
    #[arg(long)]
    pub(crate) force: bool,
    #[command(flatten)]
    pub(crate) target: Target,
}

#[derive(Args, Debug)]
pub(crate) struct UnblockArgs {
    /// The rule to remove (one `egressmon block` added).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) name: Option<String>,
    /// Remove every block, the rules file's too (they come back when the
    /// file changes).
    #[arg(long)]
    pub(crate) all: bool,
    #[command(flatten)]
    pub(crate) target: Target,
}

impl BlockArgs {
    /// The rule as a rules file would hold it.
    fn to_toml(&self) -> String {
        // A JSON string is a TOML basic string (serde_json never writes
        // `\/`), and a list of them or of numbers a TOML array.
        let quoted = |s: &str| serde_json::to_string(s).expect("strings serialize");
        let texts = |v: &[String]| {
            format!(
                "[{}]",
                v.iter().map(|s| quoted(s)).collect::<Vec<_>>().join(", ")
            )
        };
        let numbers = |v: &[u64]| {
            format!(
                "[{}]",
                v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
            )
        };
        let wide = |v: &[u32]| v.iter().map(|&n| u64::from(n)).collect::<Vec<_>>();
        let mut lines = vec![
            "[[rule]]".to_string(),
            format!("name = {}", quoted(&self.name)),
            "action = \"block\"".into(),
            format!(
                "mode = \"{}\"",
                if self.enforce { "enforce" } else { "dry-run" }
            ),
        ];
        if self.force {
            lines.push("force = true".into());
        }
        if self.firmware {
            lines.push("firmware = true".into());
        }
        let ports: Vec<u64> = self.port.iter().map(|&p| u64::from(p)).collect();
        let lists = [
            ("uid", numbers(&wide(&self.uid)), self.uid.is_empty()),
            ("owner", texts(&self.owner), self.owner.is_empty()),
            ("package", texts(&self.package), self.package.is_empty()),
            ("origin", texts(&self.origin), self.origin.is_empty()),
            ("dst", texts(&self.dst), self.dst.is_empty()),
            ("host", texts(&self.host), self.host.is_empty()),
            ("country", texts(&self.country), self.country.is_empty()),
            ("asn", numbers(&wide(&self.asn)), self.asn.is_empty()),
            ("port", numbers(&ports), ports.is_empty()),
            ("proto", texts(&self.proto), self.proto.is_empty()),
            ("leak", texts(&self.leak), self.leak.is_empty()),
        ];
        for (key, value, empty) in lists {
            if !empty {
                lines.push(format!("{key} = {value}"));
            }
        }
        lines.join("\n") + "\n"
    }
}

/// `egressmon block`.
pub(crate) fn block(args: BlockArgs) -> Result<()> {
    crate::bpf::system::require_root("egressmon block")?;
    let answer = args.target.agent()?.post_body("/block", args.to_toml())?;
    println!("{}", answer.trim_end());
    Ok(())
}

/// `egressmon unblock`.
pub(crate) fn unblock(args: UnblockArgs) -> Result<()> {
    crate::bpf::system::require_root("egressmon unblock")?;
    let query = match &args.name {
        _ if args.all => "all".to_string(),
        Some(name) => format!("name={}", percent_encode(name)),
        None => unreachable!("clap requires a name or --all"),
    };
    let answer = args.target.agent()?.post(&format!("/unblock?{query}"))?;
    println!("{}", answer.trim_end());
    Ok(())
}

/// Every byte but ASCII letters, digits and `-_.` as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_block_becomes_a_rule_the_agent_accepts() {
        let args = BlockArgs {
            name: "cn activation".into(),
            uid: vec![1041],
            owner: vec![],
            package: vec![],
            origin: vec![],
            firmware: true,
            dst: vec!["203.0.113.0/24".into()],
            host: vec![],
            country: vec![],
            asn: vec![],
            port: vec![80, 443],
            proto: vec!["tcp".into()],
            leak: vec![],
            enforce: true,
            force: false,
            target: Target {
                pin_dir: None,
                listen: "127.0.0.1:9864".parse().unwrap(),
                run_dir: None,
            },
        };
        let rule = crate::block::parse_command_rule(&args.to_toml()).unwrap();
        assert_eq!(rule.name, "cn activation");
        assert_eq!(rule.mode(), crate::pipeline::rules::BlockMode::Enforce);
        assert_eq!(rule.port.unwrap().0, vec![80, 443]);
        assert_eq!(rule.dst.unwrap().0.len(), 1);
        assert_eq!(rule.firmware, Some(true));
    }

    #[test]
    fn names_are_sent_percent_encoded_and_read_back() {
        let name = "cn activation/ü&x";
        assert_eq!(crate::agent::percent_decode(&percent_encode(name)), name);
    }
}
