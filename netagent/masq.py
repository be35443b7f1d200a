"""Masquerade (`--ip-masq`) and FORWARD (`--iptables-forward-rules`) rules: flannel's rule
set, owned chain by chain.

Layout (flannel-compat.md §14.2, flannel ≥ v0.20.0, so a host can switch between flanneld and
netagent without leftovers): a hook rule in nat POSTROUTING jumping to ``FLANNEL-POSTRTG`` and
one in filter FORWARD jumping to ``FLANNEL-FWD``, every rule tagged with flannel's comments.

Why it is shaped this way:

* **Pure render, thin shell.** :func:`render_rules` is plain data; :func:`restore_text` turns it
  into one ``iptables-restore --noflush`` batch; :func:`parse_save` reads ``iptables-save`` back.
  Only :class:`Masquerade` runs commands, and only ``iptables-restore`` / ``iptables-save``
  (or their ``ip6tables`` twins).
* **Atomic and idempotent, never a gap** (flannel #2237): our two chains are flushed and refilled
  inside the same batch as everything else, so a reader never sees them half-filled, and a
  changed network or subnet replaces the old rules in the same transaction.
* **One address family per instance.** An IPv6 network gets the same rules with multicast
  ``ff00::/8``, applied with ``ip6tables-restore`` and read back with ``ip6tables-save`` (§14.2:
  "ip6tables: same with IPv6 Network/subnet"). The families live in separate kernel tables, so a
  dual-stack host runs two instances that cannot disturb each other. A network and subnet of
  different families is a caller bug and raises ValueError before any command runs.
* **Only our own chains.** We flush only ``FLANNEL-POSTRTG``/``FLANNEL-FWD`` and add or delete
  only our own hook rules (matched by exact text); other rules in POSTROUTING/FORWARD are never
  touched. The hook is appended only when missing, so nobody's ordering is disturbed on re-apply.
* The rules are compared in ``iptables-save``'s canonical text, which is exactly what
  :func:`render_rules` produces (checked against iptables 1.8.9, nft and legacy back ends;
  ip6tables 1.8.9 nft prints IPv6 prefixes in the same compressed form as Python's ``str``), so a
  re-check costs one ``iptables-save`` and no rule is rewritten while it is in place.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

NAT_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
NAT_COMMENT = '-m comment --comment "flanneld masq"'
FWD_COMMENT = '-m comment --comment "flanneld forward"'
NAT_HOOK = f"-A POSTROUTING {NAT_COMMENT} -j {NAT_CHAIN}"
FWD_HOOK = f"-A FORWARD {FWD_COMMENT} -j {FWD_CHAIN}"
#: kube-proxy's masquerade mark: such packets are NATed by kube-proxy already
KUBE_MARK = "0x4000/0x4000"
#: multicast destinations are never masqueraded, per family (flannel's exact text)
MULTICAST = {4: "224.0.0.0/4", 6: "ff00::/8"}

Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Commands:
    """The iptables binaries of one address family."""

    iptables: str
    save: str
    restore: str


COMMANDS = {4: Commands("iptables", "iptables-save", "iptables-restore"),
            6: Commands("ip6tables", "ip6tables-save", "ip6tables-restore")}


def family(network: Network, subnet: Network) -> int:
    """The IP version both share (4 or 6); ValueError when they differ.

    Mixed families would render rules iptables rejects (or, worse, half a rule set), and the
    caller almost certainly passed the other stack's subnet by mistake, so say so up front.
    """
    if network.version != subnet.version:
        raise ValueError(f"masquerade network {network} is IPv{network.version} but subnet "
                         f"{subnet} is IPv{subnet.version}: use one Masquerade per address family")
    return network.version


class MasqError(RuntimeError):
    """iptables refused or is missing; the message says which command and why."""


@dataclass(frozen=True)
class RuleSet:
    """Desired content of our chains, in iptables-save's canonical text, in order."""

    nat: tuple[str, ...]
    forward: tuple[str, ...]

    @property
    def hooks(self) -> dict[str, str]:
        out = {}
        if self.nat:
            out["nat"] = NAT_HOOK
        if self.forward:
            out["filter"] = FWD_HOOK
        return out


