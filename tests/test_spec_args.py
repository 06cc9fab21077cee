"""The speculative-decoding flags: SGLang's names and defaults, and one-line errors
before any model loads."""

from __future__ import annotations

import argparse
import re

import pytest

from radixserve.server_args import ServerArgs
from tests.model_factory import make_tiny_checkpoint


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(make_tiny_checkpoint("llama", tmp_path_factory.mktemp("m"),
                                    with_tokenizer=False))


def parse(*argv: str) -> ServerArgs:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(list(argv)), parser=parser)


def test_ngram_defaults_follow_sglang(model_path):
    args = parse("--model-path", model_path, "--speculative-algorithm", "NGRAM")
    cfg = args.speculative_config()
    assert cfg.num_draft_tokens == 12  # --speculative-ngram-max-match-window-size
    assert (cfg.ngram_min_match_window_size, cfg.ngram_max_match_window_size) == (1, 12)
    assert (cfg.ngram_min_bfs_breadth, cfg.ngram_max_bfs_breadth) == (1, 10)
    assert (cfg.ngram_match_type, cfg.ngram_branch_length) == ("BFS", 18)
    assert cfg.ngram_capacity == 10_000_000
    assert (cfg.accept_threshold_single, cfg.accept_threshold_acc) == (1.0, 1.0)
    # As in SGLang, speculation runs without the overlapped loop and mixed chunks.
    assert args.disable_overlap_schedule and not args.enable_mixed_chunk


def test_chain_defaults_and_flags(model_path):
    args = parse("--model-path", model_path, "--speculative-algorithm", "STANDALONE",
                 "--speculative-draft-model-path", model_path, "--speculative-num-steps", "5",
                 "--speculative-accept-threshold-single", "0.9",
                 "--speculative-accept-threshold-acc", "0.5")
    cfg = args.speculative_config()
    assert (cfg.num_steps, cfg.eagle_topk, cfg.num_draft_tokens) == (5, 1, 6)
    assert (cfg.accept_threshold_single, cfg.accept_threshold_acc) == (0.9, 0.5)
    assert cfg.draft_load.model_path == model_path
    assert parse("--model-path", model_path).speculative_config() is None


@pytest.mark.parametrize("argv, message", [
    (["--speculative-algorithm", "EAGLE3"], "needs --speculative-draft-model-path"),
    (["--speculative-algorithm", "STANDALONE"], "needs --speculative-draft-model-path"),
    (["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", "{m}",
      "--speculative-num-steps", "3", "--speculative-num-draft-tokens", "6"],
     "speculative_num_steps \\+ 1"),
    (["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "1"],
     "must be >= 2"),
    (["--speculative-algorithm", "NGRAM", "--speculative-ngram-min-match-window-size", "5",
      "--speculative-ngram-max-match-window-size", "3"], "must not exceed"),
    (["--speculative-algorithm", "EAGLE", "--speculative-draft-model-path", "{m}"],
     "not implemented yet"),
])
def test_bad_settings_are_one_line_errors(model_path, capsys, argv, message):
    argv = [a.replace("{m}", model_path) for a in argv]
    with pytest.raises(SystemExit) as e:
        parse("--model-path", model_path, *argv)
    assert e.value.code == 2
    # argparse prints the usage, then the one line: "PROG: error: MESSAGE".
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err and re.search(message, err), err


def test_bad_choice_is_an_argparse_error(model_path, capsys):
    with pytest.raises(SystemExit):
        parse("--model-path", model_path, "--speculative-algorithm", "MEDUSA")
    assert "invalid choice" in capsys.readouterr().err


def test_python_api_raises_value_error(model_path):
    with pytest.raises(ValueError, match="needs --speculative-draft-model-path"):
        ServerArgs(model_path=model_path, speculative_algorithm="EAGLE3")
