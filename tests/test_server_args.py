"""The CLI (ServerArgs flags) and the environment switches (radixserve/envs.py), without
loading a model.

(a) `--help` describes every flag, with its default and, for a fixed set, its choices;
(b) a bad flag value or combination is one argparse error line and exit status 2, before
anything loads; the Python API raises ValueError instead; (c) every environment switch
is read at call time and lives in envs.py only.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from radixserve.envs import EnvBool, envs
from radixserve.server_args import ServerArgs

REPO = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixserve")
    ServerArgs.add_cli_args(parser)
    return parser


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]


def _launch(*argv: str) -> subprocess.CompletedProcess:
    # COLUMNS: no wrapped lines in argparse's output.
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "radixserve.launch_server", *argv],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


# --- (a) --help ------------------------------------------------------------------------

def test_every_flag_has_help_with_default_and_choices() -> None:
    actions = _flags(_parser())
    assert len(actions) == len([f for f in ServerArgs.__dataclass_fields__.values()])
    for action in actions:
        flag = action.option_strings[0]
        assert action.help and action.help.strip(), flag
        assert "(default: " in action.help, flag
        if action.default is not None:
            assert f"(default: {action.default})" in action.help, flag
        # One line: the description is a single sentence, argparse wraps it.
        assert "\n" not in action.help, flag


def test_fixed_sets_are_choices() -> None:
    from radixserve.parsers import REASONING_PARSERS, TOOL_CALL_PARSERS

    choices = {a.dest: a.choices for a in _flags(_parser())}
    assert set(choices["attention_backend"]) == {"torch_native", "triton"}
    assert set(choices["device"]) == {"cuda", "cpu"}
    assert set(choices["tool_call_parser"]) == set(TOOL_CALL_PARSERS)
    assert set(choices["reasoning_parser"]) == set(REASONING_PARSERS)
    for dest in ("load_format", "dtype", "schedule_policy", "load_balance_method",
                 "grammar_backend", "log_level"):
        assert choices[dest], dest


def test_help_output() -> None:
    out = _launch("--help")
    assert out.returncode == 0, out.stderr
    for action in _flags(_parser()):
        assert action.option_strings[0] in out.stdout
        if action.choices:
            assert "{" + ",".join(action.choices) + "}" in out.stdout, action.dest
    assert "tokens per KV cache page (default: 1)" in out.stdout
    assert "--attention-backend {torch_native,triton}" in out.stdout


# --- (b) bad values ---------------------------------------------------------------------

@pytest.mark.parametrize("argv, flag", [
    (["--attention-backend", "flashinfer"], "--attention-backend"),
    (["--tool-call-parser", "foo"], "--tool-call-parser"),
    (["--page-size", "0"], "--page-size"),
    (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
    (["--tp-size", "two"], "--tp-size"),
    (["--nnodes", "2", "--node-rank", "5"], None),  # a check across flags
    (["--disaggregation-mode", "both"], "--disaggregation-mode"),
    (["--disaggregation-bootstrap-port", "70000"], "--disaggregation-bootstrap-port"),
    (["--disaggregation-waiting-timeout", "0"], "--disaggregation-waiting-timeout"),
    (["--disaggregation-mode", "decode", "--tp-size", "2"], None),
    (["--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl"], None),
])
def test_bad_value_is_one_argparse_error(argv: list[str], flag: str | None) -> None:
    out = _launch(*argv)
    assert out.returncode == 2, out.stderr
    assert out.stdout == ""
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("radixserve: error:")]
    assert len(errors) == 1, out.stderr
    # The error is the last line; only the usage comes before it.
    assert out.stderr.rstrip().splitlines()[-1] == errors[0]
    assert out.stderr.startswith("usage: radixserve")
    if flag is not None:
        assert errors[0].startswith(f"radixserve: error: argument {flag}: "), errors[0]


def test_cross_flag_error_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _parser()
    with pytest.raises(SystemExit) as e:
        ServerArgs.from_cli_args(parser.parse_args(["--nnodes", "2", "--tp-size", "3"]),
                                 parser=parser)
    assert e.value.code == 2
    assert "tp_size=3 must be a multiple of nnodes=2" in capsys.readouterr().err


def test_python_api_raises_value_error() -> None:
    with pytest.raises(ValueError, match="node_rank"):
        ServerArgs(model_path="unused.gguf", nnodes=2, node_rank=5)
    with pytest.raises(ValueError, match="page_size"):
        ServerArgs(model_path="unused.gguf", page_size=0)
    parser = _parser()
    args = parser.parse_args(["--nnodes", "2", "--node-rank", "5"])
    with pytest.raises(ValueError, match="node_rank"):
        ServerArgs.from_cli_args(args)  # no parser: the ValueError as is


def test_defaults_round_trip() -> None:
    parser = _parser()
    sa = ServerArgs.from_cli_args(parser.parse_args(["--model-path", "m.gguf"]), parser=parser)
    assert sa == ServerArgs(model_path="m.gguf")
    assert not hasattr(sa, "extra")


# --- (c) environment switches ---------------------------------------------------------

SWITCHES = ["RADIXSERVE_DISABLE_ROPE_KV_WRITE", "RADIXSERVE_DISABLE_NORM_GEMV",
            "RADIXSERVE_DISABLE_PDL"]


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_reads_environment_at_call_time(name: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    switch = getattr(envs, name)
    assert isinstance(switch, EnvBool) and switch.name == name and switch.doc
    monkeypatch.delenv(name, raising=False)
    assert switch.get() is False
    monkeypatch.setenv(name, "1")
    assert switch.get() is True
    monkeypatch.setenv(name, "0")
    assert switch.get() is False


def test_envs_lists_every_switch() -> None:
    assert sorted(s.name for s in envs.all()) == sorted(SWITCHES + ["RADIXSERVE_CACHE_DIR"])


def test_cache_dir_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RADIXSERVE_CACHE_DIR", raising=False)
    assert envs.RADIXSERVE_CACHE_DIR.get() == "~/.cache/radixserve"
    monkeypatch.setenv("RADIXSERVE_CACHE_DIR", "/x/y")
    assert envs.RADIXSERVE_CACHE_DIR.get() == "/x/y"


def test_switch_named_as_its_attribute() -> None:
    with pytest.raises((TypeError, RuntimeError)):
        type("Bad", (), {"RADIXSERVE_X": EnvBool("RADIXSERVE_Y", False, "doc")})


def test_environment_is_read_in_envs_only() -> None:
    """A `RADIXSERVE_*` variable name as a string literal, and any os.environ / getenv
    read, appear in radixserve/envs.py only."""
    literal = re.compile(r"""["']RADIXSERVE_\w*["']""")
    reads = re.compile(r"\bos\.environ\b|\bgetenv\(")
    offenders = []
    for path in sorted((REPO / "radixserve").rglob("*.py")):
        if path.name == "envs.py" and path.parent.name == "radixserve":
            continue
        text = path.read_text(encoding="utf-8")
        if literal.search(text) or reads.search(text):
            offenders.append(str(path.relative_to(REPO)))
    assert not offenders
    assert literal.search((REPO / "radixserve" / "envs.py").read_text(encoding="utf-8"))