def render_rules(network: Network, subnet: Network, *, random_fully: bool = True,
                 forward: bool = True, masquerade: bool = True) -> RuleSet:
    """flannel's rules for overlay `network` and our leased `subnet` (pure), either family:
    the nat chain with `masquerade` (``--ip-masq``), the FORWARD chain with `forward`
    (``--iptables-forward-rules``); an empty tuple is a chain we do not want.

    Raises ValueError when `network` and `subnet` are of different families.
    """
    mcast = MULTICAST[family(network, subnet)]
    rnd = " --random-fully" if random_fully else ""
    n, s = str(network), str(subnet)
    c = f"-A {NAT_CHAIN}"
    nat: tuple[str, ...] = ()
    if masquerade:
        nat = (
            f"{c} -m mark --mark {KUBE_MARK} {NAT_COMMENT} -j RETURN",
            f"{c} -s {s} -d {n} {NAT_COMMENT} -j RETURN",
            f"{c} -s {n} -d {s} {NAT_COMMENT} -j RETURN",
            f"{c} ! -s {n} -d {s} {NAT_COMMENT} -j RETURN",
            f"{c} -s {n} ! -d {mcast} {NAT_COMMENT} -j MASQUERADE{rnd}",
            f"{c} ! -s {n} -d {n} {NAT_COMMENT} -j MASQUERADE{rnd}",
        )
    fwd: tuple[str, ...] = ()
    if forward:
        fwd = (
            f"-A {FWD_CHAIN} -s {n} {FWD_COMMENT} -j ACCEPT",
            f"-A {FWD_CHAIN} -d {n} {FWD_COMMENT} -j ACCEPT",
        )
    return RuleSet(nat, fwd)


@dataclass(frozen=True)
class Installed:
    """What iptables-save shows of ours: chain contents and how many hook rules exist."""

    nat: tuple[str, ...] | None  # None = chain absent
    forward: tuple[str, ...] | None
    nat_hooks: int
    fwd_hooks: int


def parse_save(text: str) -> Installed:
    """Pick our chains and hook rules out of `iptables-save` (or `ip6tables-save`) output."""
    table = ""
    chains: dict[str, list[str] | None] = {NAT_CHAIN: None, FWD_CHAIN: None}
    hooks = {"nat": 0, "filter": 0}
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            name = line[1:].split()[0]
            if name in chains and chains[name] is None:
                chains[name] = []
        elif line.startswith("-A "):
            name = line.split()[1]
            if name in chains:
                chains.setdefault(name, [])
                lst = chains[name]
                if lst is None:
                    lst = chains[name] = []
                lst.append(line)
            elif table == "nat" and line == NAT_HOOK:
                hooks["nat"] += 1
            elif table == "filter" and line == FWD_HOOK:
                hooks["filter"] += 1
    nat, fwd = chains[NAT_CHAIN], chains[FWD_CHAIN]
    return Installed(tuple(nat) if nat is not None else None,
                     tuple(fwd) if fwd is not None else None, hooks["nat"], hooks["filter"])


def _chains(want: RuleSet, have: Installed
            ) -> tuple[tuple[str, str, str, str, str, tuple[str, ...], tuple[str, ...] | None, int],
                       ...]:
    """Per chain of ours: (table, chain, hook rule, hooked chain, flag, wanted rules, installed
    rules, hook count) — what missing() and restore_text() both walk."""
    return (("nat", NAT_CHAIN, NAT_HOOK, "POSTROUTING", "--ip-masq", want.nat, have.nat,
             have.nat_hooks),
            ("filter", FWD_CHAIN, FWD_HOOK, "FORWARD", "--iptables-forward-rules", want.forward,
             have.forward, have.fwd_hooks))


