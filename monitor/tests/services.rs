//! A local service's replies: on a phone every socket, server and client
//! alike, sits under the watched cgroup. The replies of accepted
//! connections count as one inbound flow per client address and local
//! port, not one flow per client connection.

mod support;

use std::net::SocketAddr;
use std::time::Duration;
use support::*;

#[test]
fn ten_thousand_connections_to_a_local_server_make_a_handful_of_flows() {
    require_root();
    let tag = tag("service");
    let net = NetPair::new(&tag);
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    let agent = AgentProc::start(&cgroup.path, &tag, &[]);
    let service: SocketAddr = format!("{CLIENT4}:8080").parse().unwrap();
    // Server (uid 1000) and clients (uid 10123) in the same watched cgroup.
    let _server = start_serve_as(&net, &cgroup.path, 1000, &["--tcp", &service.to_string()]);
    gen(
        &net,
        &cgroup.path,
        10123,
        &[
            "tcp",
            "--dst",
            &service.to_string(),
            "--count",
            "10000",
            "--threads",
            "4",
        ],
    );
    let mut flows = Vec::new();
    assert!(eventually(Duration::from_secs(10), || {
        flows = agent.flows();
        flows
            .iter()
            .any(|f| f.uid == 10123 && f.port == 8080 && f.connects == 10_000)
    }));
    let client = find(&flows, 10123, "tcp", CLIENT4, 8080);
    assert_eq!(client.direction, "outbound");
    let served: Vec<_> = flows.iter().filter(|f| f.uid == 1000).collect();
    assert_eq!(
        served.len(),
        1,
        "one flow for the service's replies: {served:#?}"
    );
    let replies = served[0];
    assert_eq!(
        (
            replies.direction.as_str(),
            replies.dst.as_str(),
            replies.port
        ),
        ("inbound", CLIENT4, 8080),
        "keyed by the client address and the service's local port"
    );
    assert!(
        replies.tx_packets >= 10_000,
        "every reply counted: {replies:?}"
    );
    assert!(flows.len() <= 5, "a handful of flows: {}", flows.len());
}
