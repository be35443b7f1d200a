"""The iptables controller: our masquerade and FORWARD rules, one rule set per address family.

The daemon calls `reconcile(config, lease)` before subnet.env is written, after every lease or
config change and every `--iptables-resync` seconds; the controller keeps one `masq.Masquerade`
per family the network uses (iptables for IPv4, ip6tables for IPv6), retargets it when the
subnet changes (one `iptables-restore` batch, never a moment without rules), removes a family
the network no longer has, and with both `--ip-masq` and `--iptables-forward-rules` off deletes
our chains left from an earlier run, once. Runs on the main loop only (single writer).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from netagent.masq import MasqError, Masquerade, remove_leftovers

log = logging.getLogger("netagent")


@dataclass(frozen=True)
class RulesState:
    """What /readyz, /metrics and status.json show of our rules."""

    #: "off", "in place", "off (FORWARD rules in place)", or what is wrong
    summary: str
    #: every family's rules were in place at the last check (False with none installed)
    in_place: bool
    #: rule sets installed (families)
    families: int
    #: times the rules were found missing and re-applied, all families
    repairs: int


class IptablesController:
    """Owns the Masquerade rule sets; see the module docstring."""

    def __init__(self, *, enabled: bool, ip_masq: bool, forward: bool,
                 random_fully: bool,
                 sweep: Callable[[int], bool] = remove_leftovers,
                 make: Callable[..., Masquerade] = Masquerade) -> None:
        #: --ip-masq or --iptables-forward-rules: we keep rules; otherwise we only clean up
        self.enabled = enabled
        self.ip_masq = ip_masq
        self.forward = forward
        self.random_fully = random_fully
        #: rule sets by address family (4: iptables, 6: ip6tables)
        self.masqs: dict[int, Masquerade] = {}
        self.summary = "off"
        self._swept = False
        #: deletes our chains of one address family left from an earlier run (True if any)
        self._sweep = sweep
        #: builds one family's rule set (the unit tests give theirs an in-memory iptables)
        self._make = make
        #: problems already logged, so the resync timer logs each once
        self._warned: set[str] = set()

    def state(self) -> RulesState:
        masqs = list(self.masqs.values())
        return RulesState(self.summary, bool(masqs) and all(m.in_place for m in masqs),
                          len(masqs), sum(m.repairs for m in masqs))

    def reconcile(self, network: IPv4Network | None, subnet: IPv4Network | None,
                  network6: IPv6Network | None, subnet6: IPv6Network | None) -> None:
        """Install or re-check our rules for the networks and subnets in use (None = that
        family is off)."""
        if not self.enabled:
            self._remove_leftovers()
            return
        wanted: dict[int, tuple[IPv4Network | IPv6Network | None,
                                IPv4Network | IPv6Network | None]] = {
            4: (network, subnet), 6: (network6, subnet6)}
        problems = []
        for fam, (net, sub) in wanted.items():
            masq = self.masqs.get(fam)
            if net is None or sub is None:
                if masq is not None:
                    try:
                        masq.remove()
                        del self.masqs[fam]
                        log.info("IPv%d iptables rules removed (the network has no IPv%d)",
                                 fam, fam)
                    except MasqError as exc:
                        problems.append(str(exc))
                continue
            if masq is None:
                masq = self.masqs[fam] = self._make(
                    net, sub, random_fully=self.random_fully, forward=self.forward,
                    masquerade=self.ip_masq)
            elif (masq.network, masq.subnet) != (net, sub):
                masq.retarget(net, sub)
            try:
                if masq.ensure():
                    log.info("iptables rules applied for %s (subnet %s): %s", net, sub,
                             " and ".join(w for w, on in (("masquerade", self.ip_masq),
                                                          ("FORWARD ACCEPT", self.forward))
                                          if on))
            except MasqError as exc:
                problems.append(str(exc))
                if str(exc) not in self._warned:
                    log.error("%s (retrying)", exc)
                    self._warned.add(str(exc))
        self.summary = "; ".join(problems) or (
            "in place" if self.ip_masq else "off (FORWARD rules in place)")

    def _remove_leftovers(self) -> None:
        """Neither --ip-masq nor --iptables-forward-rules: delete our chains left from an
        earlier run, once (a host without iptables is fine: nothing of ours can be there)."""
        if self._swept:
            return
        self._swept = True
        for fam in (4, 6):
            try:
                if self._sweep(fam):
                    log.info("removed our IPv%d iptables rules left from an earlier run "
                             "(--ip-masq and --iptables-forward-rules are off)", fam)
            except MasqError as exc:
                log.error("cannot remove our old IPv%d iptables rules: %s", fam, exc)
