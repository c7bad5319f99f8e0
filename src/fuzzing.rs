//! The fuzz targets' entry points: one function per target of `fuzz/fuzz_targets/`, named after
//! it, taking the fuzzer's bytes. Each target's body is one call into its function here, and the
//! corpus replay test (`tests/fuzz_corpus.rs`) calls the same function on every committed corpus
//! file and fixed crash, so a plain `cargo test` keeps them fixed without a fuzzer. A function
//! returns normally for any input and panics only when an invariant of its decoder breaks. Not
//! an API.

use std::io::Cursor;

use ven_proto::frame::{MAX_FRAME_BYTES, PceFrame, VenFrame, read_frame};

use crate::agent::control::{ControlRequest, ControlResponse};
use crate::conntrack::{DumpReader, for_each_ack, for_each_destroyed, parse_connection, push_delete_request};
use crate::flows::store::{batch_from_chunks, decode_stored_chunk, decode_stored_summary};
use crate::history::{self, Listed};
use crate::state::{self, CloneSuspicion, Identity, RecordKind, SavedStatus, Suspension};

/// A target's entry point.
pub type Entry = fn(&[u8]);

/// The agent's targets by name (the directory names under fuzz/corpus and fuzz/regressions).
pub const TARGETS: &[(&str, Entry)] = &[
    ("config_text", config_text),
    ("control_requests", control_requests),
    ("ctnetlink", ctnetlink),
    ("event_frames", event_frames),
    ("flow_store_rows", flow_store_rows),
    ("history_diff", history_diff),
    ("history_entries", history_entries),
    ("history_payloads", history_payloads),
    ("ipset_list", ipset_list),
    ("ipset_save", ipset_save),
    ("ipset_sizes", ipset_sizes),
    ("iptables_save", iptables_save),
    ("netlink_acks", netlink_acks),
    ("nflog_packets", nflog_packets),
    ("nft_generation", nft_generation),
    ("policy_rendering", policy_rendering),
    ("policy_restore", policy_restore),
    ("state_payloads", state_payloads),
    ("state_records", state_records),
    ("tls_trust", tls_trust),
    ("ven_api_messages", ven_api_messages),
];

/// Text decoders see the bytes as a file or a pipe gives them: invalid UTF-8 replaced.
fn text(data: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(data)
}

/// ctnetlink datagrams as a netlink socket hands them over (dump replies, acks, destroy events
/// with their counters): hostile bytes give entries or an error, never a panic; an entry that decodes re-encodes (as a delete request) to itself.
pub fn ctnetlink(data: &[u8]) {
    // The first 4 bytes pick the dump's sequence number, so that replies both match and not.
    let (seq, datagram) = match data.split_first_chunk::<4>() {
        Some((seq, rest)) => (u32::from_ne_bytes(*seq), rest),
        None => (0, data),
    };
    let mut reader = DumpReader::new(seq);
    let _ = reader.feed(datagram, &mut |_| {});
    // A second datagram after the first, as a multi-part dump delivers them.
    let _ = reader.feed(data, &mut |_| {});
    let _ = for_each_ack(data, &mut |_| {});
    // Destroy events (flow accounting): counters sum without overflow.
    let _ = for_each_destroyed(data, &mut |_, _| {});
    let _ = for_each_destroyed(datagram, &mut |_, _| {});
    if let Ok(connection) = parse_connection(data, 0) {
        let mut request = Vec::new();
        push_delete_request(&mut request, seq, &connection);
        // The request is nlmsghdr (16 bytes) followed by the same payload layout.
        assert_eq!(parse_connection(&request[16..], 16).ok(), Some(connection));
    }
}

/// The event service's framing, from both ends: a stream of hostile bytes ends in frames or an
/// error, never a panic or a buffer past MAX_FRAME_BYTES.
pub fn event_frames(data: &[u8]) {
    let mut buf = Vec::new();
    let mut reader = data;
    while read_frame::<PceFrame>(&mut reader, &mut buf).is_ok() {
        assert!(buf.len() <= MAX_FRAME_BYTES);
    }
    let mut reader = data;
    while read_frame::<VenFrame>(&mut reader, &mut buf).is_ok() {
        assert!(buf.len() <= MAX_FRAME_BYTES);
    }
}

