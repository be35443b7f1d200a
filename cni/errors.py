"""The one exception type of the plugin: every failure leaves as a CNI error object on stdout.

Spec codes used: 1 incompatible version, 4 invalid environment, 5 I/O, 6 decode, 7 invalid
config, 11 try again later, 50 not available (STATUS). Plugin-specific (>= 100):
100 requested address unavailable, 101 address pool exhausted, 102 CHECK found a difference,
103 interface already exists, 999 anything unexpected (kernel/netlink refusals, bugs).
"""

from __future__ import annotations

INCOMPATIBLE_VERSION = 1
INVALID_ENV = 4
IO_FAILURE = 5
DECODE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50
ADDRESS_UNAVAILABLE = 100
POOL_EXHAUSTED = 101
CHECK_FAILED = 102
INTERFACE_EXISTS = 103
INTERNAL = 999


class CniError(Exception):
    """A failure with its CNI code; ``details`` names the offending value when there is one."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, object]:
        out: dict[str, object] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out
