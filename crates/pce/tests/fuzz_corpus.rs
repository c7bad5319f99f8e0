//! Replays the seed corpora of the PCE's network-facing fuzz targets (fuzz/corpus/pce_http_head,
//! pce_event_hello, pce_admin_json, pce_support_report) through the same entry points the targets call, on the stable
//! toolchain: every file there, seeds and any crash input committed after a fix, must pass
//! without a panic, so a fixed bug stays fixed without a fuzzer in CI.
//!
//! The seeds are encoded values written by `seeds()` below; after changing it, rewrite them with
//!   cargo test -p pce --test fuzz_corpus -- --ignored write_seed_corpora
//! `fuzz/corpus` is git-ignored, so that what a campaign adds stays local: seeds and crash inputs
//! (`regression_*`, kept after the fix) are committed with `git add -f`.

use std::path::{Path, PathBuf};
use ven_proto::PROTOCOL_VERSION;
use ven_proto::frame::{self, VenFrame};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

type Entry = fn(&[u8]);

const TARGETS: [(&str, Entry); 4] = [
    ("pce_http_head", pce::fuzzing::http_connection),
    ("pce_event_hello", pce::fuzzing::event_hello),
    ("pce_admin_json", pce::fuzzing::admin_input),
    ("pce_support_report", pce::fuzzing::support_report_upload),
];

