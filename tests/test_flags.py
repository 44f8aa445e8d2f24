"""Flags a user mistypes: named with the closest real flag before anything else; help without noise, grouped."""

from __future__ import annotations

import pytest

from sbmoe import cli


def error_of(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["evaluate", "--modle", "minilm", "--datasets", "x"], "unrecognized flag --modle (did you mean --model?)"),
        (["evaluate", "--model", "minilm", "--datsets=x"], "unrecognized flag --datsets (did you mean --datasets?)"),
        (["quantize", "--modle", "m", "--output", "o", "--bits", "4"], "unrecognized flag --modle (did you mean"),
        (["finetune", "--epoch", "3", "--learnin-rate", "1e-3"], "unrecognized flag --learnin-rate (did you mean "),
        (["demo", "--doc", "10", "--zzz"], "unrecognized flag --zzz"),
    ],
)
def test_a_misspelled_flag_is_named_first(argv: list[str], expected: str, capsys: pytest.CaptureFixture) -> None:
    message = error_of(argv, capsys)
    assert message.startswith(f"sbmoe {argv[0]}: error: {expected}"), message
    assert "required" not in message


def test_abbreviations_and_missing_flags_still_work_as_in_argparse(capsys: pytest.CaptureFixture) -> None:
    assert error_of(["evaluate", "--datasets", "x"], capsys).endswith("one of the arguments --model --run is required")
    assert error_of(["quantize", "--bits", "4"], capsys).endswith("arguments are required: --model, --output")
    assert "unrecognized" not in error_of(["evaluate", "--mod", "minilm", "--top-k", "0", "--datasets", "x"], capsys)


def test_quantize_help_says_required_not_default_none(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--model MODEL a saved sbmoe model folder (SB-MoE head or MoE layers) (required)" in text
    assert "--output OUTPUT folder for the quantized model (required)" in text


def test_finetune_help_groups_every_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    text = capsys.readouterr().out
    titles = ["model and MoE layers inside the encoder:", "head (on the pooled vector):", "data:"]
    titles += ["hard negatives (mined once with the backbone, cached):", "training, output and checkpoints:"]
    assert [line for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")][1:6] == titles
    assert text.index("--learning-rate") > text.index("training, output") > text.index("--head-layers")
    assert text.index("--head-layers") > text.index("head (on the") > text.index("--moe-layers")
