"""Real TLS on loopback: pinned mutual TLS works, impostors and unpaired certificates do not, pairing gets in bare."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest
from aiohttp import web

from hybridd.peer.errors import UntrustedPeer
from hybridd.peer.identity import Identity, new_identity
from hybridd.peer.tls import (
    client_context,
    observe_handshakes,
    peer_fingerprint,
    require_pinned,
    server_context,
)
from tests.tls_server import serve

SPARK = new_identity("spark-1")
DESKTOP = new_identity("desktop")


def whoami_app() -> web.Application:
    """A route that says which client certificate (if any) it saw, and one that streams so the client can look too."""

    async def whoami(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        return web.json_response({"client": peer_fingerprint(request.transport),
                                  "version": ssl_object.version() if ssl_object else None})

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"first ")
        await asyncio.sleep(0.05)
        await response.write(b"second")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/slow", slow)
    return app


async def test_paired_client_and_pinned_server_see_each_other() -> None:
    async with serve(whoami_app(), server_context(SPARK, [DESKTOP.cert_pem])) as url, aiohttp.ClientSession() as http:
        context = client_context(DESKTOP, SPARK.cert_pem)
        seen = observe_handshakes(context)
        async with http.get(url + "/whoami", ssl=context) as response:
            body = await response.json()
        # The server side: request.transport's ssl_object.
        assert body == {"client": DESKTOP.node_id, "version": "TLSv1.3"}
        assert seen == [SPARK.node_id]

        # The client side: response.connection.transport's ssl_object, while the body is still coming.
        async with http.get(url + "/slow", ssl=context) as response:
            assert response.connection is not None
            ssl_object = response.connection.transport.get_extra_info("ssl_object")  # type: ignore[union-attr]
            assert peer_fingerprint(ssl_object) == SPARK.node_id
            assert peer_fingerprint(response.connection.transport) == SPARK.node_id
            assert require_pinned(response.connection.transport, SPARK.node_id) == SPARK.node_id
            with pytest.raises(UntrustedPeer):
                require_pinned(response.connection.transport, DESKTOP.node_id)
            assert await response.read() == b"first second"


async def test_an_impostor_server_with_the_same_name_fails_the_handshake() -> None:
    impostor = new_identity("spark-1")  # same CN, same SAN, its own key
    async with serve(whoami_app(), server_context(impostor, [DESKTOP.cert_pem])) as url, \
            aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with http.get(url + "/whoami", ssl=client_context(DESKTOP, SPARK.cert_pem)):
                pass


async def test_an_unpaired_client_presenting_a_certificate_is_rejected() -> None:
    stranger = new_identity("desktop")  # even with the paired desktop's name
    async with serve(whoami_app(), server_context(SPARK, [DESKTOP.cert_pem])) as url, aiohttp.ClientSession() as http:
        # TLS 1.3: the client finishes its half first; the server's rejection arrives as the connection drops.
        with pytest.raises(aiohttp.ClientError):
            async with http.get(url + "/whoami", ssl=client_context(stranger, SPARK.cert_pem)) as response:
                await response.read()


async def test_a_listener_with_no_paired_peers_rejects_every_client_certificate() -> None:
    async with serve(whoami_app(), server_context(SPARK, [])) as url, aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            async with http.get(url + "/whoami", ssl=client_context(DESKTOP, SPARK.cert_pem)) as response:
                await response.read()
        async with http.get(url + "/whoami", ssl=client_context(None, SPARK.cert_pem)) as response:
            assert (await response.json())["client"] is None


async def test_a_client_without_a_certificate_connects_for_pairing_only() -> None:
    async with serve(whoami_app(), server_context(SPARK, [DESKTOP.cert_pem])) as url, aiohttp.ClientSession() as http:
        context = client_context(None, None)
        assert context.verify_mode == ssl.CERT_NONE
        seen = observe_handshakes(context)
        async with http.get(url + "/whoami", ssl=context) as response:
            assert (await response.json())["client"] is None  # the server sees no peer fingerprint
        assert seen == [SPARK.node_id]  # and the client still learns which certificate the server showed


def test_contexts_are_strict_and_pinned() -> None:
    pinned = client_context(DESKTOP, SPARK.cert_pem)
    assert pinned.verify_mode == ssl.CERT_REQUIRED
    assert pinned.check_hostname is False
    assert pinned.verify_flags & ssl.VERIFY_X509_STRICT
    assert pinned.minimum_version == ssl.TLSVersion.TLSv1_2
    assert pinned.cert_store_stats()["x509"] == 1  # only the pinned certificate: no system trust store
    server = server_context(SPARK, [DESKTOP.cert_pem])
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert server.cert_store_stats()["x509"] == 1
    assert server_context(SPARK, []).cert_store_stats()["x509"] == 0


def test_peer_fingerprint_without_tls_is_none() -> None:
    assert peer_fingerprint(None) is None


def test_the_same_checks_hold_under_uvloop() -> None:
    """The daemon runs on uvloop, whose transports are not asyncio's; the fingerprint must still be visible."""
    import uvloop  # a dependency: the daemon runs on it

    async def scenario(identity: Identity | None) -> tuple[object, list[str]]:
        async with serve(whoami_app(), server_context(SPARK, [DESKTOP.cert_pem])) as url, \
                aiohttp.ClientSession() as http:
            context = client_context(identity, SPARK.cert_pem)
            seen = observe_handshakes(context)
            async with http.get(url + "/whoami", ssl=context) as response:
                return (await response.json())["client"], seen

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(scenario(DESKTOP)) == (DESKTOP.node_id, [SPARK.node_id])
        assert runner.run(scenario(None)) == (None, [SPARK.node_id])