/// (target, file name, bytes) of every seed.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut seeds = Vec::new();
    let mut add =
        |target: &'static str, name: &str, bytes: Vec<u8>| seeds.push((target, name.to_string(), bytes));

    // Request heads and framing: what clients (the VEN, illumio-py, curl) send, and what the
    // server must refuse.
    let http: [(&str, &str); 14] = [
        (
            "get_admin",
            "GET /api/v2/orgs/1/labels?max_results=5 HTTP/1.1\r\nHost: pce\r\nAuthorization: good\r\n\r\n",
        ),
        (
            "post_label",
            "POST /api/v2/orgs/1/labels HTTP/1.1\r\nHost: pce\r\nAuthorization: good\r\nContent-Type: application/json\r\nContent-Length: 29\r\n\r\n{\"key\":\"role\",\"value\":\"web\"}",
        ),
        (
            "pipelined",
            "POST /a HTTP/1.1\r\nAuthorization: good\r\nContent-Length: 2\r\n\r\nhiGET /b HTTP/1.1\r\nAuthorization: good\r\n\r\n",
        ),
        (
            "activation_anonymous",
            "POST /ven/v1/activate HTTP/1.1\r\nX-Ven-Protocol: 1\r\nContent-Length: 4\r\n\r\nabcd",
        ),
        (
            "unauthenticated_16mib",
            "POST /api/v2/labels HTTP/1.1\r\nAuthorization: Bearer wrong\r\nExpect: 100-continue\r\nContent-Length: 16777216\r\n\r\nxxxx",
        ),
        (
            "expect_continue",
            "PUT /api/v2/labels/1 HTTP/1.1\r\nAuthorization: good\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
        ),
        (
            "chunked",
            "POST /a HTTP/1.1\r\nAuthorization: good\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        ),
        ("gzip_coding", "POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
        ("plus_length", "POST /a HTTP/1.1\r\nAuthorization: good\r\nContent-Length: +5\r\n\r\nhello"),
        ("conflicting_lengths", "POST /a HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
        (
            "http10_keepalive",
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: good\r\n\r\nGET / HTTP/1.0\r\n\r\n",
        ),
        ("truncated_body", "POST /a HTTP/1.1\r\nAuthorization: good\r\nContent-Length: 10\r\n\r\nshort"),
        ("bad_version", "GET / HTTP/9.9\r\n\r\n"),
        ("anonymous_too_large", "POST /ven/v1/activate HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n"),
    ];
    for (name, text) in http {
        add("pce_http_head", name, text.as_bytes().to_vec());
    }
    let many_headers: String = (0..70).map(|i| format!("X-{i}: v\r\n")).collect();
    add("pce_http_head", "too_many_headers", format!("GET / HTTP/1.1\r\n{many_headers}\r\n").into_bytes());
    add("pce_http_head", "binary_garbage", vec![0x16, 0x03, 0x01, 0x00, 0xff, 0x00, 0x0d, 0x0a, 0x0d, 0x0a]);

    // Event sessions: split byte, then the frames a VEN sends (encoded by ven-proto).
    let hello = frame::encode_frame(&VenFrame::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: 7,
        agent_token: "0123456789abcdef0123456789abcdef".into(),
    });
    let pong = frame::encode_frame(&VenFrame::Pong { nonce: 1 });
    let with_split = |split: u8, parts: &[&[u8]]| -> Vec<u8> {
        let mut bytes = vec![split];
        for part in parts {
            bytes.extend_from_slice(part);
        }
        bytes
    };
    add("pce_event_hello", "hello_one_read", with_split(255, &[&hello]));
    add("pce_event_hello", "hello_split", with_split(6, &[&hello]));
    add("pce_event_hello", "hello_trailing_byte", with_split(255, &[&hello, &[0]]));
    add("pce_event_hello", "hello_then_pong", with_split(255, &[&hello, &pong]));
    add("pce_event_hello", "pong_first", with_split(255, &[&pong]));
    add("pce_event_hello", "oversized_prefix", with_split(2, &[&[0x00, 0x01, 0x00, 0x01], &[0; 8]]));
    let old_version = frame::encode_frame(&VenFrame::Hello {
        protocol_version: 0,
        agent_id: 0,
        agent_token: String::new(),
    });
    add("pce_event_hello", "hello_version_0", with_split(0, &[&old_version]));
    // Issue 16: the Hello with the clone token and instance id, and one whose instance is too long.
    let clone_hello = |instance: String| {
        frame::encode_frame(&VenFrame::CloneHello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: 7,
            agent_token: "0123456789abcdef0123456789abcdef".into(),
            clone_token: "5e".repeat(16),
            instance,
        })
    };
    add("pce_event_hello", "clone_hello", with_split(9, &[&clone_hello("a1".repeat(16))]));
    add("pce_event_hello", "clone_hello_long_instance", with_split(255, &[&clone_hello("a".repeat(65))]));

    // Admin API inputs: first line, then the body.
    let admin: [(&str, &str); 10] = [
        ("label_href", "/orgs/1/labels/7\n{\"key\":\"role\",\"value\":\"web\"}"),
        ("old_href", "/api/v2/workloads/12\n{\"labels\":[{\"href\":\"/orgs/1/labels/1\"}]}"),
        ("plus_id", "+1\n{\"key\":\"role\"}"),
        ("leading_zero_href", "/orgs/1/labels/01\n{\"value\":\"x\"}"),
        ("query", "max_results=25&name=Any+%280.0.0.0%2F0%29\n[]"),
        ("basic_credentials", "Basic YXBpXzFmOnMzY3JldA==\n{\"name\":\"key\",\"description\":\"d\"}"),
        ("bidi_value", "/orgs/1/labels/2\n{\"key\":\"role\",\"value\":\"gpj\u{202e}web\"}"),
        ("escape_key", "/orgs/1/labels/3\n{\"key\":\"a\\u001b[2J\",\"value\":\"v\"}"),
        ("wrong_types", "/orgs/1/rule_sets/1\n{\"key\":5,\"value\":[true]}"),
        ("broken_json", "/orgs/1/services/1\n{\"key\": \"ro"),
    ];
    for (name, text) in admin {
        add("pce_admin_json", name, text.as_bytes().to_vec());
    }
    add("pce_admin_json", "deep_nesting", format!("\n{}{}", "[".repeat(200), "]".repeat(200)).into_bytes());

    // Support report uploads: a whole (minimal) ustar archive, the same truncated, not a tar, a
    // length prefix far past the cap with few bytes behind it.
    let mut archive = vec![0u8; 4 * 512];
    archive[..8].copy_from_slice(b"MANIFEST");
    archive[257..262].copy_from_slice(b"ustar");
    archive[512..520].copy_from_slice(b"contents");
    let upload = |report: Vec<u8>| ven_proto::encode(&ven_proto::SupportReportUpload { request: 3, report });
    add("pce_support_report", "whole_archive", upload(archive.clone()));
    add("pce_support_report", "truncated_archive", upload(archive[..3 * 512].to_vec()));
    add("pce_support_report", "not_a_tar", upload(b"hello".to_vec()));
    add("pce_support_report", "huge_length_prefix", vec![3, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]);
    seeds
}

#[test]
fn every_corpus_file_replays_without_a_panic() {
    for (target, entry) in TARGETS {
        let dir = corpus(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} has no seeds", dir.display());
        for file in &files {
            let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            entry(&bytes);
        }
        eprintln!("{target}: {} files replayed", files.len());
    }
}

#[test]
fn the_committed_seeds_are_the_encoded_values() {
    for (target, name, bytes) in seeds() {
        let path = corpus(target).join(&name);
        let committed =
            std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e} (see the header)", path.display()));
        assert_eq!(committed, bytes, "{} differs from seeds(); rewrite the seeds", path.display());
    }
}

#[test]
#[ignore = "writes the seed corpora (see the header)"]
fn write_seed_corpora() {
    for (target, name, bytes) in seeds() {
        let dir = corpus(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("write seed");
    }
}
