//! Where it went, end to end: a DNS server, a cleartext HTTP server and a real
//! TLS server (openssl s_server) on a test host in a network namespace; a
//! platform uid (radio) that resolves a name and POSTs activation data in
//! cleartext, and a user app that resolves a name and opens TLS. GeoIP data
//! written by the test places the host in China.
//!
//! Run as root (`cargo xtask test`).

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const FIRMWARE_HOST: &str = "zzhc.activation.example.cn";
const APP_HOST: &str = "api.example.org";
const BINARY_HOST: &str = "push.example.cn";

/// openssl s_server in the server namespace, with a throwaway certificate.
fn tls_server(net: &NetPair, dir: &Path, port: u16) -> Proc {
    let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl (Debian's openssl package)");
    assert!(made.success());
    let child = Command::new("nsenter")
        .arg(format!("--net={}", NetPair::path(&net.server)))
        .args([
            "openssl",
            "s_server",
            "-quiet",
            "-accept",
            &format!("{SERVER4}:{port}"),
        ])
        .arg("-key")
        .arg(&key)
        .arg("-cert")
        .arg(&cert)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nsenter + openssl s_server");
    let proc = Proc(child);
    // Ready once it accepts connections.
    assert!(eventually(Duration::from_secs(10), || {
        Command::new(GEN)
            .args([
                "--netns",
                &NetPair::path(&net.client),
                "tcp",
                "--dst",
                &format!("{SERVER4}:{port}"),
                "--count",
                "1",
            ])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    }));
    proc
}

#[test]
fn firmware_cleartext_to_china_is_named_located_and_alerted() {
    // The test host is in China (TEST_COUNTRIES).
    let test = TestDevice::new(&tag("dest"));
    let (tag, net, cgroup, dir) = (&test.tag, &test.net, &test.cgroup, &test.dir);
    let resolver = format!("{SERVER4}:53");
    let tcp: Vec<std::net::SocketAddr> = [80, 5228]
        .iter()
        .map(|port| format!("{SERVER4}:{port}").parse().unwrap())
        .collect();
    let _sink = start_dns_sink(
        net,
        Some(&resolver),
        &[FIRMWARE_HOST, APP_HOST, BINARY_HOST],
        &tcp,
        &[],
    );
    let _tls = tls_server(net, dir, 443);
    let log = dir.join("flows.jsonl");
    let agent = AgentProc::start(
        &cgroup.path,
        tag,
        &[
            "--android-root",
            test.device().to_str().unwrap(),
            "--geoip",
            test.geoip().to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ],
    );

    // radio (1001), a platform daemon: cleartext activation POST.
    gen(
        net,
        &cgroup.path,
        1001,
        &[
            "http-post",
            "--host",
            FIRMWARE_HOST,
            "--resolver",
            &resolver,
            "--bytes",
            "300",
        ],
    );
    // radio again, binary data to a name only DNS can tell.
    gen(
        net,
        &cgroup.path,
        1001,
        &[
            "connect",
            "--host",
            BINARY_HOST,
            "--resolver",
            &resolver,
            "--port",
            "5228",
        ],
    );
    // com.example.app (10123), user-installed: TLS.
    gen(
        net,
        &cgroup.path,
        10123,
        &["tls", "--host", APP_HOST, "--resolver", &resolver],
    );

    let flow =
        |flows: &[egressmon::pipeline::flows::FlowRecord], uid: u32, proto: &str, port: u16| {
            flows
                .iter()
                .find(|f| f.uid == uid && f.proto == proto && f.port == port)
                .cloned()
        };
    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            flows = agent.flows();
            // All three names point at the one test host: for radio the
            // latest answer (push...) names the address once it is read.
            flow(&flows, 10123, "tcp", 443).is_some_and(|f| f.host_source.as_deref() == Some("sni"))
                && flow(&flows, 1001, "tcp", 80).is_some_and(|f| f.payload == "http")
                && flow(&flows, 1001, "tcp", 5228)
                    .is_some_and(|f| f.host.as_deref() == Some(BINARY_HOST))
        }),
        "{flows:#?}"
    );
    let post = flow(&flows, 1001, "tcp", 80).unwrap();
    assert_eq!(
        (
            post.host.as_deref(),
            post.host_source.as_deref(),
            post.payload.as_str(),
            post.country.as_deref(),
            post.firmware,
            post.owner.as_str()
        ),
        (
            Some(FIRMWARE_HOST),
            Some("http"),
            "http",
            Some("CN"),
            true,
            "radio"
        )
    );
    let binary = flow(&flows, 1001, "tcp", 5228).unwrap();
    assert_eq!(
        (
            binary.host.as_deref(),
            binary.host_source.as_deref(),
            binary.payload.as_str()
        ),
        (Some(BINARY_HOST), Some("dns"), "unknown")
    );
    let query = flow(&flows, 1001, "udp", 53).unwrap();
    assert_eq!(query.payload, "dns");
    let tls = flow(&flows, 10123, "tcp", 443).unwrap();
    assert_eq!(
        (
            tls.host.as_deref(),
            tls.host_source.as_deref(),
            tls.payload.as_str(),
            tls.country.as_deref(),
            tls.firmware
        ),
        (Some(APP_HOST), Some("sni"), "tls", Some("CN"), false)
    );

    // Metrics and log say the same; the firmware alert fires for radio only.
    let metrics = http_get(&agent.listen, "/metrics").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            let m = http_get(&agent.listen, "/metrics").unwrap();
            m.contains("egressmon_alerts_total{rule=\"firmware-cleartext\"} 1")
        }),
        "{metrics}"
    );
    let metrics = http_get(&agent.listen, "/metrics").unwrap();
    assert!(metrics.contains("egressmon_cleartext_flows_total{firmware=\"true\",origin=\"platform\",owner=\"radio\",uid=\"1001\"} 1"), "{metrics}");
    assert!(metrics.contains("country=\"CN\""), "{metrics}");
    assert!(
        eventually(Duration::from_secs(5), || {
            json_lines(&log)
                .iter()
                .any(|l| l["event"] == "alert" && l["rule"] == "firmware-cleartext")
        }),
        "{:#?}",
        json_lines(&log)
    );
    let events = json_lines(&log);
    let alerts: Vec<&Value> = events.iter().filter(|l| l["event"] == "alert").collect();
    let cleartext = alerts
        .iter()
        .find(|a| a["rule"] == "firmware-cleartext")
        .unwrap();
    assert_eq!(
        (
            cleartext["uid"].as_u64(),
            cleartext["host"].as_str(),
            cleartext["country"].as_str()
        ),
        (Some(1001), Some(FIRMWARE_HOST), Some("CN"))
    );
    assert!(
        alerts.iter().all(|a| a["uid"] != 10123),
        "no alert for the user's app: {alerts:#?}"
    );
    assert!(
        alerts
            .iter()
            .any(|a| a["rule"] == "firmware-new-country" && a["uid"] == 1001),
        "{alerts:#?}"
    );
}