/// Rows read back from the flow stores (flow.db's chunks of raw rows, flowsum.db's aggregates)
/// after a torn write, a damaged flash page or tampering: what does not decode is skipped and
/// counted, never misread as another sequence number or panicked on, and an upload batch built
/// from such chunks keeps its promises (after the cursor, consecutive, bounded).
pub fn flow_store_rows(data: &[u8]) {
    // One chunk, as stored: rows numbered from its key, in order, at most one undecodable.
    let first = 1_000;
    let (rows, undecodable) = decode_stored_chunk(first, data);
    assert!(undecodable <= 1);
    for (index, (seq, record)) in rows.iter().enumerate() {
        assert_eq!(*seq, first + index as u64);
        // Rows of either encoding (tagged, or version 3's bare postcard) read back in this
        // version's: written again they are tagged and read the same.
        let mut row = Vec::new();
        ven_proto::flow_row::encode_into(record, &mut row);
        assert_eq!(decode_stored_summary(&row), Some(*record));
    }
    let _ = decode_stored_summary(data);

    // Several chunks: [cursor: 1 byte][max: 1 byte] then [first-seq step: 1][length: 1][bytes].
    let &[cursor, max, ref chunked @ ..] = data else { return };
    let mut rest: &[u8] = chunked;
    let mut chunks = Vec::new();
    let mut key = 1u64;
    while let &[step, len, ref tail @ ..] = rest {
        let len = usize::from(len).min(tail.len());
        key += u64::from(step);
        chunks.push((key, &tail[..len]));
        rest = &tail[len..];
    }
    let acknowledged = u64::from(cursor);
    let (batch, undecodable) = batch_from_chunks(acknowledged, usize::from(max), chunks.iter().copied());
    assert!(undecodable <= chunks.len() as u64);
    if let Some(batch) = batch {
        assert!(batch.first > acknowledged);
        assert!(!batch.records.is_empty());
        assert!(batch.records.len() <= usize::from(max).min(ven_proto::MAX_FLOWS_PER_BATCH));
    }
}

/// History files read back after a crash, a torn write or tampering: corrupt input is reported,
/// never misread or panicked on, and what decodes renders without panicking.
pub fn history_entries(data: &[u8]) {
    if let Ok(entry) = history::decode_entry(data) {
        let _ = history::render_entry(&entry);
    }
}

/// The history entry decoder past the checksum (random bytes never pass it): `data` is the
/// payload of a history file with a valid header and checksum. What decodes renders in every
/// form `ven history` has, and encodes back to the same entry.
pub fn history_payloads(data: &[u8]) {
    let Ok(file) = history::frame_entry(data) else { return };
    let Ok(entry) = history::decode_entry(&file) else { return };
    let _ = history::render_entry(&entry);
    let listed = [Listed::Entry(entry.clone())];
    let _ = history::render_table(&listed);
    let _ = history::render_json(&listed);
    let again = postcard::to_allocvec(&entry).expect("an entry encodes");
    let file = history::frame_entry(&again).expect("a decoded entry fits a file");
    assert_eq!(history::decode_entry(&file).ok(), Some(entry));
}

/// The one-line summary of what changed between two recorded rulesets, from text read back from
/// history files (anything a tampered file holds): `previous NUL next`, or only `next` (a first
/// entry) when there is no NUL. Never a panic (issue 17: member counts summed past u64::MAX).
pub fn history_diff(data: &[u8]) {
    let text = text(data);
    let summary = match text.split_once('\0') {
        Some((previous, next)) => {
            let summary = history::diff_summary(Some(previous), next);
            if previous == next {
                assert!(summary.starts_with("no change"), "{summary}");
            }
            summary
        }
        None => {
            let again = history::diff_summary(Some(&text), &text);
            assert!(again.starts_with("no change"), "{again}");
            history::diff_summary(None, &text)
        }
    };
    assert!(!summary.contains('\n'));
}

