//! The quick tamper check's set sizes, read over netlink from the real kernel in a fresh network
//! namespace, agree with `ipset list -t`, list only our sets, and see a member removed behind
//! the agent's back.

mod common;

use common::*;
use ven_lab::netns::Netns;

fn ipset(ns: &Netns, args: &[&str]) {
    let out = ns.exec("ipset", args).expect("run ipset");
    assert!(out.status.success(), "ipset {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn set_sizes_over_netlink_match_ipset_list() {
    if !require_kernel() {
        return;
    }
    let ns = Netns::new("vensz").expect("network namespace");
    ipset(&ns, &["create", "ven-41", "hash:net", "family", "inet"]);
    ipset(&ns, &["create", "ven-41-6", "hash:net", "family", "inet6"]);
    ipset(&ns, &["create", "operators-own", "hash:ip"]);
    for member in ["198.18.0.1", "198.18.0.0/30", "198.18.7.0/24"] {
        ipset(&ns, &["add", "ven-41", member]);
    }
    ipset(&ns, &["add", "operators-own", "198.18.9.9"]);
    let sizes = ns.run(ven::firewall::kernel_set_sizes).expect("enter the namespace").expect("netlink dump");
    assert_eq!(sizes.get("ven-41"), Some(&3));
    assert_eq!(sizes.get("ven-41-6"), Some(&0));
    assert!(!sizes.contains_key("operators-own"), "only our sets: {sizes:?}");

    // The same as `ipset list -t` says.
    let listing = ns.exec("ipset", &["list", "-t", "ven-41"]).expect("ipset list -t");
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(text.contains("Number of entries: 3"), "{text}");

    // Tampering: a member removed behind the agent's back shows at once.
    ipset(&ns, &["del", "ven-41", "198.18.7.0/24"]);
    let sizes = ns.run(ven::firewall::kernel_set_sizes).expect("enter").expect("dump");
    assert_eq!(sizes.get("ven-41"), Some(&2));

    // Many sets: the dump spans several datagrams and still ends.
    for n in 0..300 {
        ipset(&ns, &["create", &format!("ven-9{n:03}"), "hash:net"]);
    }
    let sizes = ns.run(ven::firewall::kernel_set_sizes).expect("enter").expect("dump");
    assert_eq!(sizes.len(), 302, "every set of ours, across datagrams");
}