#[test]
fn bad_geoip_and_rules_files_are_refused_with_the_line() {
    require_root();
    let tag = tag("badfiles");
    let dir = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = Scratch(dir.clone());
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let run = |extra: &[&str]| {
        let out = Command::new(BIN)
            .args(["run", "--cgroup"])
            .arg(&cgroup.path)
            .args([
                "--pin-dir",
                &format!("/sys/fs/bpf/{tag}"),
                "--listen",
                "127.0.0.1:1",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    std::fs::write(dir.join("bad.mmdb"), b"this is not a MaxMind database").unwrap();
    let err = run(&["--geoip", dir.join("bad.mmdb").to_str().unwrap()]);
    assert!(err.contains("bad.mmdb"), "{err}");
    std::fs::write(
        dir.join("bad.csv"),
        "1.0.0.0,1.0.0.255,AU\nnot,an,address\n",
    )
    .unwrap();
    let err = run(&["--geoip", dir.join("bad.csv").to_str().unwrap()]);
    assert!(err.contains("bad.csv") && err.contains("line 2"), "{err}");
    std::fs::write(
        dir.join("rules.toml"),
        "[[rule]]\nname = \"x\"\nproto = \"sctp\"\n",
    )
    .unwrap();
    let err = run(&["--rules", dir.join("rules.toml").to_str().unwrap()]);
    assert!(
        err.contains("rules.toml") && err.contains("line 3"),
        "{err}"
    );
    assert!(
        !Path::new(&format!("/sys/fs/bpf/{tag}")).exists(),
        "nothing attached on a bad file"
    );
}

/// Loopback traffic never leaves the device: a platform uid's cleartext
/// POST to a server on loopback is counted (scope "loopback", a cleartext
/// flow) but the shipped rules raise no alert for it, while the same POST
/// to the test host raises one; a rule with `scope = "any"` opts in to both.
#[test]
fn loopback_cleartext_is_counted_but_alerted_only_by_a_rule_that_opts_in() {
    let test = TestDevice::new(&tag("scope"));
    let (tag, net, cgroup, dir) = (&test.tag, &test.net, &test.cgroup, &test.dir);
    const LOCAL_HOST: &str = "activation.localhost.test";
    let remote_resolver = format!("{SERVER4}:53");
    let _remote = start_dns_sink(
        net,
        Some(&remote_resolver),
        &[FIRMWARE_HOST],
        &[format!("{SERVER4}:80").parse().unwrap()],
        &[],
    );
    // A server on the client namespace's own loopback, name and all.
    let _local = start_serve_in(
        &net.client,
        &[
            "--dns",
            "127.0.0.1:53",
            &format!("--zone={LOCAL_HOST}=127.0.0.1"),
            "--tcp",
            "127.0.0.1:80",
        ],
    );
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"cleartext-anywhere\"\nfirmware = true\n\
         payload = [\"http\", \"cleartext\"]\nscope = \"any\"\n",
    )
    .unwrap();
    let log = dir.join("flows.jsonl");
    let agent = AgentProc::start(
        &cgroup.path,
        tag,
        &[
            "--android-root",
            test.device().to_str().unwrap(),
            "--rules",
            rules.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ],
    );
    let post = |host: &str, resolver: &str| {
        gen(
            net,
            &cgroup.path,
            1001,
            &["http-post", "--host", host, "--resolver", resolver],
        )
    };
    let http_flow = |flows: &[egressmon::pipeline::flows::FlowRecord], dst: &str| {
        flows
            .iter()
            .find(|f| f.uid == 1001 && f.dst == dst && f.port == 80 && f.payload == "http")
            .cloned()
    };
    // Loopback first, classified before the remote POST: the tracker pass
    // that alerts on the remote flow has judged the loopback one too.
    post(LOCAL_HOST, "127.0.0.1:53");
    let mut flows = Vec::new();
    assert!(
        eventually(Duration::from_secs(10), || {
            flows = agent.flows();
            http_flow(&flows, "127.0.0.1").is_some()
        }),
        "{flows:#?}"
    );
    post(FIRMWARE_HOST, &remote_resolver);
    let alerts_total = |rule: &str| {
        let metrics = http_get(&agent.listen, "/metrics").unwrap();
        metric_sum(
            &metrics,
            "egressmon_alerts_total",
            &[&format!("rule=\"{rule}\"")],
        )
    };
    assert!(
        eventually(Duration::from_secs(10), || alerts_total(
            "firmware-cleartext"
        ) == 1),
        "{}",
        http_get(&agent.listen, "/metrics").unwrap()
    );
    let flows = agent.flows();
    let local = http_flow(&flows, "127.0.0.1").expect("the loopback POST");
    let remote = http_flow(&flows, SERVER4).expect("the remote POST");
    assert_eq!(local.scope, egressmon::pipeline::rules::Scope::Loopback);
    assert_eq!(remote.scope, egressmon::pipeline::rules::Scope::Remote);
    assert!(local.tx_bytes > 256, "counted: {local:#?}");
    let metrics = http_get(&agent.listen, "/metrics").unwrap();
    assert_eq!(
        metric_sum(
            &metrics,
            "egressmon_cleartext_flows_total",
            &["uid=\"1001\""]
        ),
        2,
        "both are cleartext flows: {metrics}"
    );
    assert_eq!(alerts_total("cleartext-anywhere"), 2, "{metrics}");
    // Alert lines, by rule: the shipped rule for the remote flow alone.
    let alerted = |rule: &str| -> Vec<String> {
        let mut dsts: Vec<String> = json_lines(&log)
            .iter()
            .filter(|l| l["event"] == "alert" && l["rule"] == rule)
            .map(|l| l["dst"].as_str().unwrap().to_string())
            .collect();
        dsts.sort();
        dsts
    };
    assert!(
        eventually(Duration::from_secs(5), || alerted("cleartext-anywhere")
            .len()
            == 2),
        "{:#?}",
        json_lines(&log)
    );
    assert_eq!(alerted("firmware-cleartext"), [SERVER4]);
    assert_eq!(alerted("cleartext-anywhere"), [SERVER4, "127.0.0.1"]);
}
