"""Config loading is pure; every error is one line naming the dotted key and the valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from hybridd.config import (
    DEFAULT_LISTEN,
    Config,
    config_path,
    load_config,
    parse_config,
    state_dir,
    with_listen,
    with_role,
)
from hybridd.errors import ConfigError
from hybridd.model.memory import engine_outputs

REPO = Path(__file__).resolve().parent.parent


def test_defaults_listen_on_loopback() -> None:
    config = parse_config("")
    assert config.server.listen == DEFAULT_LISTEN
    assert config.models == ()
    assert config == Config(source="<string>")


def test_example_config_is_valid_and_pinned() -> None:
    config = load_config(REPO / "examples" / "config.toml")
    assert config.server.listen == "127.0.0.1:11435"
    assert [m.name for m in config.models] == ["qwen3-coder-30b", "nomic-embed", "gpt-oss-120b", "llama-server-8b"]
    coder, embed, peer_only, external = config.models
    assert peer_only.engine == "peer-only" and not peer_only.local and peer_only.quant == "MXFP4"
    (spark,) = config.peers
    assert (spark.name, spark.base_url, spark.hardware) == ("spark", "http://spark.local:11435", "dgx-spark")
    assert spark.serves("gpt-oss-120b") and not spark.serves("nomic-embed")
    assert config.node.name == "desktop" and config.node.queue_limit == 16 and config.node.devices == ()
    assert (config.node.advertise, config.node.advertised, config.node.advertise_interfaces) == (None, False, ())
    assert (config.node.engine_first_byte_floor_s, config.node.engine_idle_timeout_s,
            config.node.engine_health_interval_s) == (120, 60, 10)
    assert (config.node.peer_wake_s, config.node.wake_timeout_s, config.wake) == (60, 120, ())
    assert coder.aliases == ("coder",) and coder.ctx == 65536 and (coder.type_k, coder.type_v) == ("q8_0", "q8_0")
    assert coder.path == Path("~/models/Qwen3-Coder-30B-A3B-Instruct-Q4_K_M.gguf").expanduser()
    assert coder.options == {"n_threads": 8} and coder.idle_ttl_s == 3600
    assert embed.embeddings and embed.ctx == 8192 and not coder.embeddings
    assert external.engine == "external" and external.base_url == "http://127.0.0.1:8080"
    assert external.upstream_model == "llama-3.1-8b" and not external.managed
    assert config.library_dirs == (Path("~/models").expanduser(),)
    assert config.files.max_bytes == 1024**3


@pytest.mark.parametrize(("text", "message"), [
    ('[[wake]]\npeer = "spark"\nmac = "aa:bb:cc:dd:ee"',
     'wake[0].mac: expected a MAC address like "aa:bb:cc:dd:ee:ff", got "aa:bb:cc:dd:ee"'),
    ('[[wake]]\npeer = "spark"\nmac = "aa:bb:cc:dd:ee:ff"\nbroadcast = "spark.lan"',
     'wake[0].broadcast: expected an IPv4 address like "192.168.1.255", got "spark.lan"'),
    ('[[wake]]\nmac = "aa:bb:cc:dd:ee:ff"', "wake[0].peer: missing"),
    ('[[wake]]\npeer = "s"\nmac = "aa:bb:cc:dd:ee:ff"\n[[wake]]\npeer = "s"\nmac = "aa:bb:cc:dd:ee:fe"',
     'wake[1].peer: "s" already has a [[wake]] entry'),
    ("[node]\nwake_timeout_s = 0", "node.wake_timeout_s: must be > 0, got 0"),
    ("[server]\nlisten = 11435", 'server.listen: expected a string, got an integer'),
    ('[server]\nlisten = "localhost"', 'server.listen: expected "host:port"'),
    ('[server]\nlisten = "0.0.0.0:11435"', "server.listen: \"0.0.0.0:11435\" is not a loopback address"),
    ("[server]\nport = 1",
     "server.port: unknown key (valid: allow_non_loopback, extra_hosts, lan_listen, listen, log_level,"),
    ('[server]\nlog_level = "loud"', 'server.log_level: unknown value "loud" (valid: debug, info, warning, error)'),
    ("[server]\nmax_body_bytes = 10", "server.max_body_bytes: must be >= 1024"),
    ("[files]\nmax_bytes = 0", "files.max_bytes: must be >= 1, got 0"),
    ('[files]\nmax_bytes = "1G"', "files.max_bytes: expected an integer, got a string"),
    ("[files]\nmax_size = 1", "files.max_size: unknown key (valid: max_bytes)"),
    ("[server]\nshutdown_grace_s = -1", "server.shutdown_grace_s: must be > 0"),
    ("[engine]\nctx = true", "engine.ctx: expected an integer, got a boolean"),
    ('[engine]\ntype_k = "q9"', 'engine.type_k: unknown value "q9" (valid: bf16, f16, f32, iq4_nl, q4_0, q4_1'),
    ('[engine]\nkind = "vllm"', 'engine.kind: unknown value "vllm" (valid: auto, llama-cpp-python, llama-server)'),
    ('[[models]]\npath = "/m.gguf"', "models[0].name: required"),
    ('[[models]]\nname = "a"', "models[0].path: required"),
    ('[[models]]\nname = "a"\npath = "/a.gguf"\ntype_v = "q8_0"', 'models[0].type_v: a quantized V cache ("q8_0") '
     "needs flash_attn = true"),
    ('[[models]]\nname = "a"\npath = "/a.gguf"\nctx = 10', "models[0].ctx: must be between 256 and 4194304"),
    ('[[models]]\nname = "a"\npath = "/a.gguf"\ncolour = "red"', "models[0].colour: unknown key (valid: aliases,"),
    ('[[models]]\nname = "a"\npath = "/a.gguf"\noptions = { x = [1] }', "models[0].options.x: expected a string,"),
    ('[[models]]\nname = "a"\nengine = "external"\nbase_url = "ftp://x"', "models[0].base_url: an external model "
     "needs an http(s) URL"),
    ('[[models]]\nname = "a"\npath = "/a.gguf"\n[[models]]\nname = "b"\npath = "/b.gguf"\naliases = ["a"]',
     'models[1].aliases[0]: "a" is already used by models[0].name'),
    ("nonsense = 1",
     "nonsense: unknown key (valid: engine, files, library, models, node, peers, server, state_dir, train, wake)"),
    ("[[peers]]\nname = \"s\"\nbase_url = \"http://x\"", "peers[0].hardware: required"),
    ("[node]\nqueue_limit = 0", "node.queue_limit: must be > 0"),
    ("[[models]]\nname = \"m\"\nengine = \"peer-only\"", "models[0].profile: a model served only by peers"),
    ("[server\n", "not valid TOML"),
    ("x = " + "9" * 5000, "not valid TOML"),
])
def test_errors_name_the_dotted_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="cfg.toml")
    assert message in str(info.value)
    assert str(info.value).startswith("cfg.toml: ")
    assert "\n" not in str(info.value)


# Values that used to crash the daemon or be taken silently (issue 12, item 8).
REFUSED_VALUES = [
    ("[node]\nqueue_limit = inf", "node.queue_limit: expected an integer, got a number"),
    ("[node]\nqueue_limit = nan", "node.queue_limit: expected an integer, got a number"),
    ("[node]\nqueue_limit = 0.5", "node.queue_limit: expected an integer, got a number"),
    ("[node]\ndefault_max_tokens = inf", "node.default_max_tokens: expected an integer, got a number"),
    ("[node]\ndefault_max_tokens = 100.5", "node.default_max_tokens: expected an integer, got a number"),
    ('[node]\nname = "desk\\u0007top"', "node.name: contains control characters"),
    (f'[node]\nname = "{"x" * 64}"', "node.name: must be at most 63 characters, got 64"),
    ("[server]\nshutdown_grace_s = nan", "server.shutdown_grace_s: must be finite, got nan"),
    ("[server]\nshutdown_grace_s = inf", "server.shutdown_grace_s: must be finite, got inf"),
    ("[engine]\nload_timeout_s = nan", "engine.load_timeout_s: must be finite, got nan"),
    ("[engine]\nidle_ttl_s = nan", "engine.idle_ttl_s: must be finite, got nan"),
    ('[[models]]\nname = "a"\npath = "/a.gguf"\nidle_ttl_s = inf', "models[0].idle_ttl_s: must be finite, got inf"),
    ("[node]\npeer_idle_timeout_s = inf", "node.peer_idle_timeout_s: must be finite, got inf"),
    ("[node]\nram_bandwidth_bytes_s = nan", "node.ram_bandwidth_bytes_s: must be finite, got nan"),
    ("[node]\nram_bytes = -1", "node.ram_bytes: must be >= 0, got -1"),
    ("[node]\nram_bytes = 1.5e10", "node.ram_bytes: expected an integer, got a number"),
    ("[node]\ndisplay_reserve_bytes = -1", "node.display_reserve_bytes: must be >= 0, got -1"),
    ("[[node.devices]]\nmemory_bytes = inf", "node.devices[0].memory_bytes: expected an integer, got a number"),
    ("[[node.devices]]\nmemory_bytes = 1.5", "node.devices[0].memory_bytes: expected an integer, got a number"),
    ("[[node.devices]]\nmemory_bytes = 1\nsm_count = -1",
     "node.devices[0].sm_count: must be between 0 and 10000, got -1"),
    ("[[node.devices]]\nmemory_bytes = 1\ncompute_capability = 9.0",
     "node.devices[0].compute_capability: expected an integer, got a number"),
]


@pytest.mark.parametrize(("text", "message"), REFUSED_VALUES)
def test_values_that_would_crash_or_mislead_are_refused_naming_the_key(text: str, message: str) -> None:
    test_errors_name_the_dotted_key(text, message)


ADDRESS_OPTIONS = [
    ('[engine]\noptions = { host = "0.0.0.0" }', "engine.options.host: hybridd chooses where an engine listens"),
    ("[engine]\noptions = { port = 8080 }", "engine.options.port: hybridd chooses where an engine listens"),
    ('[engine]\noptions = { hos = "0.0.0.0" }', "engine.options.hos: hybridd chooses where an engine listens"),
    ('[[models]]\nname = "a"\npath = "/a.gguf"\noptions = { config_file = "/x.json" }',
     "models[0].options.config_file: hybridd chooses where an engine listens"),
    ('[engine]\noptions = { "--host" = "0.0.0.0" }', "engine.options.--host: an engine option is a flag name"),
    ('[engine]\noptions = { tensor_split = "--host=0.0.0.0" }',
     "engine.options.tensor_split: must not start with '-' (it would be read as another engine flag)"),
]


@pytest.mark.parametrize(("text", "message"), ADDRESS_OPTIONS)
def test_engine_options_may_not_set_where_the_engine_listens(text: str, message: str) -> None:
    test_errors_name_the_dotted_key(text, message)
    # Options about anything else still pass, negative numbers (as numbers or text) included.
    config = parse_config('[engine]\noptions = { n_threads = 8, seed = -1, chat_format = "gemma", hf_model_repo_id'
                          ' = "x", logit_bias_type = "-1" }')
    assert config.engine.options == {"n_threads": 8, "seed": -1, "chat_format": "gemma", "hf_model_repo_id": "x",
                                     "logit_bias_type": "-1"}


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b'[node]\nname = "d\xe9sktop"\n')  # Latin-1
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 16); TOML files are UTF-8"


def test_a_node_announces_itself_on_mdns_by_role_unless_told() -> None:
    assert not parse_config("").node.advertised  # a desktop is found by nothing: it dials its peers
    assert parse_config('[node]\nrole = "peer"').node.advertised
    assert with_role(parse_config(""), "peer").node.advertised  # --role peer too
    assert parse_config("[node]\nadvertise = true").node.advertised
    assert not with_role(parse_config("[node]\nadvertise = false"), "peer").node.advertised
    node = parse_config('[node]\nadvertise_interfaces = ["eth0", "10.0.0.5", "fe80::1", "enp1s0f0.100"]').node
    assert node.advertise_interfaces == ("eth0", "10.0.0.5", "fe80::1", "enp1s0f0.100")
    for text, message in [
        ('[node]\nadvertise = "yes"', "node.advertise: expected a boolean, got a string"),
        ('[node]\nadvertise_interfaces = "eth0"', "node.advertise_interfaces: expected an array, got a string"),
        ('[node]\nadvertise_interfaces = ["eth 0"]',
         'node.advertise_interfaces[0]: "eth 0" is neither an interface name (e.g. "eth0") nor an IP address'),
        ('[node]\nadvertise_interfaces = [""]', "node.advertise_interfaces[0]: must not be empty"),
    ]:
        test_errors_name_the_dotted_key(text, message)


def test_model_inherits_engine_defaults_and_overrides_them() -> None:
    config = parse_config('[engine]\nctx = 4096\nidle_ttl_s = 5\noptions = { n_threads = 2 }\n'
                          '[[models]]\nname = "a"\npath = "rel/a.gguf"\noptions = { n_batch = 64 }\n'
                          '[[models]]\nname = "b"\npath = "/b.gguf"\nctx = 1024\n', base_dir=Path("/cfg"))
    a, b = config.models
    assert (a.ctx, a.idle_ttl_s, b.ctx) == (4096, 5.0, 1024)
    assert a.options == {"n_threads": 2, "n_batch": 64}
    assert a.path == Path("/cfg/rel/a.gguf")  # relative paths are relative to the config file


def test_non_loopback_needs_explicit_opt_in() -> None:
    config = parse_config('[server]\nlisten = "0.0.0.0:11435"\nallow_non_loopback = true')
    assert config.server.host == "0.0.0.0"
    with pytest.raises(ConfigError, match="is not a loopback address"):
        with_listen(Config(), "192.168.1.5:11435")
    assert with_listen(Config(), "[::1]:9000").server.listen == "[::1]:9000"


def test_xdg_paths() -> None:
    assert config_path({"XDG_CONFIG_HOME": "/x"}) == Path("/x/hybridd/config.toml")
    assert config_path({"HOME": "/home/u"}) == Path("/home/u/.config/hybridd/config.toml")
    assert state_dir({"XDG_STATE_HOME": "/s"}) == Path("/s/hybridd")


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.toml")


def test_a_bad_value_is_shown_on_the_one_line_escaped() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config('[server]\nlog_level = "loud\\nand\\u007fclear"\n')
    assert str(raised.value) == ('<string>: server.log_level: unknown value "loud\\nand\\u007fclear" '
                                 '(valid: debug, info, warning, error)')


@pytest.mark.parametrize(("settings", "rows"), [
    ("", 2),  # one logits row a slot
    ("embeddings = true\n", 0),  # llama-server then reserves n_batch rows
    ('options = { pooling = "mean" }\n', 0),
    ('options = { model_draft = "draft.gguf", draft_max = 16 }\n', 0),  # 1 + n_draft a slot, n_batch at most
    ('options = { spec_type = "ngram-simple" }\n', 0),
    ("options = { special = true }\n", 2),  # printing special tokens is not speculative decoding
])
def test_the_logits_rows_a_llama_server_model_reserves(settings: str, rows: int) -> None:
    config = parse_config(f'[[models]]\nname = "m"\npath = "m.gguf"\nengine = "llama-server"\nslots = 2\n{settings}')
    (model,) = config.models
    assert engine_outputs(model.engine, model.slots, model.outputs_every_row) == rows


def test_a_configured_device_carries_what_picks_its_attention_kernel() -> None:
    from hybridd.node.resources import local_hardware

    config = parse_config('[node]\nram_bytes = 0\n[[node.devices]]\nname = "H100"\nmemory_bytes = 85_520_809_984\n'
                          'bandwidth_bytes_s = 3.35e12\ncompute_capability = 90\nsm_count = 132\n')
    (device,) = local_hardware(config).devices
    assert (device.name, device.compute_capability, device.sm_count) == ("H100", 90, 132)
