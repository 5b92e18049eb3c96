"""The depth operators: the seeded draw (each operator as often as its weight says, the same on
every rerun), the setting's checks, and that the default draws nothing new."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from zero_one_instruction.config import load_config, parse_config
from zero_one_instruction.errors import ConfigError
from zero_one_instruction.operators import (
    DEFAULT_WEIGHTS,
    OPERATORS,
    TEMPLATES,
    checked_weights,
    draw,
    draw_point,
    pick,
)
from zero_one_instruction.pipeline import request_seed

from .clitools import assert_one_line_error, zoi
from .conftest import make_pipeline

WEIGHTS = {"constraints": 1.0, "deepen": 2.0, "concretize": 3.0, "complicate_input": 4.0}
# The chi-square statistic's value that a fair draw exceeds once in a thousand times, for 3
# degrees of freedom (four operators drawn): far below what a draw ignoring the weights gives.
CHI_SQUARE_3_DF_P001 = 16.27


def chi_square(counts: Counter[str], weights: dict[str, float]) -> float:
    total, weight = sum(counts.values()), sum(weights.values())
    expected = {name: total * w / weight for name, w in weights.items()}
    return sum((counts[name] - e) ** 2 / e for name, e in expected.items())


def test_each_operator_is_drawn_as_often_as_its_weight_says() -> None:
    """20,000 draws over prompts and depth steps: a chi-square test of goodness of fit.
    Deterministic (the draws are hashes), so it gives the same statistic on every run."""
    counts = Counter(draw(WEIGHTS, 7, index, depth) for index in range(5000) for depth in range(4))
    assert set(counts) == set(WEIGHTS)  # reasoning has no weight: never drawn
    assert chi_square(counts, WEIGHTS) < CHI_SQUARE_3_DF_P001
    uniform = dict.fromkeys(WEIGHTS, 1.0)  # the check can fail: equal shares are refused
    assert chi_square(counts, uniform) > 100 * CHI_SQUARE_3_DF_P001


def test_the_pipeline_draws_by_weight_and_records_each_operator() -> None:
    """Through the pipeline: every depth step's trace names the operator drawn for it, as
    often as the weights say, and its request is made from that operator's template."""
    prompts = [f"case=w{i}" for i in range(300)]
    weights = {"deepen": 1, "reasoning": 1, "complicate_input": 2}
    pipeline, engine = make_pipeline(
        prompts, seed=3, pipeline={"depth_steps": 2, "depth_operators": weights}
    )

    async def all_outcomes() -> list:
        return [o async for o in pipeline.run(range(len(prompts)))]

    outcomes = asyncio.run(all_outcomes())
    counts = Counter(name for o in outcomes for name in o.operators)
    assert sum(counts.values()) == 600
    assert chi_square(counts, {k: float(v) for k, v in weights.items()}) < 13.82  # 2 df, p=0.001
    systems = {pipeline.templates.step(TEMPLATES[name]).system: name for name in weights}
    depth = [r for r in engine.requests if r.step == "depth"]
    by_index = {o.index: o for o in outcomes}
    drawn = Counter(systems[r.messages[0].content] for r in depth)
    assert drawn == counts
    for o in outcomes:
        assert [s.operator for s in o.steps if s.step == "depth"] == o.operators
        assert o.operators == [
            draw(pipeline.settings.depth_operators, 3, o.index, d) for d in (0, 1)
        ]
    assert by_index[0].to_dict()["operators"] == by_index[0].operators


def test_a_draw_is_the_same_on_every_rerun_and_differs_between_steps() -> None:
    points = [draw_point(1, index, depth) for index in range(50) for depth in range(3)]
    assert points == [draw_point(1, index, depth) for index in range(50) for depth in range(3)]
    assert len(set(points)) == len(points)
    assert all(0.0 <= p < 1.0 for p in points)
    assert draw_point(1, 0, 0) != draw_point(2, 0, 0)  # the run seed counts
    # Pinned: a change in how the draw is derived changes what every existing run draws.
    assert [draw(WEIGHTS, 0, i, 0) for i in range(6)] == [
        "concretize",
        "complicate_input",
        "complicate_input",
        "complicate_input",
        "constraints",
        "complicate_input",
    ]


