"""The PCE through pylo (illumio-pylo), as its users load an organisation: labels, IP lists,
services, rule sets with scopes and rules, and workloads, then query them. pylo verifies TLS
with the requests default, so the PCE's CA is given as REQUESTS_CA_BUNDLE.

Run by crates/pce/tests/illumio_clients.rs after it made, with the `pce` CLI and illumio-py
conventions, a policy (see the test). Prints one line per check and ends with
"N passed, M failed"; exit status 1 when a check failed.
"""
import os

os.environ["REQUESTS_CA_BUNDLE"] = os.environ["PCE_CA"]
import illumio_pylo as pylo  # noqa: E402
from harness import check, finish  # noqa: E402


connector = pylo.APIConnector("127.0.0.1", os.environ["PCE_PORT"], os.environ["API_USER"], os.environ["API_SECRET"], org_id=1)
check("pylo reads the product version", connector.get_software_version_string().startswith("0."), connector.get_software_version_string())
created = connector.objects_label_create("A", "app")
check("pylo creates a label", created["href"].startswith("/orgs/1/labels/"), created)
check("pylo lists labels asynchronously", len(connector.objects_label_get(async_mode=True)) == 3)

org = pylo.Organization(1)
org.load_from_api(connector)
print(org.stats_to_str())
labels = {f"{l.type}={l.name}" for l in org.LabelStore.get_labels()}
check("the organisation's labels", {"role=web", "role=db", "app=A"} <= labels, labels)
rulesets = org.RulesetStore.rulesets
check("one rule set, loaded with its rules", len(rulesets) == 1 and rulesets[0].count_rules() == 1, rulesets)
rule = next(iter(rulesets[0].rules_by_href.values()))
providers = {l.name for l in rule.providers.get_labels()}
consumers = {l.name for l in rule.consumers.get_labels()}
check("the rule's providers and consumers", providers == {"db"} and consumers == {"web"}, (providers, consumers))
check("the rule's service", "5432" in rule.services.members_to_str(), rule.services.members_to_str())
iplists = {l.name for l in org.IPListStore.items_by_href.values()}
check("the default IP list", "Any (0.0.0.0/0 and ::/0)" in iplists, iplists)
services = {s.name for s in org.ServiceStore.itemsByHRef.values()}
check("the default service", "All Services" in services, services)
workloads = org.WorkloadStore.itemsByHRef
check("the paired workloads", sorted(w.get_name() for w in workloads.values()) == ["db", "web"], workloads)
check("pylo sees them managed, with their VEN", all(not w.unmanaged and w.ven_agent for w in workloads.values()), workloads)

finish()