def missing(want: RuleSet, have: Installed) -> list[str]:
    """Human-readable differences (empty = everything in place). A chain of ours that is not
    wanted (``--ip-masq`` or ``--iptables-forward-rules`` turned off since it was installed)
    is a difference too: it goes."""
    out = []
    for table, chain, _hook, hooked, flag, rules, had, hooks in _chains(want, have):
        if rules:
            if had != rules:
                out.append(f"{table} {chain} {'differs' if had is not None else 'absent'}")
            if hooks != 1:
                out.append(f"{table} {hooked} has {hooks} jumps to {chain} (want 1)")
        elif had is not None or hooks:
            out.append(f"{table} {chain} present but {flag} is off")
    return out


def _delete(rule: str) -> str:
    return "-D" + rule[2:]


def restore_text(want: RuleSet, have: Installed) -> str:
    """One batch: declare and refill our wanted chains, add a missing hook, drop duplicate
    hooks; delete a chain of ours that is not wanted (with its hooks)."""
    parts: list[str] = []
    for table, chain, hook, _hooked, _flag, rules, chain_had, hooks_had in _chains(want, have):
        if rules:
            parts += [f"*{table}", f":{chain} - [0:0]", f"-F {chain}", *rules]
            parts += [_delete(hook)] * max(0, hooks_had - 1)
            if hooks_had == 0:
                parts.append(hook)
            parts.append("COMMIT")
        elif chain_had is not None or hooks_had:
            parts += [f"*{table}", *[_delete(hook)] * hooks_had]
            if chain_had is not None:
                parts += [f"-F {chain}", f"-X {chain}"]
            parts.append("COMMIT")
    return "\n".join(parts) + "\n"


def removal_text(have: Installed) -> str:
    """Delete our hooks and chains (and nothing else); empty when nothing of ours exists:
    the batch restore_text() writes when no chain of ours is wanted."""
    text = restore_text(RuleSet((), ()), have)
    return text if text.strip() else ""


def supports_random_fully(version_text: str) -> bool:
    """`--random-fully` exists from iptables 1.6.2 on (flannel checks the same).

    `version_text` is what `iptables --version` or `ip6tables --version` prints; both ship in the
    same package with the same version.
    """
    m = re.search(r"v(\d+)\.(\d+)\.(\d+)", version_text)
    if not m:
        return False
    return tuple(int(x) for x in m.groups()) >= (1, 6, 2)


def run_command(cmd: list[str], stdin: str | None = None, timeout: float = 10.0) -> str:
    """Run one iptables command; its stdout, or MasqError saying which command and why."""
    try:
        proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise MasqError(f"{cmd[0]} not found: install iptables (Debian: apt-get install "
                        "iptables)") from None
    except subprocess.TimeoutExpired:
        raise MasqError(f"{' '.join(cmd)} did not finish in {timeout} s") from None
    if proc.returncode != 0:
        raise MasqError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                        f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def remove_leftovers(version: int, timeout: float = 10.0) -> bool:
    """Delete our chains and hooks of one address family, if any (both rule sets turned off
    since an earlier run). True when something was deleted; False, without error, when the
    binaries are not installed (nothing of ours can exist then). Raises MasqError."""
    commands = COMMANDS[version]
    if shutil.which(commands.save) is None:
        return False
    return remove_ours(commands, lambda cmd, stdin=None: run_command(cmd, stdin, timeout))


def remove_ours(commands: Commands, run: Callable[..., str] = run_command) -> bool:
    """Delete our hooks and chains (and nothing else) with one family's binaries, through
    `run` (cmd, stdin); True when there was something to delete. Raises MasqError."""
    text = removal_text(parse_save(run([commands.save])))
    if not text:
        return False
    run([commands.restore, "-w", "5", "--noflush"], text)
    return True