def test_the_draw_lays_the_weights_out_in_operator_order() -> None:
    """The same weights listed in another order draw the same (their fingerprint is the
    same: run.json's JSON sorts its keys)."""
    reordered = dict(reversed(WEIGHTS.items()))
    for point in (0.0, 0.05, 0.1, 0.3, 0.5, 0.6, 0.99, 1 - 2**-53):
        assert pick(WEIGHTS, point) == pick(reordered, point)
    assert pick(WEIGHTS, 0.0) == "constraints"
    assert pick(WEIGHTS, 0.0999) == "constraints" and pick(WEIGHTS, 0.1) == "deepen"
    assert pick(WEIGHTS, 1 - 2**-53) == "complicate_input"


def test_depth_request_seeds_do_not_depend_on_the_operator() -> None:
    """The draw has a key of its own: the depth requests keep the seeds they always had."""
    for weights in (None, {"reasoning": 1}, {"deepen": 1, "concretize": 5}):
        settings = (
            {"depth_steps": 2}
            if weights is None
            else {"depth_steps": 2, "depth_operators": weights}
        )
        pipeline, engine = make_pipeline(["case=s"], seed=11, pipeline=settings)
        asyncio.run(pipeline.evolve(0))
        seeds = [r.seed for r in engine.requests if r.step == "depth"]
        assert seeds == [request_seed(11, 0, "depth", depth=d) for d in (0, 1)]


def test_the_default_is_the_one_depth_step_there_always_was() -> None:
    pipeline, engine = make_pipeline(["case=d"])
    outcome = asyncio.run(pipeline.evolve(0))
    assert pipeline.settings.depth_operators == DEFAULT_WEIGHTS
    assert pipeline.settings.default_operators
    assert outcome.operators == [] and "operators" not in outcome.to_dict()
    depth = next(s for s in outcome.steps if s.step == "depth")
    assert depth.operator is None and "operator" not in depth.to_dict()
    request = next(r for r in engine.requests if r.step == "depth")
    assert request.messages[0].content == pipeline.templates.depth.system


def test_weights_are_checked_and_kept_in_operator_order_without_zeros() -> None:
    assert checked_weights({"reasoning": 2, "constraints": 1, "deepen": 0}) == {
        "constraints": 1.0,
        "reasoning": 2.0,
    }
    assert list(checked_weights(dict.fromkeys(reversed(OPERATORS), 1))) == list(OPERATORS)
    config = parse_config(
        {"model_name": "m", "pipeline": {"depth_operators": {"constraints": 1, "deepen": 0}}}, "c"
    )
    assert config.pipeline.default_operators  # a zero weight is "never", as left out
    alone = parse_config(
        {"model_name": "m", "pipeline": {"depth_operators": {"constraints": 3}}}, "c"
    )
    assert alone.pipeline.default_operators  # one operator of any weight is drawn every time


def test_templates_of_steps_that_never_run_are_not_frozen() -> None:
    pipeline = {
        "depth_steps": 0,
        "depth_operators": {"deepen": 1},
        "drop_depth_no_gain": True,
    }
    config = parse_config({"model_name": "m", "pipeline": pipeline}, "c")
    assert config.pipeline.optional_templates() == ()
    config = parse_config({"model_name": "m", "pipeline": {**pipeline, "depth_steps": 1}}, "c")
    assert config.pipeline.optional_templates() == ("deepen", "same_request")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("{deep: 1}", "unknown operator 'deep' (the operators: constraints, deepen,"),
        ("{deepen: -1}", "deepen: weight -1.0 is negative"),
        ("{deepen: 1.0e+308, reasoning: 1}", "deepen: weight 1e+308 is above 1e+12"),
        ("{deepen: 0, constraints: 0}", "every weight is 0"),
        ("{}", "every weight is 0"),
        ("{deepen: yes}", "pipeline.depth_operators.deepen"),
        ("{deepen: .nan}", "pipeline.depth_operators.deepen"),
        ("[deepen]", "pipeline.depth_operators"),
    ],
)
def test_a_bad_weight_is_one_line_naming_the_setting(
    tmp_path: Path, value: str, fragment: str
) -> None:
    path = tmp_path / "c.yml"
    path.write_text(f"model_name: m\npipeline: {{depth_operators: {value}}}\n", "utf-8")
    with pytest.raises(ConfigError, match=r"pipeline\.depth_operators"):
        load_config(path)
    line = assert_one_line_error(zoi("config", "check", str(path)), str(path), fragment)
    assert "pipeline.depth_operators" in line
