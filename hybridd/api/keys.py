"""Typed application state shared by the routes."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from hybridd.config import Config
from hybridd.engine.pool import EnginePool
from hybridd.jobs.files import FileStore
from hybridd.node.catalog import Catalog
from hybridd.node.peering import PeerNode
from hybridd.node.router import Router
from hybridd.node.training import Trainings


@dataclass(frozen=True)
class Node:
    """What the routes share: config, the model catalog, and when this node started."""

    config: Config
    catalog: Catalog
    started_wall: float
    started_mono: float


NODE = web.AppKey("node", Node)
POOL = web.AppKey("pool", EnginePool)
HTTP = web.AppKey("http", aiohttp.ClientSession)
ROUTER = web.AppKey("router", Router)
PEER = web.AppKey("peer", PeerNode)  # present when peering is on
FILES = web.AppKey("files", FileStore)  # present when the app has a state dir
TRAININGS = web.AppKey("trainings", Trainings)  # present when the app has a state dir
