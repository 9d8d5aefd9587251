//! Evidence of what was sent, end to end: a platform uid (radio) POSTs to a
//! test host, in cleartext, bodies that carry the test's own device
//! identifiers (given with `--identifiers`) in several forms, one of them
//! only in the request's second packet, and a clean body; a user app sends
//! the same IMEI inside TLS. Each flow's `leaks` must be exact, the metric
//! and the shipped alert must follow, and no value may appear anywhere the
//! agent writes.
//!
//! Run as root (`cargo xtask test`).

mod support;

use serde_json::Value;
use std::path::Path;
use std::time::Duration;
use support::*;

const HOST: &str = "activation.example.cn";
/// The test's identifiers: an IMEI (the example of 3GPP TS 23.003's check
/// digit annex style, any 15 digits do), a serial and a machine id.
const IMEI: &str = "490154203237518";
const SERIAL: &str = "EGM7Q2X9K4LT";
const MACHINE_ID: &str = "5f0c3e9a8b7d41c6a2e4f19d3b8c7a60";
/// sha256sum of the IMEI's text.
const IMEI_SHA256: &str = "1f0b62b5f05f305e9251c88be27c9e519449e8e34a00a59ec0a534d85ecfaf08";
/// `{"device":"EGM7Q2X9K4LT","v":2}` in base64, padding dropped: the serial
/// sits at the third alignment of a larger base64 run.
const SERIAL_IN_BASE64: &str = "eyJkZXZpY2UiOiJFR003UTJYOUs0TFQiLCJ2IjoyfQ";

/// A file the test's sender reads (mode 0644 in a directory every uid can
/// enter: the sender runs as another uid), so that what it sends is not in
/// its command line, which the agent shows.
fn body_file(dir: &Path, name: &str, body: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    path.to_str().unwrap().to_string()
}

fn post(net: &NetPair, cgroup: &Path, resolver: &str, port: u16, body: &str, split: bool) {
    let port = port.to_string();
    let mut args = vec![
        "http-post",
        "--host",
        HOST,
        "--resolver",
        resolver,
        "--port",
        &port,
        "--body-file",
        body,
    ];
    if split {
        args.push("--split");
    }
    gen(net, cgroup, 1001, &args);
}

