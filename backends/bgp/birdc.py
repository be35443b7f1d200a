"""Talking to BIRD 2: ``birdc`` commands and a parser for ``show protocols [all]``.

``birdc -v`` prints BIRD's reply codes (``0003 Reconfigured``, ``8002 <parse error>``), so a
failure is told by its code, not by guessing at English text; ``birdc`` itself exits 1 on an
error reply or when the control socket does not answer. Every call has a deadline.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

#: reply codes of `configure` that mean the new file is in force (or being applied)
_CONFIGURED = {3, 4, 18, 19, 20}


class BirdError(RuntimeError):
    """BIRD did not answer, or answered with an error; the message is BIRD's."""


@dataclass(frozen=True)
class BirdProtocol:
    """One row of ``show protocols all``: the generic columns, plus BGP details when shown."""

    name: str
    proto: str
    table: str
    state: str
    since: str
    info: str
    bgp_state: str = ""
    neighbor: str = ""
    neighbor_as: int = 0
    routes_imported: int = 0
    routes_exported: int = 0
    last_error: str = ""

    @property
    def established(self) -> bool:
        return self.proto == "BGP" and (self.bgp_state or self.info.split(" ")[0]) == "Established"


_CODE = re.compile(r"^(\d{4})([ -])(.*)$")
_ROUTES = re.compile(r"(\d+) imported(?:, (\d+) filtered)?, (\d+) exported")


def reply_lines(text: str) -> list[tuple[int, str]]:
    """``birdc -v`` output as (code, text) lines; a continuation line (leading space) keeps the
    code of the line before it. The ``0001 BIRD x.y ready.`` greeting is dropped."""
    out: list[tuple[int, str]] = []
    code = 0
    for line in text.splitlines():
        m = _CODE.match(line)
        if m:
            code, body = int(m.group(1)), m.group(3)
        elif line.startswith(" "):
            body = line[1:]
        else:
            continue
        if code == 1 and body.startswith("BIRD "):
            continue
        out.append((code, body))
    return out


def parse_show_protocols(text: str) -> list[BirdProtocol]:
    """Rows of ``birdc -v show protocols [all]``: 1002 is a protocol line, 1006 its details."""
    rows: list[dict[str, object]] = []
    for code, body in reply_lines(text):
        if code == 1002:
            parts = body.split(None, 5)
            if len(parts) < 5:
                continue
            rows.append({"name": parts[0], "proto": parts[1], "table": parts[2],
                         "state": parts[3], "since": parts[4],
                         "info": parts[5].strip() if len(parts) > 5 else ""})
        elif code == 1006 and rows:
            row = rows[-1]
            key, _, value = body.strip().partition(":")
            value = value.strip()
            if key == "BGP state":
                row["bgp_state"] = value
            elif key == "Neighbor address":
                row["neighbor"] = value
            elif key == "Neighbor AS":
                row["neighbor_as"] = int(value) if value.isdigit() else 0
            elif key == "Last error":
                row["last_error"] = value
            elif key == "Routes":
                m = _ROUTES.search(value)
                if m:
                    row["routes_imported"] = int(m.group(1))
                    row["routes_exported"] = int(m.group(3))
    return [BirdProtocol(**r) for r in rows]  # type: ignore[arg-type]


def birdc(socket: str, *command: str, timeout: float = 3.0, ns_exec: tuple[str, ...] = ()
          ) -> str:
    """Run one birdc command; the reply text (with codes). BirdError when BIRD does not answer
    or the reply has an error code (8xxx/9xxx)."""
    cmd = [*ns_exec, "birdc", "-v", "-s", socket, *command]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise BirdError("birdc is not installed (apt-get install bird2)") from None
    except subprocess.TimeoutExpired:
        raise BirdError(f"birdc {' '.join(command)}: no answer in {timeout:g} s") from None
    errors = [body for code, body in reply_lines(proc.stdout) if code >= 8000]
    if proc.returncode != 0 or errors:
        why = "; ".join(errors) or (proc.stderr or proc.stdout).strip() or f"exit {proc.returncode}"
        raise BirdError(why)
    return proc.stdout


def configure(socket: str, path: str, timeout: float = 10.0) -> str:
    """``birdc configure "<path>"``: BIRD re-reads that file; sessions whose configuration did
    not change stay up. Returns BIRD's last line ("Reconfigured")."""
    if '"' in path:
        raise BirdError(f"cannot pass a path with a quote to birdc: {path!r}")
    out = birdc(socket, "configure", f'"{path}"', timeout=timeout)
    lines = reply_lines(out)
    if not any(code in _CONFIGURED for code, _ in lines):
        raise BirdError("configure: unexpected reply: " + "; ".join(b for _, b in lines))
    return lines[-1][1]
