"""Workloads and pairing through illumio-py: an unmanaged workload, a pairing profile with labels
and an enforcement mode, its pairing key, and the errors of bad input. The test that runs this
then pairs a real VEN with the key printed as `pairing key: CODE`.

Run by crates/pce/tests/illumio_clients.rs (see labels.py for the environment). Prints one line
per check and ends with "N passed, M failed"; exit status 1 when a check failed.
"""
import os

from harness import check, connect, finish, refused
from illumio.policyobjects import Label
from illumio.workloads import PairingProfile, Workload, Interface


pce = connect()

db = pce.labels.create(Label(key="role", value="db"))
web = pce.labels.create(Label(key="role", value="web"))

printer = pce.workloads.create(Workload(
    name="printer-1", hostname="printer-1",
    interfaces=[Interface(name="eth0", address=os.environ.get("UNMANAGED_ADDRESS", "198.18.0.50"), cidr_block=24)],
    labels=[web],
))
check("an unmanaged workload is created", printer.href.startswith("/orgs/1/workloads/"), printer)
fetched = pce.workloads.get_by_reference(printer.href)
check("it is unmanaged, with its interface and label",
      fetched.interfaces[0].address == os.environ.get("UNMANAGED_ADDRESS", "198.18.0.50") and fetched.labels[0].href == web.href, fetched)
check("it has no agent", not getattr(fetched.agent, "href", None), fetched.agent)
check("workloads can be listed", len(pce.workloads.get_all()) == 1)
bad_host = refused(lambda: pce.workloads.create(Workload(hostname="bad host\x1b[31m")))
check("a hostname with control characters is refused", bad_host and "hostname" in bad_host, bad_host)
bad_address = refused(lambda: pce.post("/workloads", json={"hostname": "x", "interfaces": [{"name": "eth0", "address": "300.1.1.1"}]}))
check("a bad interface address names the field", bad_address and "interfaces[0].address" in bad_address, bad_address)

profile = pce.pairing_profiles.create(PairingProfile(
    name="databases", enabled=True, enforcement_mode="full", labels=[db],
    allowed_uses_per_key=1, key_lifespan="unlimited",
))
check("a pairing profile is created", profile.href.startswith("/orgs/1/pairing_profiles/"), profile)
check("it keeps its mode and labels", profile.enforcement_mode == "full" and profile.labels[0].href == db.href, profile)
pce.pairing_profiles.update(profile.href, {"description": "database servers"})
check("it can be updated", pce.pairing_profiles.get_by_reference(profile.href).description == "database servers")
bad_mode = refused(lambda: pce.post("/pairing_profiles", json={"name": "x", "enforcement_mode": "strict"}))
check("an unknown enforcement mode names the field", bad_mode and "enforcement_mode" in bad_mode, bad_mode)
throwaway = pce.pairing_profiles.create(PairingProfile(name="throwaway"))
pce.pairing_profiles.delete(throwaway.href)
check("a profile can be deleted", refused(lambda: pce.pairing_profiles.get_by_reference(throwaway.href)))

key = pce.generate_pairing_key(profile.href)
check("a pairing key is generated", key and len(key) >= 16, key)
print(f"pairing key: {key}")

finish()
