"""Explorer traffic and async collections through illumio-py: an async traffic query with
label, IP address and service filters and policy decisions, and an async label collection.

Run by crates/pce/tests/illumio_clients.rs after it paired `web` (198.18.0.2, role=web) and `db`
(198.18.0.3, role=db) and uploaded db's flows: 198.18.0.2 -> 198.18.0.3 tcp/5432 allowed (3
connections), 198.18.0.2 -> 198.18.0.3 tcp/22 blocked, 198.18.0.9 -> 198.18.0.3 udp/53 blocked.
Prints one line per check and ends with "N passed, M failed"; exit status 1 when a check failed.
"""

from harness import check, connect, finish
from illumio.explorer import TrafficQuery


pce = connect()

db_label = pce.labels.get(params={"key": "role", "value": "db"})[0]
web_label = pce.labels.get(params={"key": "role", "value": "web"})[0]

everything = pce.get_traffic_flows_async("all", TrafficQuery.build(start_date="2020-01-01T00:00:00Z", end_date="2099-01-01T00:00:00Z"))
check("an unfiltered query returns every flow", len(everything) == 3, everything)

to_db = pce.get_traffic_flows_async("web to db", TrafficQuery.build(
    start_date="2020-01-01T00:00:00Z", end_date="2099-01-01T00:00:00Z",
    include_sources=[web_label.href], include_destinations=[db_label.href],
))
check("label filters find web -> db", sorted(f.service.port for f in to_db) == [22, 5432], to_db)
allowed = [f for f in to_db if f.policy_decision == "allowed"]
check("the allowed flow counts its connections", allowed and allowed[0].num_connections == 3, allowed)
check("flows name their workloads", allowed and allowed[0].dst.workload.hostname == "db", allowed)

blocked = pce.get_traffic_flows_async("blocked", TrafficQuery.build(
    start_date="2020-01-01T00:00:00Z", end_date="2099-01-01T00:00:00Z", policy_decisions=["blocked"],
))
check("policy decisions filter", sorted(f.service.port for f in blocked) == [22, 53], blocked)

dns = pce.get_traffic_flows_async("dns", TrafficQuery.build(
    start_date="2020-01-01T00:00:00Z", end_date="2099-01-01T00:00:00Z",
    include_sources=["198.18.0.9"], include_services=[{"port": 53, "proto": 17}],
))
check("address and service filters", [f.src.ip for f in dns] == ["198.18.0.9"], dns)

not_ssh = pce.get_traffic_flows_async("not ssh", TrafficQuery.build(
    start_date="2020-01-01T00:00:00Z", end_date="2099-01-01T00:00:00Z", exclude_services=[{"port": 22, "proto": 6}],
))
check("excluded services are left out", sorted(f.service.port for f in not_ssh) == [53, 5432], not_ssh)

before = pce.get_traffic_flows_async("old", TrafficQuery.build(start_date="2020-01-01T00:00:00Z", end_date="2020-01-02T00:00:00Z"))
check("the date range filters", before == [], before)

labels = pce.labels.get_async()
check("an async collection (202, job, datafile) returns every label",
      sorted(l.value for l in labels) == ["db", "web"], labels)

finish()
