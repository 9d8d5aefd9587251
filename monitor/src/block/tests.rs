use super::*;
use std::path::PathBuf;

/// A Linux host with root, a service account and a person.
fn resolver() -> (OwnerResolver, PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "egm-block-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(dir.join("etc")).unwrap();
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nupdater:x:1041:1041::/:/usr/sbin/nologin\nalice:x:1500:1500::/home/alice:/bin/sh\n",
    )
    .unwrap();
    (OwnerResolver::linux(&dir), dir)
}

fn blocks_with(text: &str) -> Result<(Blocks, OwnerResolver)> {
    let (resolver, dir) = resolver();
    let rules = Rules::parse(text, "test")?;
    let mut blocks = Blocks::new(None);
    blocks.set_file_rules(&rules);
    let checked = blocks
        .check_all(&resolver)
        .and_then(|()| blocks.apply(&resolver, &GeoIp::empty()));
    std::fs::remove_dir_all(dir).unwrap();
    checked.map(|()| (blocks, resolver))
}

fn key(uid: u32, cidr: &str) -> TrieKey {
    trie_key(uid, Some(Cidr::parse(cidr).unwrap()))
}

#[test]
fn a_rule_by_uid_and_network_holds_one_entry_per_uid_and_prefix() {
    let (blocks, _) = blocks_with(
        r#"
        defaults = false
        [[rule]]
        name = "updater-cn"
        action = "block"
        mode = "enforce"
        uid = [1041, 1042]
        dst = ["203.0.113.0/24", "2001:db8::/32"]
        port = [80, 443]
        proto = "tcp"
        "#,
    )
    .unwrap();
    assert_eq!(blocks.installed.len(), 4);
    let entry = blocks.installed[&key(1041, "203.0.113.0/24")];
    assert_eq!(entry.rule, 1 | BLOCK_ENFORCE);
    assert_eq!(entry.ports, [80, 443, 80, 80]);
    assert_eq!(entry.protos, block_proto_bit(PROTO_TCP));
    assert!(
        entry.covers(PROTO_TCP, 443)
            && !entry.covers(PROTO_UDP, 443)
            && !entry.covers(PROTO_TCP, 22)
    );
    // IPv4 networks sit under ::ffff:0:0/96 after the uid's 32 bits.
    assert_eq!(key(1042, "203.0.113.0/24").0, 32 + 96 + 24);
    assert_eq!(key(1042, "2001:db8::/32").0, 32 + 32);
    assert!(blocks.installed.contains_key(&key(1042, "2001:db8::/32")));
    assert_ne!(
        blocks.gen, 0,
        "the generation moves when entries are written"
    );
}

#[test]
fn a_rule_without_destinations_blocks_a_uid_but_not_its_loopback() {
    let (blocks, _) = blocks_with(
        r#"
        defaults = false
        [[rule]]
        name = "mute-updater"
        action = "block"
        uid = 1041
        "#,
    )
    .unwrap();
    let all = blocks.installed[&trie_key(1041, None)];
    assert_eq!(all.rule, 1, "a dry run unless it says enforce");
    assert!(all.covers(PROTO_UDP, 53) && all.covers(PROTO_TCP, 1));
    let loopback = blocks.installed[&key(1041, "127.0.0.0/8")];
    assert_eq!(loopback.rule, 0, "remote scope: loopback is left alone");
    assert!(
        loopback.covers(PROTO_TCP, 80),
        "the allow entry decides for every port"
    );
    assert_eq!(blocks.installed.len(), 1 + LOCAL_NETWORKS.len());
}

#[test]
fn guard_rails_refuse_enforcing_on_uids_the_device_needs_without_force() {
    let enforce = |cond: &str, force: bool| {
        blocks_with(&format!(
            "defaults = false\n[[rule]]\nname = \"r\"\naction = \"block\"\nmode = \"enforce\"\n{cond}\n{}",
            if force { "force = true" } else { "" }
        ))
        .map(|_| ())
    };
    let err = enforce("uid = [1000, 1041]", false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("uid 1000 (system)") && err.contains("force = true"),
        "{err}"
    );
    let err = enforce("dst = \"203.0.113.0/24\"", false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("every uid"), "{err}");
    // owner globs reach root through the accounts.
    let err = enforce("owner = \"ro*\"", false).unwrap_err().to_string();
    assert!(err.contains("uid 0 (root)"), "{err}");
    enforce("uid = [1000, 1041]", true).unwrap();
    enforce("uid = 1041", false).unwrap();
    // A dry run refuses nothing: no guard.
    blocks_with("defaults = false\n[[rule]]\nname = \"r\"\naction = \"block\"\nuid = 0\n").unwrap();
}

