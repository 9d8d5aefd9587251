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

/// Runs `cmd` inside `cgroup` (it moves itself there before exec).
fn in_cgroup(cmd: &mut std::process::Command, cgroup: &std::path::Path) {
    use std::os::unix::process::CommandExt;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").to_str().unwrap()).unwrap();
    // SAFETY: only open/write/close (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
}

#[test]
fn the_agent_its_live_table_and_scrapes_make_no_flows_of_their_own() {
    require_root();
    let tag = tag("selfnoise");
    let cgroup = TestCgroup::new(&cgroup2_root(), &tag);
    // The agent watches the cgroup it runs in, as on a phone.
    let mut agent = AgentProc {
        pin_dir: std::path::PathBuf::from(format!("/sys/fs/bpf/{tag}")),
        listen: format!("127.0.0.1:{}", free_port()),
        proc: None,
        netns: None,
        env: vec![],
    };
    // Started inside the cgroup, so its sockets (the /metrics listener and
    // what it accepts) belong to the watched cgroup from the first.
    let mut run = agent.command();
    run.args(["run", "--cgroup"])
        .arg(&cgroup.path)
        .arg("--pin-dir")
        .arg(&agent.pin_dir)
        .args(["--listen", &agent.listen])
        .env("RUST_LOG", "warn");
    in_cgroup(&mut run, &cgroup.path);
    agent.proc = Some(Proc(run.spawn().unwrap()));
    let pid = agent.proc.as_ref().unwrap().0.id();
    assert!(
        eventually(Duration::from_secs(20), || agent
            .command()
            .args(["status", "--listen", &agent.listen])
            .output()
            .is_ok_and(|o| o.status.success())),
        "the agent did not start"
    );
    let procs = std::fs::read_to_string(cgroup.path.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == pid.to_string()),
        "agent in the watched cgroup"
    );
    let started = std::time::Instant::now();
    let mut polls = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let mut top = agent.command();
        top.args(["top", "--once", "--listen", &agent.listen]);
        in_cgroup(&mut top, &cgroup.path);
        let out = top.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        // A scraper outside the cgroup: the agent's answers are its own.
        http_get(&agent.listen, "/metrics").expect("scrape");
        polls += 1;
        std::thread::sleep(Duration::from_millis(500));
    }
    let flows = agent.flows();
    assert!(polls >= 30);
    assert!(
        flows.is_empty(),
        "{polls} polls of the live table and scrapes over 30 s made flows: {flows:#?}"
    );
    // Move the agent back out so the test cgroup can go.
    let root_procs = cgroup2_root().join("cgroup.procs");
    let _ = std::fs::write(root_procs, pid.to_string());
}
