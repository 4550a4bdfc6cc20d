"""Logs that read well in the journal: under systemd (stderr is $JOURNAL_STREAM) no timestamp of ours and a
priority prefix; one line per request with where it ran, why, time to first token, tokens and tokens/s; and
STATUS= kept current for `systemctl status`."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import openai

from hybridd.api.recent import Served
from hybridd.api.request_log import request_line
from hybridd.api.status_line import render_status_line
from hybridd.place.state import Observation
from hybridd.systemd.journal import log_formatter, stream_is_journal
from tests.conftest import start_daemon, stop_daemon, wait_for
from tests.test_serve_e2e import NO_EOS, tiny_config

LINE = re.compile(r'^<6>INFO hybridd\.request: chat model=tiny placement=local status=200 ttft=(?P<ttft>-|\d+\.\d\ds) '
                  r'tokens=(?P<tokens>-|\d+) tok/s=(?P<tok_s>-|\d+\.\d) time=\d+\.\d\ds reason="(?P<reason>[^"]*)"$')


def test_under_the_journal_requests_log_one_line_each_and_status_follows_the_node(tmp_path: Path,
                                                                                 tiny_model: Path) -> None:
    log = tmp_path / "daemon.log"  # the daemon's stderr: the test's stand-in for the journal's stream
    log.write_bytes(b"")
    journal = f"{log.stat().st_dev}:{log.stat().st_ino}"
    daemon = start_daemon(tiny_config(tiny_model), tmp_path, extra_env={"JOURNAL_STREAM": journal})
    try:
        assert daemon.log_path == log
        api = openai.OpenAI(base_url=daemon.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                    logit_bias=NO_EOS)
        list(api.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                         logit_bias=NO_EOS, stream=True))
        lines = wait_for(lambda: (found := [line for line in daemon.log().splitlines()
                                            if "hybridd.request:" in line])[1:] and found, what="two request lines")

        whole, streamed = (LINE.match(line) for line in lines)
        assert whole is not None and streamed is not None, lines
        assert whole["ttft"] == "-" and whole["tokens"] != "-"  # the engine's usage.completion_tokens
        assert streamed["ttft"] != "-" and streamed["tokens"] != "-"  # streamed: counted from its events
        assert whole["reason"].startswith("local: needs ") and "engine loaded in" in whole["reason"]

        status = wait_for(lambda: [m for m in daemon.notifications(timeout=1.0) if "loaded: tiny" in m],
                          timeout=20, what="STATUS= naming the loaded model")
        assert status[-1] == f"STATUS=serving on {daemon.url}; loaded: tiny"
    finally:
        stop_daemon(daemon)
    ours = [line for line in log.read_text().splitlines() if re.match(r"^(<\d>)?[A-Z]+ hybridd", line)]
    assert ours and all(line.startswith(("<6>INFO ", "<4>WARNING ", "<3>ERROR ")) for line in ours), ours


def test_journal_stream_is_honoured_only_for_the_stream_it_names(tmp_path: Path) -> None:
    with (tmp_path / "journal").open("w") as journal, (tmp_path / "other").open("w") as other:
        named = {"JOURNAL_STREAM": f"{(tmp_path / 'journal').stat().st_dev}:{(tmp_path / 'journal').stat().st_ino}"}
        assert stream_is_journal(named, journal)
        assert not stream_is_journal(named, other)  # stderr redirected after systemd started us
        assert not stream_is_journal({}, journal)
        assert not stream_is_journal({"JOURNAL_STREAM": "garbage"}, journal)
        assert not stream_is_journal(named, io.StringIO())  # no descriptor at all
        record = logging.LogRecord("hybridd", logging.WARNING, __file__, 1, "port %d taken", (80,), None)
        assert log_formatter(named, journal).format(record) == "<4>WARNING hybridd: port 80 taken"
        assert re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ WARNING hybridd: port 80 taken",
                            log_formatter(named, other).format(record))


def test_request_line_names_every_figure_and_quotes_the_reason() -> None:
    served = Served(0.0, "chat", "qwen3-8b", "peer:spark", 'peer:spark: "big" model\nneeds 47.1 GiB', 200, 3.456,
                    Observation(responded=True, complete=True, completion_tokens=64, decode_tok_s=41.23,
                                first_token_s=0.1234))
    assert request_line(served) == ('chat model=qwen3-8b placement=peer:spark status=200 ttft=0.12s tokens=64 '
                                    'tok/s=41.2 time=3.46s reason="peer:spark: \\"big\\" model needs 47.1 GiB"')
    refused = Served(0.0, "messages", "unknown", "", "no model named 'x'", 404, 0.0012)
    assert request_line(refused) == ('messages model=unknown placement=none status=404 ttft=- tokens=- tok/s=- '
                                     'time=0.00s reason="no model named \'x\'"')


def test_status_line_names_models_peers_and_jobs() -> None:
    assert render_status_line("http://127.0.0.1:11435", [], [], 0, 0, 0) == (
        "serving on http://127.0.0.1:11435; no model loaded")
    assert render_status_line("http://127.0.0.1:11435", ["a", "b"], ["spark"], 2, 1, 2) == (
        "serving on http://127.0.0.1:11435; loaded: a, b; peers up: spark (1 of 2); jobs: 1 running, 2 waiting")
    assert render_status_line("u", ["a"], [], 1, 0, 3) == (
        "serving on u; loaded: a; peers up: none (0 of 1); jobs: 3 waiting")
