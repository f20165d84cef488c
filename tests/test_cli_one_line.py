"""Every kiln command's option mistakes are one line on stderr and exit code 2 (argparse
prints the whole usage first by default)."""

from __future__ import annotations

import pytest

from kiln.cli import main


@pytest.mark.parametrize("argv, words", [
    ([], "the following arguments are required: command"),
    (["serve", "--port", "abc"], "argument --port: expected a port number"),
    (["bench", "latency", "--foo"], "unrecognized arguments: --foo"),
    (["run", "--prompt", "hi", "--max-tokens", "x"], "argument --max-tokens"),
    (["build", "--quantization", "int3"], "argument --quantization: invalid choice"),
    (["eval", "perplexity", "--window", "w"], "argument --window"),
    (["nosuch"], "invalid choice: 'nosuch'"),
])
def test_option_mistakes_are_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("kiln: error: ") and words in err, err
    assert len(err.splitlines()) == 1 and "usage:" not in err and captured.out == ""
    assert err.endswith("--help)")


def test_help_still_prints_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["serve", "--help"])
    assert stop.value.code == 0 and "usage: kiln serve" in capsys.readouterr().out
