"""The engine command line: every model setting reaches llama_cpp.server, repacking is off on AMX CPUs."""

from pathlib import Path

from hybridd.config import parse_config
from hybridd.engine.llamacpp import cpu_has_amx, llama_cpp_argv, repack_setting


def test_argv_carries_model_settings() -> None:
    config = parse_config('[[models]]\nname = "m"\npath = "/m.gguf"\nctx = 4096\ntype_k = "q8_0"\ntype_v = "q4_0"\n'
                          'flash_attn = true\noptions = { n_threads = 6, chat_format = "gemma" }\n')
    argv = llama_cpp_argv(config.models[0], 4321, python="/usr/bin/python3", has_amx=False)
    pairs = dict(zip(argv[3::2], argv[4::2], strict=False))
    assert argv[:3] == ["/usr/bin/python3", "-m", "hybridd.engine.llamacpp_main"]
    assert pairs["--model"] == str(Path("/m.gguf")) and pairs["--port"] == "4321" and pairs["--host"] == "127.0.0.1"
    assert (pairs["--n_ctx"], pairs["--type_k"], pairs["--type_v"]) == ("4096", "8", "2")  # ggml type ids
    assert pairs["--flash_attn"] == "True" and pairs["--interrupt_requests"] == "False"
    assert pairs["--logits_all"] == "False"  # else n_ctx x n_vocab floats of host RAM per engine
    assert (pairs["--n_threads"], pairs["--chat_format"]) == ("6", "gemma")
    assert pairs["--repack"] == "on"


def test_repack_is_off_on_amx_unless_forced() -> None:
    auto, forced = parse_config('[[models]]\nname = "a"\npath = "/a.gguf"\n'
                                '[[models]]\nname = "b"\npath = "/b.gguf"\nrepack = "on"\n').models
    assert repack_setting(auto, has_amx=True) == "off"
    assert repack_setting(auto, has_amx=False) == "on"
    assert repack_setting(forced, has_amx=True) == "on"
    assert cpu_has_amx("flags\t\t: fpu avx512f amx_bf16 amx_tile amx_int8\n")
    assert not cpu_has_amx("flags\t\t: fpu sse avx2\n")
