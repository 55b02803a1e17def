"""The run directory's lease lives in raylm/lease.py (dataprep's output uses it too); these names stay importable."""

from raylm.lease import (LEASE, SETTLE_S, Lease, LeaseLost, RunDirBusy, check_held, describe, held,  # noqa: F401
                         record_commit)
