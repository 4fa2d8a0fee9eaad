"""Audit: scan a model against its base — model diffing, trigger search, probes — and report findings,
each with its evidence, a causal check and a confidence; every scan is recorded in a ledger.

    from mri.audit import AuditConfig, audit, run_audit, write_report
"""

from mri.audit.report import read_report, write_report
from mri.audit.scan import HIGH_CONFIDENCE, AuditConfig, audit, run_audit, train_base_dictionary

__all__ = [
    "HIGH_CONFIDENCE",
    "AuditConfig",
    "audit",
    "read_report",
    "run_audit",
    "train_base_dictionary",
    "write_report",
]
