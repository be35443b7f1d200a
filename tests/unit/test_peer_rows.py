"""status.json's peer list kept row by row (PeerRows): after any sequence of changes, probe
rounds and slices its text is what encoding the whole list at once writes."""

from __future__ import annotations

import json

from support.fakekernel import sub, vx_lease

from netagent.daemon import status_json
from netagent.lease import Lease, PeerId
from netagent.probe import PeerProbe, PeerRows, peer_list


def whole(peers: dict[PeerId, Lease], results: dict[str, PeerProbe] | None) -> str:
    return json.dumps(peer_list(peers, results), sort_keys=True)


def test_rows_follow_changes_rounds_and_slices() -> None:
    rows = PeerRows()
    assert rows.text() == "{}"
    peers: dict[PeerId, Lease] = {sub(i): vx_lease(i) for i in range(2, 40)}
    rows.update(peers, None)
    assert rows.text() == whole(peers, None)
    peers[sub(100)] = vx_lease(100)
    peers[sub(5)] = vx_lease(5, mac_of=9, ip=77)
    del peers[sub(7)]
    rows.update(peers, {sub(100), sub(5), sub(7)})
    assert rows.text() == whole(peers, None)
    results = {str(s): PeerProbe(str(lz.attrs.public_ip), s != sub(3), 0.0012, 5.0,
                                 s != sub(3), None) for s, lz in peers.items()}
    rows.new_round(peers, results)
    assert rows.pending
    rows.refresh(peers, rows=10)
    del peers[sub(8)]  # an event between two slices
    rows.update(peers, {sub(8)})
    while rows.pending:
        rows.refresh(peers, rows=10)
    assert rows.text() == whole(peers, results)
    assert rows.rows == peer_list(peers, results)


def test_status_json_splices_the_encoded_list() -> None:
    peers: dict[PeerId, Lease] = {sub(i): vx_lease(i) for i in (2, 10, 3)}
    rows = PeerRows()
    rows.update(peers, None)
    doc = {"ready": True, "phase": "running", "peer_list": peer_list(peers, None)}
    spliced = status_json({"ready": True, "phase": "running"}, {"peer_list": rows.text()})
    assert spliced == status_json(doc)
    assert json.loads(spliced)["peer_list"] == json.loads(json.dumps(doc["peer_list"]))
