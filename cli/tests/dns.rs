//! DNS re-resolution, black-box, through the system resolver: an endpoint named by a host name
//! follows `/etc/hosts` without a restart (a change, several addresses, all used), and keeps
//! serving on the addresses it knows when the name stops resolving.
//!
//! The only test in its binary: it edits `/etc/hosts` (one line for a name of its own, under
//! `.test`, removed afterwards), and no other test of this binary runs meanwhile. Needs root,
//! as CI has.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Lines of `/etc/hosts` for one name, restored on drop.
struct HostsEntry {
    name: String,
    original: String,
}

const HOSTS: &str = "/etc/hosts";

impl HostsEntry {
    fn new(name: &str) -> HostsEntry {
        let original = std::fs::read_to_string(HOSTS).expect("read /etc/hosts");
        HostsEntry {
            name: name.to_owned(),
            original,
        }
    }

    /// Maps the name to `ips` (none: the name is gone). Written in place with one write (the
    /// file may be a bind mount, which a rename would not replace).
    fn set(&self, ips: &[&str]) {
        let mut text = self.original.clone();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        for ip in ips {
            text.push_str(&format!("{ip} {}\n", self.name));
        }
        std::fs::write(HOSTS, text)
            .expect("/etc/hosts must be writable for this test (CI runs as root)");
    }
}

impl Drop for HostsEntry {
    fn drop(&mut self) {
        let _ = std::fs::write(HOSTS, &self.original);
    }
}

async fn served_by(gw: &Gateway, key: &str) -> String {
    let r = gw.chat(key, &chat("gpt-4o")).await;
    assert_eq!(r.status(), 200);
    let s = r.headers()["x-mock-server"].to_str().unwrap().to_owned();
    r.bytes().await.unwrap();
    s
}

async fn wait_served_by(gw: &Gateway, key: &str, want: &str) -> Duration {
    let start = Instant::now();
    while served_by(gw, key).await != want {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never served by {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

fn addresses(gw: &Gateway) -> Vec<String> {
    let v: Value = serde_json::from_str(&http_get(gw.ops, "/readyz").1).unwrap();
    v["upstreams"][0]["endpoints"][0]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_change_is_picked_up_without_restart_and_every_address_is_used() {
    // Two mocks on the same port of two loopback addresses.
    let port = free_port();
    let a = Mock::start(&["--name", "a", "--listen", &format!("127.0.0.1:{port}")]);
    let b = Mock::start(&["--name", "b", "--listen", &format!("127.0.0.2:{port}")]);
    let name = format!("aihub-dns-{}.test", std::process::id());
    let hosts = HostsEntry::new(&name);
    hosts.set(&["127.0.0.1"]);
    let k = key("dns", &[]);
    let gw = Gateway::start(
        &config(
            &[upstream(
                "m",
                &[format!("http://{name}:{port}/v1")],
                &["dns: {refresh: 200ms}"],
            )],
            &[("gpt-4o", "m", None)],
            &[&k],
        ),
        &[],
    );
    assert_eq!(served_by(&gw, &k.key).await, "a");
    assert_eq!(addresses(&gw), vec![a.addr.to_string()]);

    // The record changes: the next resolution moves every new request over.
    hosts.set(&["127.0.0.2"]);
    let took = wait_served_by(&gw, &k.key, "b").await;
    assert!(took < Duration::from_secs(2), "picked up after {took:?}");
    for _ in 0..10 {
        assert_eq!(served_by(&gw, &k.key).await, "b");
    }

    // Two addresses: both take requests, in turn.
    hosts.set(&["127.0.0.1", "127.0.0.2"]);
    let start = Instant::now();
    while addresses(&gw).len() != 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            addresses(&gw)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for _ in 0..20 {
        *seen.entry(served_by(&gw, &k.key).await).or_default() += 1;
    }
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&10), "{seen:?}");

    // The name stops resolving: the known addresses keep serving.
    hosts.set(&[]);
    let failed = format!(
        "aihub_upstream_dns_resolutions_total{{endpoint=\"http://{name}:{port}/v1\",result=\"failed\",upstream=\"m\"}}"
    );
    let start = Instant::now();
    while gw.metric(&failed) < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no failed resolution"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..10 {
        let s = served_by(&gw, &k.key).await;
        assert!(s == "a" || s == "b");
    }
    assert_eq!(addresses(&gw).len(), 2);
    let changed = format!(
        "aihub_upstream_dns_resolutions_total{{endpoint=\"http://{name}:{port}/v1\",result=\"changed\",upstream=\"m\"}}"
    );
    assert_eq!(gw.metric(&changed), 2.0);
    drop(hosts);
    drop((a, b));
}
