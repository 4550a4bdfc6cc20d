"""A dataset sent to a peer by its sha256, over the mutual-TLS LAN listener: sent once, and a lying or careless
sender gets a clear error (a body that is not what its path names, one that is not chat JSONL, a stranger)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from hybridd.peer.identity import new_identity
from hybridd.peer.pairing import PairingStore, pair_with
from hybridd.peer.tls import client_context
from tests.test_jobs_e2e import config, dataset
from tests.test_peer_e2e import cli

pytestmark = pytest.mark.timeout(120)


async def test_a_dataset_by_its_sha256(daemon_factory, tmp_path: Path,  # type: ignore[no-untyped-def]
                                       tiny_model: Path) -> None:
    peer = daemon_factory(config((tmp_path, tiny_model), "spark", "peer", trains=False))
    code = json.loads(cli("pair", "--url", peer.url, "--json").stdout)["code"]
    desk = new_identity("desk")
    paired = await pair_with(peer.lan_url, code, desk, "desk", "desktop", PairingStore.load(tmp_path / "desk"))
    pinned = client_context(desk, paired.cert_pem)
    good = dataset(3)
    sha = hashlib.sha256(good).hexdigest()
    url = f"{peer.lan_url}/hybridd/v1/files/{sha}"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, ssl=pinned) as reply:
            assert reply.status == 404  # not there yet
        async with http.put(url, data=b"something else\n", ssl=pinned) as reply:
            assert reply.status == 400 and "sha256" in (await reply.json())["error"]["message"]
        bad = b'{"messages": [{"role": "robot", "content": "x"}]}\n'
        async with http.put(f"{peer.lan_url}/hybridd/v1/files/{hashlib.sha256(bad).hexdigest()}", data=bad,
                            ssl=pinned) as reply:
            assert reply.status == 400 and "line 1: messages[0].role" in (await reply.json())["error"]["message"]
        async with http.put(url, data=good, ssl=pinned) as reply:
            assert reply.status == 201
            kept = await reply.json()
        assert kept["bytes"] == len(good) and kept["purpose"] == "fine-tune"
        async with http.put(url, data=good, ssl=pinned) as reply:  # sent again: the same file, not a second one
            assert reply.status == 200 and (await reply.json())["id"] == kept["id"]
        async with http.get(url, ssl=pinned) as reply:
            assert reply.status == 200 and (await reply.json())["id"] == kept["id"]
        async with http.get(f"{peer.lan_url}/hybridd/v1/files/{'0' * 63}", ssl=pinned) as reply:
            assert reply.status == 404  # not a sha256: no such route
        async with http.put(url, data=good, ssl=client_context(None, None)) as reply:
            assert reply.status == 403  # no certificate: only pairing is served
        stranger = client_context(new_identity("stranger"), paired.cert_pem)
        with pytest.raises(aiohttp.ClientError):  # a certificate it never paired with: the handshake fails
            async with http.put(url, data=good, ssl=stranger):
                pass
    listed = json.loads(cli("peers", "--url", peer.url, "--json").stdout)
    assert [p["name"] for p in listed["paired"]] == ["desk"]
