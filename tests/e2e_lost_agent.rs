//! The spec's lost agent, end to end with the real binaries in the lab's namespaces: an agent
//! whose token the PCE no longer accepts (here: its token corrupted in its data directory) goes
//! into the lost agent state, and the PCE raises one `lost_agent` organisation event for it however
//! often it comes back within the window (three agent starts, each heartbeating at once).

use std::time::Duration;

use ven::state::{self, Identity, RecordKind};
use ven_lab::scenario::Host;
use ven_lab::{Binaries, Lab, LabOptions};

fn prerequisites(test: &str) -> Option<Binaries> {
    ven_lab::binaries::for_end_to_end_test(test, env!("CARGO_BIN_EXE_ven"), &[])
}

fn lost_agent_events(lab: &Lab) -> usize {
    let events = lab.events().expect("pce events");
    events.iter().filter(|e| e.event_type == "lost_agent" && e.hostname.as_deref() == Some("web")).count()
}

/// Waits until the agent on web reports the lost agent state.
fn wait_lost(lab: &Lab) {
    let lost = lab.wait_until("web's agent in the lost agent state", Duration::from_secs(20), |lab| {
        let status = lab.ven_status(Host::Web)?;
        let connectivity = status.connectivity.unwrap_or_default();
        Ok((!connectivity.contains("lost")).then_some(connectivity))
    });
    lost.unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
}

#[test]
fn a_wrong_agent_token_raises_one_lost_agent_event_per_window() {
    let Some(bins) = prerequisites("a_wrong_agent_token_raises_one_lost_agent_event_per_window") else {
        return;
    };
    let opts = LabOptions { name_prefix: "venlost".into(), ..LabOptions::default() };
    let mut lab = Lab::new(bins, opts).expect("building the lab");
    lab.start_pce().expect("start the PCE");
    lab.activate(Host::Web).expect("activate web");
    assert_eq!(lost_agent_events(&lab), 0, "nothing is lost yet");

    // The token in web's identity no longer matches what the PCE holds.
    let path = lab.data_dir(Host::Web).join("state/identity");
    let mut identity: Identity =
        state::read_record(&path, RecordKind::Identity).expect("web's identity").expect("activated");
    let wrong: String = identity.agent_token.chars().map(|c| if c == '0' { '1' } else { '0' }).collect();
    identity.agent_token = wrong;
    state::write_record(&path, RecordKind::Identity, &identity, 0o600).expect("write the identity");

    lab.start_agent(Host::Web).expect("start web's agent");
    wait_lost(&lab);
    let raised = lab.wait_until("a lost_agent event for web", Duration::from_secs(10), |lab| {
        let count = lost_agent_events(lab);
        Ok((count == 0).then(|| "none yet".to_string()))
    });
    raised.unwrap_or_else(|e| panic!("{e}\n{}", lab.diagnostics()));
    let event = lab.events().expect("pce events").into_iter().find(|e| e.event_type == "lost_agent");
    let event = event.expect("the event");
    assert!(event.message.contains("lost agent"), "{event:?}");

    // The agent comes back twice more (each start heartbeats at once and is refused): still one.
    for _ in 0..2 {
        lab.stop_agent(Host::Web).expect("stop web's agent");
        lab.start_agent(Host::Web).expect("start web's agent again");
        wait_lost(&lab);
    }
    assert_eq!(lost_agent_events(&lab), 1, "one event per agent per window: {:#?}", lab.events());
}
