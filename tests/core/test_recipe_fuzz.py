"""Property-based fuzzing of the recipe loader (issue 12): any text, any YAML document and any
mutation of a real recipe gives a valid Recipe or one RecipeError, never another exception, and
quickly.

The default suite runs a short pass (``FAST`` examples per property, a few seconds in all). The
slow test runs ``EDGESMITH_FUZZ_EXAMPLES`` (default 2000) per property and prints the number of
cases tried; ``make test-all`` or ``pytest -m slow -k fuzz -s`` runs it (docs/security.md).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgesmith.errors import RecipeError
from edgesmith.recipe import Recipe, parse_recipe
from edgesmith.yamlutil import parse_yaml_with_lines
from tests.conftest import ROOT

FAST = 40
SLOW = int(os.environ.get("EDGESMITH_FUZZ_EXAMPLES", "2000"))
# one case: recipes parse in milliseconds, and the attacks this guards against (alias bombs,
# quadratic parsing) take minutes to hours; the margin absorbs a machine shared by many jobs
DEADLINE_S = 10.0
RECIPES = sorted((ROOT / "examples").glob("*/recipe*.yaml"))
TRIED: Counter[str] = Counter()

# YAML features that stress a loader: anchors and aliases, merge keys, tags, odd scalars
_FRAGMENTS = [
    "&a ", "*a", "<<: *a", "!!python/object/apply:os.system [id]", "!!binary aGk=", "!!set {a}",
    "? [1, 2]\n: x", "{", "[", "]", "}", "- ", ": ", "---\n", "...\n", "%YAML 1.1\n", "\t", "\x00",
    "'", '"', "|\n  x", ">\n  x", "#", "~", ".inf", ".nan", "0x1F", "1e400", "2020-01-01",
    "yes", "no", "null", "\ufeff", "\u2028", "a" * 300, "[" * 70, "&b [*b]",
]  # fmt: skip


def _load(text: str) -> Recipe:
    data, lines = parse_yaml_with_lines(text, "fuzz.yaml")
    return parse_recipe(data, ROOT / "examples" / "fashion_mnist", "fuzz.yaml", lines)


def _check(text: str, kind: str) -> None:
    TRIED[kind] += 1
    t0 = time.perf_counter()
    try:
        result = _load(text)
    except RecipeError as exc:
        assert exc.message.strip()
        return
    finally:
        assert time.perf_counter() - t0 < DEADLINE_S
    assert isinstance(result, Recipe)


# values that may replace any part of a recipe: every YAML type, nested a little
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["onnx", "tflite", "openvino", "x86-cpu", "rpi5", "int8", "minmax", "mse",
                     "model.py:SmallCNN", "weights.safetensors", "/dev/null", "~root", "..", "\x00",
                     "~nosuchuser/x", "a\x00b.pt2", "pkg.mod:fn", "x.pt2"]),
)  # fmt: skip
_KEYS = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none(), st.floats())
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=4)),
    max_leaves=12,
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _mutated_recipe(draw: st.DrawFn) -> str:
    """A real recipe with a few random edits: a value replaced, a key dropped or added."""
    doc = yaml.safe_load(draw(st.sampled_from(RECIPES)).read_text())
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(_VALUES)
        elif action == "drop":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(_KEYS)] = draw(_VALUES)
        else:
            parent.append(draw(_VALUES))
    text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=draw(st.booleans()))
    if draw(st.booleans()):  # splice raw YAML syntax into the text
        pos = draw(st.integers(0, len(text)))
        text = text[:pos] + draw(st.sampled_from(_FRAGMENTS)) + text[pos:]
    return text


_TEXT = st.one_of(
    st.text(max_size=400),
    st.lists(
        st.sampled_from([*_FRAGMENTS, "name: x\n", "model:\n  ", "stages:\n"]), max_size=30
    ).map("".join),
    _VALUES.map(lambda v: yaml.safe_dump(v, sort_keys=False)),
)


def _fast(**kw: Any) -> settings:
    return settings(
        max_examples=FAST,
        deadline=None,  # timed in _check, once per case (hypothesis would re-run slow ones)
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kw,
    )


@_fast()
@given(_TEXT)
def test_any_text_gives_a_recipe_or_a_recipe_error(text: str) -> None:
    _check(text, "text")


@_fast()
@given(_mutated_recipe())
def test_any_mutation_of_a_real_recipe_gives_a_recipe_or_a_recipe_error(text: str) -> None:
    _check(text, "mutated")


def test_the_unmutated_recipes_are_valid() -> None:
    for path in RECIPES:
        assert isinstance(_load(path.read_text()), Recipe), path


@pytest.mark.slow
def test_long_fuzz_run(capsys: pytest.CaptureFixture[str]) -> None:
    """The long run: ``EDGESMITH_FUZZ_EXAMPLES`` cases per property (docs/security.md)."""
    TRIED.clear()
    long = settings(
        max_examples=SLOW,
        deadline=None,  # timed in _check, once per case (hypothesis would re-run slow ones)
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    t0 = time.perf_counter()
    long(given(_TEXT)(lambda text: _check(text, "text")))()
    long(given(_mutated_recipe())(lambda text: _check(text, "mutated")))()
    with capsys.disabled():
        print(
            f"\nrecipe fuzz: {TRIED['text']} text cases, {TRIED['mutated']} mutated-recipe cases, "
            f"{time.perf_counter() - t0:.0f} s, no exception other than RecipeError"
        )
    assert TRIED["text"] >= SLOW // 2 and TRIED["mutated"] >= SLOW // 2


@pytest.mark.parametrize(
    "text",
    [
        # cases the fuzzer found on main (each was an exit-70 traceback there)
        "{1: 2}\n",
        "name: x\nstages: [{prune: {1: 2}}]\n",
        "a: &a [*a]\n",
    ],
)
def test_regressions_found_by_fuzzing(text: str) -> None:
    with pytest.raises(RecipeError):
        _load(text)
