"""Labels and connection checks through illumio-py, as an operator's script would use it.

Run by crates/pce/tests/illumio_clients.rs against a `pce serve` on loopback, with:
PCE_PORT, PCE_CA (the PCE's CA certificate), API_USER and API_SECRET (an API key). Prints one
line per check and ends with "N passed, M failed"; the exit status is 1 when a check failed.
"""
import os
import sys

from illumio import PolicyComputeEngine, IllumioApiException
from illumio.policyobjects import Label

results = []


def check(name, condition, detail=""):
    results.append(bool(condition))
    print(("ok    " if condition else "FAIL  ") + name + ("" if condition else f": {detail}"))


def connect(user, secret):
    pce = PolicyComputeEngine("https://127.0.0.1", port=os.environ["PCE_PORT"], org_id="1", retry_count=0)
    pce.set_credentials(user, secret)
    pce.set_tls_settings(verify=os.environ["PCE_CA"])
    return pce


def refused(call):
    """The IllumioApiException message of `call`, or None when it succeeded."""
    try:
        call()
    except IllumioApiException as e:
        return str(e)
    return None


pce = connect(os.environ["API_USER"], os.environ["API_SECRET"])
check("check_connection with the API key", pce.check_connection())
version = pce.get("/product_version", include_org=False).json()
check("product_version has a version", version.get("version"), version)

web = pce.labels.create(Label(key="role", value="web"))
db = pce.labels.create(Label(key="role", value="db"))
pce.labels.create(Label(key="env", value="prod"))
check("created labels have org hrefs", web.href.startswith("/orgs/1/labels/"), web.href)
check("create answers the object", (db.key, db.value) == ("role", "db"), db)

roles = pce.labels.get(params={"key": "role"})
check("get filters by key", sorted(l.value for l in roles) == ["db", "web"], roles)
everything = pce.labels.get_all()
check("get_all finds all three via X-Total-Count", len(everything) == 3, everything)
first = pce.labels.get(params={"max_results": 1})
check("max_results limits a collection", len(first) == 1, first)

pce.labels.update(web.href, {"value": "frontend"})
check("update is seen by get_by_reference", pce.labels.get_by_reference(web.href).value == "frontend")

duplicate = refused(lambda: pce.labels.create(Label(key="role", value="db")))
check("a duplicate label is refused with the error shape", duplicate and "already exists" in duplicate, duplicate)

pce.labels.delete(db.href)
gone = refused(lambda: pce.labels.get_by_reference(db.href))
check("a deleted label is gone (404)", gone and "not_found" in gone, gone)

other_org = refused(lambda: pce.get("/orgs/2/labels", include_org=False))
check("another organisation is not found", other_org and "404" in other_org, other_org)

wrong = connect(os.environ["API_USER"], "not-the-secret")
denied = refused(lambda: wrong.labels.get())
check("a wrong secret gets 401 authentication_failed", denied and "authentication_failed" in denied, denied)
check("check_connection with a wrong secret is False", not wrong.check_connection())

passed, failed = results.count(True), results.count(False)
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
