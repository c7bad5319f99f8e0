"""Labels and connection checks through illumio-py, as an operator's script would use it.

Run by crates/pce/tests/illumio_clients.rs against a `pce serve` on loopback, with:
PCE_PORT, PCE_CA (the PCE's CA certificate), API_USER and API_SECRET (an API key). Prints one
line per check and ends with "N passed, M failed"; the exit status is 1 when a check failed.
"""
import os

from harness import check, connect, finish, refused
from illumio.policyobjects import Label


pce = connect()
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

finish()
