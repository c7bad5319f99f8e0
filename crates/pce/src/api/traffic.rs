//! `/orgs/1/traffic_flows`: the flows the VENs uploaded; parameters and answer in
//! [`crate::traffic`].

use super::{Answer, invalid};
use crate::app::App;
use crate::http::{Request, Response};
use crate::traffic::{self, Query};

/// The matching flows, newest first: `{"total", "returned", "more", "flows": [...], "store": {...}}`
/// with `X-Total-Count`. The flows are copied out, so the JSON is built without the lock.
pub fn flows(app: &App, request: &Request) -> Answer {
    let query = Query::parse(&request.head.query).map_err(|e| invalid(&e))?;
    let (selection, stats) = {
        let flows = app.flows();
        (traffic::select(&flows, &query), flows.stats())
    };
    let total = selection.total;
    let body = traffic::answer_json(&selection, &stats);
    Ok(Response::with_body(200, "application/json", body).header("x-total-count", total.to_string()))
}
