"""Every flag reaches the config it names, or is refused with the reason; --help shows defaults.

pytest tests/launch/test_cli_flags.py
"""

import argparse
import dataclasses

import pytest
import torch

from engine.config import ConfigError
from engine.sampling.noise import NoiseSource
from engine.weight_paths import WeightPaths
from launch.build import build_session
from launch.cli import (
    FLAGS,
    parallel_from_args,
    preset_from_args,
    process_from_args,
    speed_from_args,
    weights_from_args,
)
from launch.generate import build_parser

PARSER = build_parser()


def _resolved(argv: list[str]):
    args = PARSER.parse_args(argv)
    return (
        preset_from_args(args),
        weights_from_args(args),
        parallel_from_args(args),
        process_from_args(args),
        speed_from_args(args),
    )


def _field(configs, sets: str):
    preset, weights, parallel, process, speed = configs
    section, name = sets.split(".")
    if section == "process":
        return process.get(name)
    holder = {"weights": weights, "parallel": parallel, "speed": speed}.get(section) or getattr(preset, section)
    if section == "sampling" and name == "num_steps":
        return preset.sampling.steps
    return getattr(holder, name)


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.name)
def test_each_flag_sets_its_field(flag):
    """With its example arguments the flag changes exactly the field it declares (and the run's
    configuration as a whole), starting from the defaults."""
    default, changed = _resolved([]), _resolved(list(flag.example))
    assert _field(changed, flag.sets) != _field(default, flag.sets), f"{flag.name} did not change {flag.sets}"
    assert changed != default


@pytest.mark.parametrize("flag", [f for f in FLAGS if f.applies is not None], ids=lambda f: f.name)
def test_a_flag_that_would_change_nothing_is_refused(flag):
    """Alone (without the settings it needs), such a flag is refused with a message naming it."""
    spelled = [a for a in flag.example if a in (flag.name, flag.name.replace("--", "--no-", 1))][0]
    value = list(flag.example[flag.example.index(spelled) :][:2])
    alone = value if len(value) == 2 and not value[1].startswith("--") else value[:1]
    with pytest.raises(ConfigError) as refused:
        _resolved(alone)
    message = str(refused.value)
    assert "\n" not in message and (flag.name in message or flag.name.replace("--", "--no-") in message), message


def test_every_parser_flag_is_in_the_table_or_documents_its_default():
    """Table flags are walked above; the entry point's own flags must say their default."""
    table = {f.name for f in FLAGS}
    for action in PARSER._actions:
        name = next((o for o in action.option_strings if o.startswith("--")), None)
        if name is None or isinstance(action, argparse._HelpAction) or name in table:
            continue
        assert action.help and "default" in action.help, f"{name}: help must show the default"


def test_invalid_combinations_are_refused_with_a_reason():
    for argv, reason in (
        (["--schedule", "pyramid", "--offset", "1", "--context", "lagged", "--compute", "window"], "lagged"),
        (["--switch", "recache", "--schedule", "pyramid", "--offset", "1"], "recache"),
        (["--cache", "flowcache", "--compute", "window"], "caching"),
    ):
        with pytest.raises(ConfigError, match=reason):
            _resolved(argv)


def test_cache_without_threshold_uses_the_policy_suggestion():
    preset, *_ = _resolved(["--cache", "flowcache"])
    assert preset.cache.policy == "flowcache" and preset.cache.threshold > 0, "a cache that never skips is no cache"


def test_lagged_caching_and_recache_reach_the_preset():
    """The two flags that used to be dropped (--context, --switch) now arrive."""
    preset, *_ = _resolved(["--schedule", "pyramid", "--offset", "1", "--context", "lagged", "--cache", "scope"])
    assert (preset.plan.context, preset.cache.policy) == ("lagged", "scope")
    preset, *_ = _resolved(["--switch", "recache"])
    assert preset.plan.switch == "recache"
    assert dataclasses.replace(preset.plan, switch="next-step") == _resolved([])[0].plan