class Masquerade:
    """The shell: runs iptables-save / iptables-restore in the current network namespace.

    The network's family picks the binaries (ip6tables* for IPv6): its rules live in that
    family's tables, which another family's instance never reads or writes. A retarget() to the
    other family leaves the old family's rules to be deleted by the next ensure() or remove().
    """

    def __init__(self, network: Network, subnet: Network, *, random_fully: bool = True,
                 forward: bool = True, masquerade: bool = True, timeout: float = 10.0) -> None:
        self.commands = COMMANDS[family(network, subnet)]
        self.network = network
        self.subnet = subnet
        self.timeout = timeout
        self.forward = forward
        self.masquerade = masquerade
        self._random_fully_wanted = random_fully
        #: resolved on first use from `iptables --version` (`ip6tables --version`)
        self._random_fully: bool | None = None
        #: times we found rules missing or different after they had been in place
        self.repairs = 0
        self.applied = 0
        self.in_place = False
        #: binaries of a family we were retargeted away from, whose rules are still to delete
        self._stale: Commands | None = None

    @property
    def want(self) -> RuleSet:
        return render_rules(self.network, self.subnet, random_fully=bool(self._random_fully),
                            forward=self.forward, masquerade=self.masquerade)

    def retarget(self, network: Network, subnet: Network) -> None:
        """The subnet changed (renumbering): the next ensure() replaces the rules in one batch.

        A change of family (e.g. a live switch to an IPv6-only network) switches binaries; the
        old family's rules are deleted by the next ensure() or remove(), no I/O here. ValueError,
        with nothing changed, when `network` and `subnet` differ in family.
        """
        commands = COMMANDS[family(network, subnet)]
        if commands != self.commands:
            if self._stale is None:
                self._stale = self.commands
            elif self._stale == commands:  # switched back before the old rules were deleted
                self._stale = None
            self.commands = commands
            self._random_fully = None  # probe the other binary
        self.network, self.subnet = network, subnet
        self.in_place = False

    def _run(self, cmd: list[str], stdin: str | None = None) -> str:
        return run_command(cmd, stdin, self.timeout)

    def _resolve_random_fully(self) -> None:
        if self._random_fully is None:
            self._random_fully = self.masquerade and self._random_fully_wanted and supports_random_fully(
                self._run([self.commands.iptables, "--version"]))

    def installed(self) -> Installed:
        return parse_save(self._run([self.commands.save]))

    def _drop_stale(self) -> None:
        """Delete the rules of the family we were retargeted away from (stays due on error)."""
        if self._stale is not None:
            remove_ours(self._stale, self._run)
            self._stale = None

    def check(self) -> list[str]:
        """What is missing or different (empty = all in place). Raises MasqError."""
        self._resolve_random_fully()
        out = missing(self.want, self.installed())
        if self._stale is not None:
            out.append(f"rules of the previous address family still to delete "
                       f"({self._stale.save})")
        return out

    def ensure(self) -> bool:
        """Re-check and re-apply when anything differs. True = rules were (re-)applied now,
        False = they were already in place and nothing was written (the periodic re-check);
        either way they are in place afterwards (``in_place``). Raises MasqError when they
        still are not after applying."""
        self._drop_stale()
        self._resolve_random_fully()
        have = self.installed()
        diff = missing(self.want, have)
        if not diff:
            self.in_place = True
            return False
        if self.applied:
            self.repairs += 1
        self._run([self.commands.restore, "-w", "5", "--noflush"], restore_text(self.want, have))
        self.applied += 1
        after = missing(self.want, self.installed())
        if after:
            self.in_place = False
            raise MasqError(f"masquerade rules still not in place after {self.commands.restore}: "
                            f"{'; '.join(after)}")
        self.in_place = True
        return True

    def remove(self) -> None:
        """Delete our hooks and chains only (and any left in a family we were retargeted from)."""
        self._drop_stale()
        remove_ours(self.commands, self._run)
        self.in_place = False
