"""Answer extraction and verify verdicts: golden table."""

import pytest

from etchr_eval.extract import last_boxed, verify_verdict


@pytest.mark.parametrize("text,expected", [
    ("The answer is \\boxed{C}.", "C"),
    ("\\boxed{A} no wait \\boxed{B}", "B"),  # the last one
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # nested braces balanced
    ("\\boxed{ 1-2-0 }", " 1-2-0 "),
    ("\\boxed{}", ""),
    ("no box here", None),
    ("\\boxed{unterminated", None),
    ("\\boxed{a{b}", None),
    ("", None),
    (None, None),
    ("\\boxed{A}\\boxed{", None),  # the last \\boxed{ is unterminated, as in the reference
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize("text,accepted", [
    ("I can see it. \\boxed{1}", True),
    ("\\boxed{ 1 }", True),
    ("\\boxed{0}", False),
    ("\\boxed{1}\\boxed{0}", False),  # last verdict wins
    ("\\boxed{yes}", False),
    ("\\boxed{10}", False),
    ("1", False),  # no box -> reject
    (None, False),
])
def test_verdict(text, accepted):
    assert verify_verdict(text) is accepted


@pytest.mark.parametrize("text,trimmed,reference", [
    ("\\boxed{1}", True, True),
    ("\\boxed{ 1 }", True, False),  # the one difference: surrounding whitespace
    ("\\boxed{1\n}", True, False),
    ("\\boxed{0}", False, False),
    ("\\boxed{1.}", False, False),
    ("\\boxed{1}\\boxed{ 0 }", False, False),
    (None, False, False),
])
def test_verdict_rules(text, trimmed, reference):
    assert verify_verdict(text, "trimmed") is trimmed
    assert verify_verdict(text, "reference") is reference
    assert verify_verdict(text) is trimmed  # the default rule


def test_verdict_unknown_rule():
    with pytest.raises(ValueError, match="verify rule 'strict': use one of trimmed, reference"):
        verify_verdict("\\boxed{1}", "strict")


class _CopyEditor:
    """Stands in for the GPU: the 'edit' is the input image, saved once per seed."""

    stats = {"edits": 0, "cache_hits": 0, "edit_seconds": 0.0}

    def __init__(self, root):
        self.root = root

    def edit(self, image, prompt, seed):
        path = self.root / f"{seed}.png"
        image.save(path)
        return image, path, 0.0, False


@pytest.mark.parametrize("rule,accepted", [(None, True), ("trimmed", True), ("reference", False)])
def test_loop_verdict_follows_scoring_verify_rule(rule, accepted, dl3dv_parquet, tmp_path, make_double_server):
    """The loop reads settings.scoring.verify_rule: a spaced `\\boxed{ 1 }` verdict is an accept under the
    default (no scoring / trimmed) and a reject under the reference's rule."""
    import asyncio

    from omegaconf import OmegaConf

    from etchr_eval.client import MLLMClient
    from etchr_eval.config import ScoringConfig
    from etchr_eval.loop import LoopSettings, run_task
    from etchr_eval.results import ResultStore
    from etchr_eval.tasks import get_task

    srv = make_double_server(rules=[("judge", "\\boxed{ 1 }")])
    task = get_task("dl3dv")
    items = task.load(str(dl3dv_parquet), 2)
    store = ResultStore(tmp_path / "run")
    scoring = None if rule is None else OmegaConf.structured(ScoringConfig(verify_rule=rule))
    client = MLLMClient([srv.base_url], "m", max_retries=0)

    async def go():
        try:
            await run_task(task, items, _CopyEditor(tmp_path), client, store,
                           LoopSettings(run_dir=str(store.run_dir), scoring=scoring))
        finally:
            await client.aclose()

    asyncio.run(go())
    assert len(store.rows) == 2
    assert all(row["accepted"] is accepted for row in store.rows.values())