#[test]
fn where_two_rules_name_the_same_uid_and_prefix_the_first_decides() {
    let (blocks, _) = blocks_with(
        r#"
        defaults = false
        [[rule]]
        name = "first"
        action = "block"
        uid = 1041
        dst = "203.0.113.0/24"
        [[rule]]
        name = "second"
        action = "block"
        mode = "enforce"
        uid = 1041
        dst = ["203.0.113.0/24", "198.51.100.0/24"]
        "#,
    )
    .unwrap();
    assert_eq!(blocks.installed[&key(1041, "203.0.113.0/24")].rule, 1);
    assert_eq!(
        blocks.installed[&key(1041, "198.51.100.0/24")].rule,
        2 | BLOCK_ENFORCE
    );
    let view = blocks.view();
    assert_eq!(
        view.rule_of(2 | BLOCK_ENFORCE),
        Some(&("second".to_string(), BlockMode::Enforce))
    );
    assert_eq!(view.rule_of(0), None);
}

#[test]
fn host_rules_learn_the_addresses_their_uids_resolve() {
    let (mut blocks, _) = blocks_with(
        r#"
        defaults = false
        [[rule]]
        name = "activation"
        action = "block"
        mode = "enforce"
        uid = 1041
        host = "*.activation.example"
        "#,
    )
    .unwrap();
    assert!(
        blocks.installed.is_empty(),
        "nothing is known before an answer"
    );
    assert_eq!(blocks.gen, 0);
    let addr: IpAddr = "198.51.100.7".parse().unwrap();
    let names = ["act.activation.example", "cdn.example.net"];
    assert!(
        !blocks.learn_answer(1500, names, addr, (None, None)),
        "another uid's answer"
    );
    assert!(!blocks.learn_answer(1041, ["other.example", "x.example"], addr, (None, None)));
    assert!(blocks.learn_answer(1041, names, addr, (None, None)));
    assert!(
        !blocks.learn_answer(1041, names, addr, (None, None)),
        "learnt once"
    );
    assert_eq!(
        blocks.installed[&key(1041, "198.51.100.7/32")].rule,
        1 | BLOCK_ENFORCE
    );
    assert_ne!(blocks.gen, 0, "flows already open are decided again");
    assert_eq!(blocks.status()[0].learnt, 1);
}

#[test]
fn unblock_all_removes_every_entry_and_stops_the_lookups() {
    let (mut blocks, resolver) = blocks_with(
        "defaults = false\n[[rule]]\nname = \"r\"\naction = \"block\"\nuid = 1041\ndst = \"203.0.113.0/24\"\n",
    )
    .unwrap();
    blocks.remove_all(&resolver, &GeoIp::empty()).unwrap();
    assert!(blocks.installed.is_empty());
    assert_eq!(blocks.gen, 0);
    assert!(blocks.status().is_empty());
}

#[test]
fn block_rules_that_cannot_be_decided_in_the_kernel_are_refused() {
    let refused = |body: &str| {
        Rules::parse(
            &format!("defaults = false\n[[rule]]\nname = \"r\"\n{body}\n"),
            "test",
        )
        .unwrap_err()
        .to_string()
    };
    assert!(
        refused("action = \"block\"\nfirmware = true\nnew_country = true").contains("new_country")
    );
    assert!(refused("action = \"block\"\nuid = 1\nport = [1, 2, 3, 4, 5]").contains("at most 4"));
    assert!(refused("action = \"block\"\nuid = 1\nproto = \"icmp\"").contains("tcp or udp"));
    assert!(
        refused("action = \"block\"\ndst = \"10.0.0.0/8\"\ncountry = \"CN\"")
            .contains("one of them")
    );
    assert!(refused("uid = 1\nmode = \"enforce\"").contains("only block rules"));
    assert!(refused("action = \"block\"\ndst = \"10.0.0.1/8\"").contains("bits set beyond"));
}

#[test]
fn command_rules_are_one_block_rule() {
    let rule = parse_command_rule("[[rule]]\nname = \"x\"\naction = \"block\"\nuid = 5\n").unwrap();
    assert_eq!(rule.mode(), BlockMode::DryRun);
    let err = parse_command_rule("[[rule]]\nname = \"x\"\nuid = 5\n").unwrap_err();
    assert!(err.to_string().contains("one block rule"), "{err}");
}

#[test]
fn cidrs_parse_canonically() {
    let c = Cidr::parse("::ffff:10.1.0.0/112").unwrap();
    assert_eq!(c, Cidr::parse("10.1.0.0/16").unwrap());
    assert!(c.contains("10.1.2.3".parse().unwrap()));
    assert!(c.contains("::ffff:10.1.2.3".parse().unwrap()));
    assert!(!c.contains("10.2.0.1".parse().unwrap()));
    assert_eq!(Cidr::parse("2001:db8::1").unwrap().prefix, 128);
    assert!(Cidr::parse("10.0.0.0/33").is_err());
    assert!(Cidr::parse("example.com").is_err());
}