/// `ipset list -t` output (see `firewall::fuzz_ipset_list`).
pub fn ipset_list(data: &[u8]) {
    crate::firewall::fuzz_ipset_list(&text(data));
}

/// `ipset save` output (see `firewall::fuzz_ipset_save`).
pub fn ipset_save(data: &[u8]) {
    crate::firewall::fuzz_ipset_save(&text(data));
}

/// One datagram of the kernel's IPSET_CMD_LIST header dump, read on every quick tamper check:
/// truncated or garbled datagrams are errors, never panics, and only our sets come out.
pub fn ipset_sizes(data: &[u8]) {
    if let Ok(sizes) = crate::firewall::parse_set_sizes_datagram(data) {
        assert!(sizes.keys().all(|name| name.starts_with("ven-")));
    }
}

/// `iptables-save -t filter` output (see `firewall::fuzz_iptables_save`).
pub fn iptables_save(data: &[u8]) {
    crate::firewall::fuzz_iptables_save(&text(data));
}

/// Netlink datagrams as the NFLOG reader's configuration (and every netfilter client) reads them
/// for an acknowledgement: the first 4 bytes are the request's sequence number. Never a panic;
/// an acknowledgement is found only in a message that the message walker also finds, and every
/// message's payload lies inside the datagram.
pub fn netlink_acks(data: &[u8]) {
    let (seq, datagram) = match data.split_first_chunk::<4>() {
        Some((seq, rest)) => (u32::from_ne_bytes(*seq), rest),
        None => (0, data),
    };
    let ack = crate::flows::nflog::acknowledgement(datagram, seq);
    match crate::netlink::messages(datagram) {
        Ok(messages) => {
            for message in &messages {
                let end = message.payload_offset + message.payload.len();
                assert!(end <= datagram.len());
                assert_eq!(&datagram[message.payload_offset..end], message.payload);
            }
            if let Some(code) = ack {
                assert!(messages.iter().any(|message| message.kind == crate::netlink::NLMSG_ERROR
                    && message.seq == seq
                    && message.payload.get(..4) == Some(&code.to_ne_bytes()[..])));
            }
        }
        Err((_, offset)) => assert!(offset < datagram.len()),
    }
    // The reader decodes the same datagram while it waits for the acknowledgement.
    let mut state = crate::flows::DecodeState::default();
    let _ = state.decode(datagram, &mut |_| {});
    let _ = for_each_ack(datagram, &mut |_| {});
}

/// Datagrams of NFLOG messages as the flow pipeline's reader receives them from the kernel:
/// truncated or garbled netlink, IP or transport headers are counted, never panics.
pub fn nflog_packets(data: &[u8]) {
    let (keys, loss) = crate::flows::decode_datagram(data);
    // Every message is at least a netlink header and its nfgenmsg.
    assert!(keys.len() <= data.len() / 20);
    let _ = loss.lost();
    // The message parser on its own, and the packet parser on the raw bytes.
    if let Ok(message) = crate::flows::packet::parse_message(data) {
        let _ = message.flow_key();
    }
    for version in [4, 6] {
        let _ = crate::flows::packet::parse_ip(data, version);
    }
}

/// The kernel's answer to NFT_MSG_GETGEN, read on every quick tamper check: truncated or
/// garbled datagrams are errors, never panics.
pub fn nft_generation(data: &[u8]) {
    let seq = data.first().copied().map_or(0, u32::from);
    let _ = crate::firewall::parse_generation_reply(data, seq);
}

/// A policy from the PCE is untrusted: whatever decodes must either be refused by validation or
/// render into text that keeps every rule on its own line (no operator text can add a command).
pub fn policy_rendering(data: &[u8]) {
    let Ok(policy) = ven_proto::decode::<ven_proto::Policy>(data) else { return };
    let _ = crate::firewall::render_check(&policy);
}

