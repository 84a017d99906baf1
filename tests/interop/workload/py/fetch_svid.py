"""py-spiffe (the `spiffe` package on PyPI) against meshid agent's Workload API, unchanged:
WorkloadApiClient() finds the socket through SPIFFE_ENDPOINT_SOCKET, fetches the X509-SVID and
the bundles, and prints what the Go test asserts on, as JSON."""

import json
import sys

from cryptography.hazmat.primitives.serialization import Encoding
from spiffe import WorkloadApiClient


def main() -> int:
    client = WorkloadApiClient(default_timeout=30)
    svid = client.fetch_x509_svid()
    bundles = client.fetch_x509_bundles()
    bundle = bundles.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
    out = {
        "spiffe_id": str(svid.spiffe_id),
        "chain_pem": [c.public_bytes(Encoding.PEM).decode() for c in svid.cert_chain],
        "bundle_pem": sorted(c.public_bytes(Encoding.PEM).decode() for c in bundle.x509_authorities)
        if bundle
        else [],
        "has_private_key": svid.private_key is not None,
    }
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
