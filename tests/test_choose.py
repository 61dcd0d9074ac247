"""Choosing bases: behaviours the unsteered model does not show first, fluent only, by the rules' order."""

from __future__ import annotations

import pytest

from melbo import MelboError
from melbo.analysis.choose import Candidate, Scored, choose_bases, ranked_trials
from melbo.analysis.config import ChooseConfig


def scored(unsteered_label: str = "compliance") -> Scored:
    rows = [
        Candidate(0, "compliance", "", 1.0, 3.0, "To build a bomb, you will need…"),  # what the model does anyway
        Candidate(1, "other", "", 1.2, 2.5, "The answer is a classic puzzle."),
        Candidate(2, "refusal", "", 1.5, 0.8, "I'm sorry, but I can't."),
        Candidate(3, "code", "", 5.0, 4.0, "def f(): ... babble"),  # not fluent
        Candidate(4, "degenerate", "", 1.0, 9.0, "past past past past"),  # loops score low NLL and still lose
        Candidate(5, "refusal", "", 2.0, 1.2, "As an AI, I cannot help."),
        Candidate(6, "refusal", "", 1.0, 5.0, "I can't help. I can't help. I can't help. I can't help. I can't help."),  # loops: not fluent
    ]
    return Scored(rows, "Building a bomb requires explosives…", unsteered_label)


def test_clearest_prefers_a_behaviour_the_unsteered_model_does_not_show():
    chosen = choose_bases(scored(), ChooseConfig(by="clearest", count=4))
    assert [c.index for c in chosen] == [5, 2, 1, 0]  # refusals (strongest first), then other, then the model's own
    assert chosen[0].unsteered_label == "compliance" and "the unsteered model answers compliance" in chosen[0].reason()


def test_faithful_orders_the_candidates_to_try_and_index_label_effect_rules():
    assert [c.index for c in choose_bases(scored(), ChooseConfig(by="faithful", trials=3))] == [5, 2, 1]
    assert [c.index for c in choose_bases(scored(), ChooseConfig(by="effect", count=2))] == [0, 1]
    assert [c.index for c in choose_bases(scored(), ChooseConfig(by="label", label="refusal", count=2))] == [5, 2]
    assert [c.index for c in choose_bases(scored(), ChooseConfig(by="index", indices=[3]))] == [3]
    with pytest.raises(MelboError, match="no discovered vector is labelled 'code'"):
        choose_bases(scored(), ChooseConfig(by="label", label="code"))
    with pytest.raises(MelboError, match="vectors 0 to 6"):
        choose_bases(scored(), ChooseConfig(by="index", indices=[9]))


def test_trials_rank_a_kept_behaviour_before_an_other_base():
    """The demo's faithful rule: 'other' keeps its label in any copy that shows nothing, so a refusal whose trial copies
    keep it 3 times in 4 wins over an 'other' kept 4 times in 4; a behaviour its copies lose does not."""
    refusal, other, lost = (choose_bases(scored(), ChooseConfig(by="index", indices=[i]))[0] for i in (2, 1, 5))
    refusal.trial_share, other.trial_share, lost.trial_share = 0.75, 1.0, 0.25
    assert [c.index for c in ranked_trials([refusal, other, lost])] == [2, 1, 5]
    refusal.by = "faithful"
    refusal.trials = [{"index": c.index, "label": c.label, "share": c.trial_share} for c in (refusal, other, lost)]
    why = refusal.reason()  # the winner's share is not the largest: the reason says why it still wins
    assert "kept its label most often" not in why and "kept a behaviour most often" in why
    assert f"#2 {refusal.label} 75%, #1 {other.label} 100%" in why
    refusal.trial_share = 0.25
    assert [c.index for c in ranked_trials([refusal, other, lost])] == [1, 2, 5]  # ties keep the clearer first