def _latents_from_flags(argv: list[str], prompt, preset_name: str = "tiny-wan") -> torch.Tensor:
    preset = _resolved(["--preset", preset_name, *argv])[0]
    session = build_session(preset, WeightPaths(seed=3), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return torch.cat([b.latents for b in session.run(prompt, blocks=4, seed=0)], dim=2)


def test_context_and_switch_flags_change_the_video():
    """The two flags that used to be dropped on their way to the config now change the output."""
    pyramid = ["--schedule", "pyramid", "--offset", "1"]
    joint = _latents_from_flags([*pyramid, "--context", "joint"], "a red circle")
    lagged = _latents_from_flags([*pyramid, "--context", "lagged"], "a red circle")
    assert (joint - lagged).abs().max() > 1e-4, "--context lagged must change the video"

    def switch(tick):
        return "a red circle" if tick.index < 7 else "a blue square"  # mid-block: the two switches part

    next_step = _latents_from_flags(["--switch", "next-step"], switch, "demo")  # recache: a preset without sink
    recache = _latents_from_flags(["--switch", "recache"], switch, "demo")
    assert (next_step - recache).abs().max() > 1e-4, "--switch recache must change the video"


def test_speed_flags_reach_the_session_or_are_refused_for_the_device():
    """--compile graphs needs CUDA (one line saying so on CPU); the other speed choices reach the
    session's forward and are said in its start-up line."""
    tiny = ["--preset", "tiny-wan"]
    graphs = _resolved([*tiny, "--compile", "graphs"])
    with pytest.raises(ConfigError, match="--compile graphs") as refused:
        build_session(graphs[0], WeightPaths(seed=3), torch.device("cpu"), torch.float32, speed=graphs[4])
    assert "\n" not in str(refused.value)
    chosen = _resolved([*tiny, "--compile", "default", "--attention-backend", "math"])
    session = build_session(chosen[0], WeightPaths(seed=3), torch.device("cpu"), torch.float32, speed=chosen[4])
    line = session.executors.speed_line
    assert "compiled" in line and "math" in line, line
    fp8 = _resolved([*tiny, "--kv-cache", "fp8"])
    session = build_session(fp8[0], WeightPaths(seed=3), torch.device("cpu"), torch.float32, speed=fp8[4])
    assert session.executors(NoiseSource(0), blocks_in_forward=1).cache.storage == "fp8"


def _help_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{--flag: its help as printed (after argparse's % expansion)}."""
    formatter = parser._get_formatter()
    return {
        action.option_strings[-1]: formatter._expand_help(action)
        for action in parser._actions
        if action.option_strings and action.help
    }


@pytest.mark.parametrize("command", ["generate", "stream"])
def test_help_states_each_default_once_and_never_none(command):
    """A flag whose help already names its default is not followed by "(default: none)"; a switch
    is off by default; a preset field left unset says what that means, not "None"."""
    from launch.stream import build_parser as stream_parser

    helps = _help_of(build_parser() if command == "generate" else stream_parser())
    for flag, text in helps.items():
        assert text.count("(default") <= 1, f"{flag}: {text}"
        assert "None" not in text, f"{flag}: {text}"
    assert helps["--tokenizer"].endswith("(default: beside the text encoder)")
    assert "(default: none)" not in helps["--no-ema"] and "(default when present)" in helps["--no-ema"]
    assert helps["--random-weights"].endswith("(default: off)")
    assert helps["--offset"].endswith("demo: none, one block at a time)")
    assert helps["--cache-warmup"].endswith("demo: none, 15% of the steps)")


def test_one_prompt_rule_for_every_entry_point(capsys):
    """engine.generate, engine.stream and engine.client refuse the same prompts, in one line."""
    from engine.serving.client import build_parser as client_parser
    from launch.stream import build_parser as stream_parser

    long = "a" * 3000
    for parser, flag in ((build_parser(), "--prompt"), (stream_parser(), "--prompt"), (client_parser(), "--prompt2")):
        with pytest.raises(SystemExit) as exit:
            parser.parse_args([flag, long])
        assert exit.value.code == 2
        assert "prompt longer than 2000 bytes of UTF-8 (it has 3000)" in capsys.readouterr().err
    assert PARSER.parse_args(["--prompt", "a  red\tcircle"]).prompt == "a red circle"


@pytest.mark.parametrize("command", ["generate", "stream"])
def test_an_abbreviated_flag_is_refused_not_guessed(command, capsys):
    # `--replica 2` once ran as `--replicas 2`: a typo must fail, not pick the nearest flag.
    if command == "generate":
        parser = build_parser()
        argv = ["--block", "3"]
    else:
        from launch.stream import build_parser as stream_parser

        parser = stream_parser()
        argv = ["--replica", "2"]
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert "unrecognized arguments" in capsys.readouterr().err