/// The last-known-good policy restored at boot, after a restart or on unsuspend (`state/policy`,
/// past its checksum: `data` is the record's payload): what decodes is refused by validation or
/// renders, and the text the history records of it reads back with the same rule count and as
/// no change against itself. Then the same payload as the host firewall saved at activation
/// (`state/firewall-saved`, put back by `deactivate --firewall saved`): its parts go through the
/// parsers the restore uses.
pub fn policy_restore(data: &[u8]) {
    let file = state::frame_record(RecordKind::Policy, data);
    if let Ok(policy) = state::decode_record::<ven_proto::Policy>(&file, RecordKind::Policy) {
        if let Ok((text, rules)) = crate::firewall::restored_text(&policy) {
            let described = history::diff_summary(None, &text);
            let expected = if rules == 1 {
                "first entry: 1 rule, ".to_string()
            } else {
                format!("first entry: {rules} rules, ")
            };
            assert!(described.starts_with(&expected), "{described} for {rules} rules");
            assert_eq!(history::diff_summary(Some(&text), &text), "no change");
        }
    }
    let file = state::frame_record(RecordKind::SavedFirewall, data);
    if let Ok(snapshot) = state::decode_record::<crate::firewall::Snapshot>(&file, RecordKind::SavedFirewall)
    {
        crate::firewall::fuzz_iptables_save(&snapshot.v4);
        if let Some(v6) = &snapshot.v6 {
            crate::firewall::fuzz_iptables_save(v6);
        }
        crate::firewall::fuzz_ipset_save(&snapshot.ipsets);
    }
}

/// Every state record's payload decoder past the checksum (random bytes never pass it): `data` is
/// the payload of a record with a valid header and checksum, read as each kind. What decodes
/// encodes back to the same value, and an identity's CA is what the client would trust.
pub fn state_payloads(data: &[u8]) {
    fn round_trip<T>(data: &[u8], kind: RecordKind) -> Option<T>
    where
        T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
    {
        let value: T = state::decode_record(&state::frame_record(kind, data), kind).ok()?;
        let again = postcard::to_allocvec(&value).expect("a decoded record encodes");
        assert_eq!(
            state::decode_record::<T>(&state::frame_record(kind, &again), kind).ok().as_ref(),
            Some(&value)
        );
        Some(value)
    }
    if let Some(identity) = round_trip::<Identity>(data, RecordKind::Identity) {
        let _ = crate::agent::tls::client_config(&identity.ca_cert_der);
        let _ = crate::agent::tls::split_server(&identity.management_server);
    }
    let _ = round_trip::<ven_proto::Policy>(data, RecordKind::Policy);
    let _ = round_trip::<SavedStatus>(data, RecordKind::Status);
    let _ = round_trip::<crate::firewall::Snapshot>(data, RecordKind::SavedFirewall);
    let _ = round_trip::<Suspension>(data, RecordKind::Suspended);
    if let Some(record) = round_trip::<crate::agent::upgrade::UpgradeRecord>(data, RecordKind::Upgrade) {
        // What `ven status` prints of it, whatever the record holds.
        let _ = crate::agent::upgrade::describe(&record);
        let _ = crate::agent::upgrade::staged_path(&record.installed);
    }
    let _ = round_trip::<[u8; 32]>(data, RecordKind::ReleaseKey);
    let _ = round_trip::<String>(data, RecordKind::CloneToken);
    let _ = round_trip::<CloneSuspicion>(data, RecordKind::CloneSuspected);
}

/// State files read back after a crash, a torn write or tampering: corrupt input is reported,
/// never misread or panicked on.
pub fn state_records(data: &[u8]) {
    let _ = state::decode_record::<Identity>(data, RecordKind::Identity);
    let _ = state::decode_record::<ven_proto::Policy>(data, RecordKind::Policy);
    let _ = state::decode_record::<SavedStatus>(data, RecordKind::Status);
    let _ = state::decode_record::<crate::firewall::Snapshot>(data, RecordKind::SavedFirewall);
    let _ = state::decode_record::<Suspension>(data, RecordKind::Suspended);
    let _ = state::decode_record::<String>(data, RecordKind::CloneToken);
    let _ = state::decode_record::<CloneSuspicion>(data, RecordKind::CloneSuspected);
    let _ = state::decode_record::<crate::agent::upgrade::UpgradeRecord>(data, RecordKind::Upgrade);
    let _ = state::decode_record::<[u8; 32]>(data, RecordKind::ReleaseKey);
}

