"""What the client scripts here share: a connected PolicyComputeEngine, checks that print one
line each, and the closing "N passed, M failed" line with the exit status (1 when one failed).

Environment (set by crates/pce/tests/illumio_clients.rs and tests/e2e_illumio.rs): PCE_HOST
(default 127.0.0.1), PCE_PORT, PCE_CA (the PCE's CA certificate), API_USER and API_SECRET.
"""
import os
import sys

from illumio import PolicyComputeEngine, IllumioApiException

_results = []


def check(name, condition, detail=""):
    _results.append(bool(condition))
    print(("ok    " if condition else "FAIL  ") + name + ("" if condition else f": {detail}"))


def refused(call):
    """The IllumioApiException message of `call`, or None when it succeeded."""
    try:
        call()
    except IllumioApiException as e:
        return str(e)
    return None


def connect(user=None, secret=None):
    host = os.environ.get("PCE_HOST", "127.0.0.1")
    pce = PolicyComputeEngine("https://" + host, port=os.environ["PCE_PORT"], org_id="1", retry_count=0)
    pce.set_credentials(user or os.environ["API_USER"], secret or os.environ["API_SECRET"])
    pce.set_tls_settings(verify=os.environ["PCE_CA"])
    return pce


def finish():
    passed, failed = _results.count(True), _results.count(False)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
