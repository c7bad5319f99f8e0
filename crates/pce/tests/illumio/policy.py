"""Security policy through illumio-py, as an operator's script would build it: labels, an IP
list with an exclusion, a service, a scoped rule set with rules, partial and full provisioning,
policy versions, the default objects, and the errors a mistake gets.

Run by crates/pce/tests/illumio_clients.rs (see labels.py for the environment). Prints one line
per check and ends with "N passed, M failed"; exit status 1 when a check failed.
"""

from harness import check, connect, finish, refused
from illumio.policyobjects import IPList, IPRange, Label, LabelSet, Service, ServicePort
from illumio.rules import Rule, RuleSet


pce = connect()
pce.must_connect()

app_a = pce.labels.create(Label(key="app", value="A"))
web = pce.labels.create(Label(key="role", value="web"))
db = pce.labels.create(Label(key="role", value="db"))

admins = pce.ip_lists.create(IPList(
    name="Admins",
    ip_ranges=[IPRange(from_ip="198.18.7.0/24"), IPRange(from_ip="198.18.7.128/25", exclusion=True)],
))
check("an IP list is created in the draft", "/sec_policy/draft/ip_lists/" in admins.href, admins.href)
postgres = pce.services.create(Service(name="Postgres", service_ports=[ServicePort(port=5432, proto=6)]))
check("a service is created in the draft", "/sec_policy/draft/services/" in postgres.href, postgres.href)

rule_set = pce.rule_sets.create(RuleSet(name="RS-A", scopes=[LabelSet(labels=[app_a])]))
check("a scoped rule set is created", rule_set.scopes and rule_set.scopes[0].labels[0].href == app_a.href, rule_set)
db_rule = pce.rules.create(
    Rule.build(providers=[db.href], consumers=[web.href], ingress_services=[postgres.href]), parent=rule_set
)
check("a rule is created under its rule set", "/sec_rules/" in db_rule.href, db_rule.href)
ssh_rule = pce.rules.create(
    Rule.build(providers=["ams"], consumers=[admins.href], ingress_services=[{"port": 22, "proto": 6}]),
    parent=rule_set,
)
check("a rule with ams, an IP list and an inline port", ssh_rule.providers[0].actors == "ams", ssh_rule)

fetched = pce.rule_sets.get_by_reference(rule_set.href)
check("the draft rule set carries both rules", len(fetched.rules) == 2, fetched)
check("nothing is active before provisioning", pce.rule_sets.get(policy_version="active") == [])

partial = refused(lambda: pce.provision_policy_changes("only the rule set", [rule_set.href]))
check("provisioning a rule set without its IP list and service is refused", partial and "provision it too" in partial, partial)
check("a refused provisioning changes nothing", pce.rule_sets.get(policy_version="active") == [])

version = pce.provision_policy_changes("ring-fence app A", [rule_set.href, admins.href, postgres.href])
check("provisioning answers the new version", version.version and version.version >= 1, version)
active = pce.rule_sets.get(policy_version="active")
check("the rule set is active", [s.name for s in active] == ["RS-A"], active)
check("its rules are active", len(active[0].rules) == 2, active)
versions = pce.get("/sec_policy").json()
check("GET /sec_policy lists the version with its description",
      versions and versions[0]["commit_message"] == "ring-fence app A", versions)

check("the default IP list exists", pce.get_default_ip_list().name == "Any (0.0.0.0/0 and ::/0)")
check("the default service exists", pce.get_default_service().name == "All Services")
check("get_by_name finds an IP list", pce.ip_lists.get_by_name("Admins").href == admins.href)

# illumio-py checks ports itself, so a raw request shows what the PCE says to other clients.
bad_port = refused(lambda: pce.post(
    "/sec_policy/draft/services", json={"name": "Bad", "service_ports": [{"port": 70000, "proto": 6}]}
))
check("a port out of range names the field", bad_port and "service_ports[0]" in bad_port, bad_port)
in_use = refused(lambda: pce.ip_lists.delete(admins.href))
check("an IP list a rule set uses cannot be deleted", in_use and "object_in_use" in in_use, in_use)
label_in_use = refused(lambda: pce.labels.delete(app_a.href))
check("a label a scope uses cannot be deleted", label_in_use and "object_in_use" in label_in_use, label_in_use)
missing = refused(lambda: pce.rules.create(
    Rule.build(providers=["/orgs/1/labels/999"], consumers=[web.href], ingress_services=[postgres.href]),
    parent=rule_set,
))
check("a rule naming a missing label is refused", missing and "no label with id 999" in missing, missing)
active_edit = refused(lambda: pce.put(rule_set.href.replace("/draft/", "/active/"), json={"name": "x"}, include_org=False))
check("the active version cannot be edited", active_edit and "405" in active_edit, active_edit)

pce.rule_sets.update(rule_set.href, {"enabled": False})
pending = pce.get("/sec_policy/pending").json()
check("an edit is pending until provisioned", [c["href"] for c in pending.get("rule_sets", [])] == [rule_set.href], pending)

finish()