#[test]
fn identifiers_sent_in_cleartext_are_named_counted_and_alerted() {
    let test = TestDevice::new(&tag("evidence"));
    let (tag, net, cgroup, dir) = (&test.tag, &test.net, &test.cgroup, &test.dir);
    let identifiers = dir.join("identifiers.toml");
    std::fs::write(
        &identifiers,
        format!(
            "[identifiers]\nimei = \"{IMEI}\"\nserial = \"{SERIAL}\"\nmachine_id = \"{MACHINE_ID}\"\n"
        ),
    )
    .unwrap();
    let resolver = format!("{SERVER4}:53");
    let ports = [80u16, 8080, 8081, 8082, 443];
    let tcp: Vec<std::net::SocketAddr> = ports
        .iter()
        .map(|port| format!("{SERVER4}:{port}").parse().unwrap())
        .collect();
    let _sink = start_dns_sink(net, Some(&resolver), &[HOST], &tcp, &[]);
    let log = dir.join("flows.jsonl");
    let agent = AgentProc::start(
        &cgroup.path,
        tag,
        &[
            "--android-root",
            test.device().to_str().unwrap(),
            "--identifiers",
            identifiers.to_str().unwrap(),
            "--log",
            log.to_str().unwrap(),
        ],
    );

    // radio (1001), a platform daemon, one flow per body.
    let bodies = std::env::temp_dir().join(format!("{tag}-bodies"));
    let _bodies = Scratch(bodies.clone());
    std::fs::create_dir_all(&bodies).unwrap();
    std::fs::set_permissions(&bodies, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let body = |name: &str, text: &str| body_file(&bodies, name, text);
    let (r, c) = (&resolver, &cgroup.path);
    post(
        net,
        c,
        r,
        80,
        &body("imei", &format!("imei_hash={IMEI_SHA256}&v=2")),
        false,
    );
    post(
        net,
        c,
        r,
        8080,
        &body("serial", &format!("data={SERIAL_IN_BASE64}")),
        true,
    );
    post(
        net,
        c,
        r,
        8081,
        &body("mid", &format!("mid={MACHINE_ID}")),
        false,
    );
    post(
        net,
        c,
        r,
        8082,
        &body("clean", "status=ok&battery=81"),
        true,
    );
    // com.example.app (10123): the IMEI inside TLS.
    let secret = body("tls", &format!("imei={IMEI}"));
    gen(
        net,
        &cgroup.path,
        10123,
        &[
            "tls",
            "--host",
            HOST,
            "--resolver",
            r,
            "--then-file",
            &secret,
        ],
    );

    let expected: [(u32, u16, &[&str]); 5] = [
        (1001, 80, &["imei:sha256"]),
        (1001, 8080, &["serial:base64"]),
        (1001, 8081, &["machine_id:plain"]),
        (1001, 8082, &[]),
        (10123, 443, &[]),
    ];
    let leaks_of = |flows: &[egressmon::pipeline::flows::FlowRecord], uid: u32, port: u16| {
        flows
            .iter()
            .find(|f| f.uid == uid && f.proto == "tcp" && f.port == port)
            .map(|f| {
                let mut leaks = f.leaks.clone();
                leaks.sort();
                leaks
            })
    };
    let mut flows = Vec::new();
    let all_seen = eventually(Duration::from_secs(10), || {
        flows = agent.flows();
        expected
            .iter()
            .all(|(uid, port, leaks)| leaks_of(&flows, *uid, *port).is_some_and(|l| l == *leaks))
    });
    assert!(all_seen, "{flows:#?}");
    let tls = flows
        .iter()
        .find(|f| f.uid == 10123 && f.port == 443)
        .unwrap();
    assert_eq!(tls.payload, "tls");
    // `leaks` is in the JSON of every flow, [] when none.
    let json = agent.cli(&["flows", "--json"]);
    let rows: Value = serde_json::from_str(&json).unwrap();
    let rows = rows.as_array().unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["leaks"].is_array()),
        "{json}"
    );
    // Below the uid: the sender's SELinux context (null without SELinux, as
    // on this host) and partition (the test's sender runs from a temporary
    // directory, on no image partition).
    let selinux = std::path::Path::new("/sys/fs/selinux/enforce").exists();
    for row in rows {
        let object = row.as_object().unwrap();
        assert!(object.contains_key("selinux_context") && object.contains_key("partition"));
        if !selinux {
            assert!(row["selinux_context"].is_null(), "{row}");
        }
    }

    // The metric counts flows per identifier and form; the shipped rule alerts.
    let leak_series = |form: &str, identifier: &str| {
        format!(
            "egressmon_identifier_leaks_total{{firmware=\"true\",form=\"{form}\",identifier=\"{identifier}\",origin=\"platform\"}} 1"
        )
    };
    let mut metrics = String::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            metrics = http_get(&agent.listen, "/metrics").unwrap();
            metrics.contains(&leak_series("sha256", "imei"))
                && metrics.contains(&leak_series("base64", "serial"))
                && metrics.contains(&leak_series("plain", "machine_id"))
                && metrics.contains("egressmon_alerts_total{rule=\"firmware-identifier-leak\"} 3")
        }),
        "{metrics}"
    );
    let leak_lines: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("egressmon_identifier_leaks_total{"))
        .collect();
    assert_eq!(
        leak_lines.len(),
        3,
        "only the three leaks, none from the app: {metrics}"
    );
    assert!(
        eventually(Duration::from_secs(5), || json_lines(&log)
            .iter()
            .filter(|l| l["event"] == "alert" && l["rule"] == "firmware-identifier-leak")
            .count()
            == 3),
        "{:#?}",
        json_lines(&log)
    );
    let events = json_lines(&log);
    let alert = events
        .iter()
        .find(|l| {
            l["event"] == "alert" && l["rule"] == "firmware-identifier-leak" && l["port"] == 80
        })
        .expect("an alert for the IMEI flow");
    assert_eq!(alert["leaks"], serde_json::json!(["imei:sha256"]));
    assert!(
        events
            .iter()
            .filter(|l| l["event"] == "flow_start" || l["event"] == "flow_update")
            .all(|l| l["leaks"].is_array()),
        "every flow line carries leaks"
    );

    // Names only: no value in the log, the metrics, the flows or status.
    let status = agent.cli(&["status", "--json"]);
    let written = std::fs::read_to_string(&log).unwrap_or_default();
    for (place, text) in [
        ("log", &written),
        ("metrics", &metrics),
        ("flows", &json),
        ("status", &status),
    ] {
        for value in [IMEI, SERIAL, MACHINE_ID] {
            assert!(!text.contains(value), "{place} shows an identifier's value");
        }
    }
    assert!(
        status.contains("imei"),
        "status names the identifiers: {status}"
    );
}
