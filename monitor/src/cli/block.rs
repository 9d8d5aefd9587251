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
        let rule = Rule {
            name: &self.name,
            action: "block",
            mode: if self.enforce { "enforce" } else { "dry-run" },
            force: self.force,
            firmware: self.firmware,
            uid: &self.uid,
            owner: &self.owner,
            package: &self.package,
            origin: &self.origin,
            dst: &self.dst,
            host: &self.host,
            country: &self.country,
            asn: &self.asn,
            port: &self.port,
            proto: &self.proto,
            leak: &self.leak,
        };
        toml::to_string(&RulesFile { rule: [rule] }).expect("a block rule serializes")
    }
}

/// A rules file holding one rule (`[[rule]]`).
#[derive(serde::Serialize)]
struct RulesFile<'a> {
    rule: [Rule<'a>; 1],
}

/// A block rule as the rules file spells it; what the command line left
/// out is left out.
#[derive(serde::Serialize)]
struct Rule<'a> {
    name: &'a str,
    action: &'static str,
    mode: &'static str,
    #[serde(skip_serializing_if = "is_false")]
    force: bool,
    #[serde(skip_serializing_if = "is_false")]
    firmware: bool,
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    uid: &'a [u32],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    owner: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    package: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    origin: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    dst: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    host: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    country: &'a [String],
    #[serde(skip_serializing_if = "<[u32]>::is_empty")]
    asn: &'a [u32],
    #[serde(skip_serializing_if = "<[u16]>::is_empty")]
    port: &'a [u16],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    proto: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    leak: &'a [String],
}

fn is_false(flag: &bool) -> bool {
    !flag
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
        Some(name) => format!("name={}", crate::serve::escape::encode(name.as_bytes())),
        None => unreachable!("clap requires a name or --all"),
    };
    let answer = args.target.agent()?.post(&format!("/unblock?{query}"))?;
    println!("{}", answer.trim_end());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_line_block_becomes_a_rule_the_agent_accepts() {
        let args = BlockArgs {
            name: "cn \"activation\" + 100%".into(),
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
        assert_eq!(rule.name, "cn \"activation\" + 100%");
        assert_eq!(rule.mode(), crate::pipeline::rules::BlockMode::Enforce);
        assert_eq!(rule.port.unwrap().0, vec![80, 443]);
        assert_eq!(rule.dst.unwrap().0.len(), 1);
        assert_eq!(rule.firmware, Some(true));
    }
}