/// The configuration file (`/etc/ven/ven.conf`, any text): a value is accepted within its bounds
/// or refused with the line, never a panic; what parses sets up the firewall options.
pub fn config_text(data: &[u8]) {
    let text = text(data);
    match crate::config::Config::parse(&text) {
        Ok(config) => {
            assert!(config.unknown_keys.len() <= crate::config::MAX_UNKNOWN_KEYS_KEPT);
            assert!(config.caps.max_rules >= 1 && config.caps.max_set_members >= 1);
            let _ = crate::firewall::Options::from_config(&config);
        }
        Err((line, _)) => assert!(line >= 1 && line <= text.lines().count()),
    }
}

/// Requests on the agent's control socket (and its answers, read by the CLI): a stream of bytes
/// gives frames or an error, never a panic; a request that decodes encodes back to itself.
pub fn control_requests(data: &[u8]) {
    let mut reader = Cursor::new(data);
    let mut buf = Vec::new();
    while let Ok(request) = read_frame::<ControlRequest>(&mut reader, &mut buf) {
        let framed = ven_proto::frame::encode_frame(&request);
        let again: Option<ControlRequest> = read_frame(&mut Cursor::new(framed), &mut Vec::new()).ok();
        assert_eq!(again, Some(request));
    }
    let mut reader = Cursor::new(data);
    while read_frame::<ControlResponse>(&mut reader, &mut buf).is_ok() {
        assert!(buf.len() <= MAX_FRAME_BYTES);
    }
}

/// What an operator gives `ven activate` to trust the PCE: the CA file (PEM or DER), the CA
/// fingerprint and the management server's `HOST:PORT`. Bad input is an error, never a panic; a
/// fingerprint is normalised to 64 lowercase hex digits, and a CA accepted is a usable anchor.
pub fn tls_trust(data: &[u8]) {
    if let Ok(der) = crate::agent::tls::parse_ca(data.to_vec()) {
        assert!(crate::agent::tls::client_config(&der).is_ok());
        assert_eq!(crate::agent::tls::fingerprint(&der).len(), 64);
    }
    let text = text(data);
    if let Ok(hex) = crate::agent::tls::parse_fingerprint(&text) {
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(crate::agent::tls::parse_fingerprint(&hex).ok(), Some(hex));
    }
    if let Ok((_, port)) = crate::agent::tls::split_server(&text) {
        assert_ne!(port, 0);
    }
}

/// Every VEN API body either side decodes: bytes from the network must give a value or an error.
pub fn ven_api_messages(data: &[u8]) {
    use ven_proto::*;
    if let Ok(policy) = decode::<Policy>(data) {
        // What decodes must encode back to something that decodes to the same value.
        assert_eq!(decode::<Policy>(&encode(&policy)).ok(), Some(policy));
    }
    let _ = decode::<ActivateRequest>(data);
    let _ = decode::<ActivateResponse>(data);
    let _ = decode::<HeartbeatRequest>(data);
    let _ = decode::<HeartbeatRequestV5>(data);
    let _ = decode::<HeartbeatResponse>(data);
    let _ = decode::<HeartbeatResponseV5>(data);
    let _ = decode::<ErrorBody>(data);
    let _ = decode::<Goodbye>(data);
    // A release download's signature header, and the version and target it was asked for.
    let text = String::from_utf8_lossy(data);
    if let Ok(signature) = release::parse_signature(&text) {
        assert_eq!(release::parse_signature(&release::hex(&signature)), Ok(signature));
    }
    let _ = release::parse_key(&text);
    if release::check_version(&text).is_ok() {
        assert!(!text.contains('/') && !text.starts_with('.'), "a version becomes a file name");
    }
    let _ = release::check_target(&text);
}
