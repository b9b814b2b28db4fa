"""Command-line conventions: fast help for every command, --version, help text on every argument, one logging set-up,
the random-weights notice, and the command table matching the modules that register the commands."""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fti4cir import cli

ROOT = Path(__file__).resolve().parents[1]
HELP_LIMIT_S = 1.0
TINY = ["--backbone", "fti4cir-tiny", "--pretrained", "none", "--device", "cpu"]


def _run(*args, env=None):
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "fti4cir.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    return done, time.perf_counter() - start


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.mark.parametrize("command", [None, *cli.COMMANDS])
def test_help_answers_within_a_second_without_torch(command):
    """Measured in a fresh interpreter (best of 5: the machine is shared); and no heavy module was imported."""
    argv = ["--help"] if command is None else [command, "--help"]
    probe = (
        "import sys, runpy; sys.argv = ['fti4cir', *sys.argv[1:]]\n"
        "try:\n    runpy.run_module('fti4cir.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('HEAVY', sorted(m for m in ('torch', 'open_clip', 'gradio', 'transformers') if m in sys.modules))"
    )
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        best = min(best, time.perf_counter() - start)
        assert done.returncode == 0, done.stderr
        assert "usage: fti4cir" in done.stdout
        if best < HELP_LIMIT_S or "HEAVY []" not in done.stdout:
            break  # fast, or slow for a reason no retry changes
    assert "HEAVY []" in done.stdout, done.stdout[-300:]
    assert best < HELP_LIMIT_S, f"fti4cir {' '.join(argv)}: {best:.2f} s"


def test_version():
    from fti4cir import __version__

    done, _ = _run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fti4cir {__version__}"


def test_every_argument_has_help_and_the_table_matches_the_modules():
    parser = cli.build_parser()
    sub = _subparsers(parser)
    assert set(sub.choices) == set(cli.COMMANDS)
    for action in sub._choices_actions:  # the help line each module registers = the one `fti4cir --help` lists
        assert action.help == cli.COMMANDS[action.dest][1], action.dest
    missing = [
        f"fti4cir {a.option_strings or a.dest}"
        for a in parser._actions
        if not isinstance(a, argparse._SubParsersAction) and not a.help
    ]
    for name, p in sub.choices.items():
        missing += [f"fti4cir {name} {'/'.join(a.option_strings) or a.dest}" for a in p._actions if not a.help]
    assert missing == [], "arguments without help text"


def test_only_the_chosen_command_is_built():
    parser = cli.build_parser("deploy-space")
    sub = _subparsers(parser)
    assert sub.choices["deploy-space"]._actions[1].dest == "repo_id"
    assert [a.dest for a in sub.choices["index"]._actions] == []  # listed only


def test_random_inversion_network_is_announced_on_stderr_and_quiet_hides_it(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), "red").save(tmp_path / "r.png")
    done, _ = _run("inspect", str(tmp_path / "r.png"), *TINY)
    assert done.returncode == 0, done.stderr
    assert "a photo of [" in done.stdout and "randomly initialised" in done.stderr
    assert "randomly initialised" not in done.stdout
    quiet, _ = _run("-q", "inspect", str(tmp_path / "r.png"), *TINY)
    assert quiet.returncode == 0 and "randomly initialised" not in quiet.stderr and "a photo of [" in quiet.stdout


def test_logging_is_set_up_once_per_verbosity():
    import logging

    for verbosity, level in ((-1, logging.ERROR), (0, logging.INFO), (1, logging.DEBUG)):
        cli.setup_logging(verbosity)
        cli.setup_logging(verbosity)
        logger = logging.getLogger("fti4cir")
        assert logger.level == level and len(logger.handlers) == 1


def test_lazy_package_keeps_its_names():
    code = (
        "import sys, fti4cir; assert 'torch' not in sys.modules\n"
        "import fti4cir.app_service  # binds the submodules compose/decode on the package\n"
        "assert callable(fti4cir.compose) and callable(fti4cir.decode) and fti4cir.create_model\n"
        "from fti4cir import compose, UserError, Gallery, official_weights\n"
        "assert compose is fti4cir.compose and 'compose' in dir(fti4cir)\n"
        "try:\n    fti4cir.nothing\nexcept AttributeError:\n    print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr
