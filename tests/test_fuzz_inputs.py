"""Generated hostile inputs (fti4cir.fuzz, hypothesis): a bounded number per target here;
`python -m fti4cir.commands.fuzz --examples 2000` runs longer. Each target's property: a defined result or a
UserError, nothing else."""

from __future__ import annotations

import pytest

from fti4cir import fuzz

EXAMPLES = {"images": 50, "texts": 200, "configs": 80, "pickles": 200}


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_generated_inputs_give_results_or_user_errors(target):
    tally = fuzz.run_target(target, EXAMPLES[target])
    assert tally.failure is None, tally.failure
    assert tally.examples >= EXAMPLES[target] // 2  # hypothesis may stop early once it has covered the space
    assert set(tally.outcomes) - {"ok", "refused", "valid config, file refused"} == set()
    assert tally.outcomes.get("refused", 0) > 0  # the generators do reach the refusals


def test_the_command_runs_a_target_and_lists_the_same_targets(capsys):
    from fti4cir.commands import fuzz as fuzz_command

    assert fuzz_command.TARGETS == fuzz.TARGETS  # the command lists them without importing hypothesis
    assert fuzz_command.main(["--examples", "20", "--target", "texts"]) == 0
    assert "texts: " in capsys.readouterr().out
