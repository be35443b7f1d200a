"""The ``netagent`` CNI plugin: bridge (or routed) veth + built-in host-local IPAM from ``subnet.env``.

Run once per container and verb by the runtime (env + stdin in, JSON on stdout), or in a child
of the CNI server (``cni/server.py``) that has every module below imported already. This module
only joins the parts; design rules, each measured (bench/README.md, CNI section):

- start-up path is stdlib C modules only (no ``json``/``typing``/``dataclasses``/``ipaddress``/
  ``subprocess``/pyroute2); the daemon package is never imported; VERSION loads no verb;
- the protocol (environment, versions, deadline, error shaping) is ``cni.skel``; the config
  ``cni.conf``; the verbs ``cni.verbs``, which attach pods by the strategies of ``cni.attach``
  (``"mode": "bridge"`` or ``"routed"``) and take addresses through ``cni.ipamcall`` (the
  built-in allocator ``cni.ipam`` on its disk store ``cni.ipamdisk``, or a delegate);
- kernel access is ``cni.link`` (raw netlink), subnet.env ``cni.subnet``, iptables ``cni.masq``.
"""

from __future__ import annotations

import os
import sys

from netagent.cni import skel

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from netagent.cni.conf import Config
    from netagent.cni.skel import Verb


def _verb(command: str) -> Verb | None:
    """The verb's function; its modules are loaded only when a verb runs (not for VERSION)."""
    from netagent.cni.verbs import VERBS

    return VERBS.get(command)


def _config(raw: dict[str, Any]) -> Config:
    """The config, checked (code 1 for a version we do not speak, 7 for the rest)."""
    from netagent.cni.conf import Config

    return Config(raw)


def run(environ: dict[str, str] | os._Environ[str], stdin: str) -> dict[str, Any] | None:
    """One plugin call: returns the object to print (None for no output) or raises CniError."""
    return skel.run(environ, stdin, _config, _verb)


def main() -> int:
    """Console entry point (``netagent-cni``, the launcher, the server's child)."""
    return skel.main(run)


if __name__ == "__main__":
    sys.exit(main())
