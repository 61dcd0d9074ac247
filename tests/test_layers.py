"""Hooks add and capture the right tensors, stop at t, skip up to s, and always remove themselves."""

from __future__ import annotations

import pytest
import torch

from melbo import MelboError, add_to_residual, capture_residual, find_blocks, residual_after, start_after, stop_after
from melbo.model.layers import n_layers

IDS = torch.tensor([[5, 17, 42, 9, 33, 61, 7]])


def hook_count(model) -> int:
    """melbo's hooks still registered (transformers keeps hooks of its own, which are not counted)."""
    return sum(
        getattr(fn, "__module__", "") == "melbo.model.layers"
        for block in find_blocks(model)
        for fn in [*block._forward_hooks.values(), *block._forward_pre_hooks.values()]
    )


def test_finds_all_blocks(tiny):
    assert n_layers(tiny) == 6


def test_unknown_architecture_names_the_class():
    class Weird(torch.nn.Module):
        pass

    with pytest.raises(MelboError, match="Weird"):
        find_blocks(Weird())


def test_capture_matches_hidden_states(tiny):
    """Layer L is hidden_states[L + 1] (the last entry is normed, so it is not compared)."""
    with torch.no_grad():
        reference = tiny(IDS, output_hidden_states=True).hidden_states
        with capture_residual(tiny, range(5)) as seen:
            tiny(IDS)
    for layer in range(5):
        torch.testing.assert_close(seen[layer], reference[layer + 1])
    assert hook_count(tiny) == 0


def test_add_shifts_residual_by_vector(tiny):
    d = tiny.get_input_embeddings().weight.shape[1]
    vec = torch.randn(d)
    with torch.no_grad():
        plain = residual_after(tiny, 2, IDS)
        steered = residual_after(tiny, 2, IDS, steer=(2, vec))
        later_plain = residual_after(tiny, 4, IDS)
        later = residual_after(tiny, 4, IDS, steer=(2, vec))
    torch.testing.assert_close(steered - plain, vec.expand_as(plain))
    assert not torch.allclose(later, later_plain)  # the change propagates downstream
    assert hook_count(tiny) == 0


def test_stop_after_never_runs_later_blocks(tiny):
    blocks = find_blocks(tiny)
    ran: list[int] = []
    handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad(), stop_after(tiny, 2):
            tiny(IDS)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0, 1, 2]
    assert hook_count(tiny) == 0


def test_batch_rows_get_their_own_vectors(tiny):
    d = tiny.get_input_embeddings().weight.shape[1]
    vecs = torch.randn(3, d)
    ids = IDS.expand(3, -1)
    with torch.no_grad():
        batched = residual_after(tiny, 4, ids, steer=(1, vecs))
        for row in range(3):
            alone = residual_after(tiny, 4, IDS, steer=(1, vecs[row]))
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_hooks_removed_on_exception(tiny):
    d = tiny.get_input_embeddings().weight.shape[1]
    with pytest.raises(RuntimeError, match="boom"):
        with add_to_residual(tiny, 1, torch.zeros(d)), capture_residual(tiny, 3), stop_after(tiny, 4):
            raise RuntimeError("boom")
    assert hook_count(tiny) == 0


def test_wrong_batch_of_vectors_is_a_clear_error(tiny):
    d = tiny.get_input_embeddings().weight.shape[1]
    with pytest.raises(MelboError, match="one per row"), torch.no_grad():
        residual_after(tiny, 3, IDS.expand(2, -1), steer=(1, torch.zeros(3, d)))
    assert hook_count(tiny) == 0


def test_a_vector_of_another_width_is_a_clear_error(tiny):
    d = tiny.get_input_embeddings().weight.shape[1]
    with pytest.raises(MelboError, match=f"width {d + 1} for a residual stream of width {d}"), torch.no_grad():
        residual_after(tiny, 3, IDS, steer=(1, torch.zeros(d + 1)))
    assert hook_count(tiny) == 0


def test_layer_out_of_range(tiny):
    with pytest.raises(MelboError, match="layers 0 to 5"):
        residual_after(tiny, 6, IDS)


def test_start_after_reproduces_full_pass(tiny):
    """Feeding the cached residual after s (+ a vector) gives the same later residual as the full pass."""
    d = tiny.get_input_embeddings().weight.shape[1]
    vec = torch.randn(2, d)
    ids = IDS.expand(2, -1)
    with torch.no_grad():
        full = residual_after(tiny, 4, ids, steer=(1, vec))
        cached = residual_after(tiny, 1, IDS)
        blocks = find_blocks(tiny)
        ran: list[int] = []
        handles = [b.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, b in enumerate(blocks)]
        try:
            with start_after(tiny, 1, cached + vec[:, None, :]):
                skipped = residual_after(tiny, 4, ids)
        finally:
            for h in handles:
                h.remove()
    torch.testing.assert_close(skipped, full, atol=1e-5, rtol=1e-5)
    assert all("forward" not in b.__dict__ for b in blocks)  # the original forwards are back
    assert hook_count(tiny) == 0


def test_gradient_flows_to_vector(tiny):
    d = tiny.get_input_embeddings().weight.shape[1]
    theta = torch.randn(d, requires_grad=True)
    out = residual_after(tiny, 4, IDS, steer=(1, theta))
    out.pow(2).sum().backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


def test_generation_sees_vector_at_new_positions(tiny, char_tokenizer):
    """With a KV cache, each new token's residual after s carries the vector too."""
    d = tiny.get_input_embeddings().weight.shape[1]
    vecs = torch.randn(2, d) * 5
    seen: list[torch.Tensor] = []
    plain: list[torch.Tensor] = []
    block = find_blocks(tiny)[2]
    handle = block.register_forward_hook(lambda m, a, o: plain.append((o[0] if isinstance(o, tuple) else o).clone()))
    try:
        with torch.no_grad():
            tiny.generate(IDS.expand(2, -1), max_new_tokens=3, do_sample=False, pad_token_id=0)
            out_plain = [p for p in plain]
            plain.clear()
            with add_to_residual(tiny, 2, vecs), capture_residual(tiny, 2) as cap:
                steered_out = tiny.generate(IDS.expand(2, -1), max_new_tokens=3, do_sample=False, pad_token_id=0)
                seen.append(cap[2])
    finally:
        handle.remove()
    # the last forward pass handled one new position per row, after the prompt
    last_new = seen[-1]
    assert last_new.shape[1] == 1
    assert steered_out.shape[1] == IDS.shape[1] + 3
    # the block output before the add (recorded by the earlier hook) plus the vector is what later layers see
    torch.testing.assert_close(last_new, plain[-1] + vecs[:, None, :])
    assert len(out_plain) >= 2
    assert hook_count(tiny) == 0


def test_a_generation_measures_the_first_token_and_a_continuation_from_its_own_prompt_pass(tiny, char_tokenizer):
    """The first-token logits a generation records, and the NLL of a continuation scored on the prompt's cache it kept,
    are what a separate pass over the prompt (and over prompt + continuation) gives, row by row, on every architecture."""
    from melbo.model.forward import PromptState, continuation_nll, generate_steered, last_token_logits, nll_after_prompt, steered_generation

    d = tiny.get_input_embeddings().weight.shape[1]
    torch.manual_seed(3)
    vecs = torch.randn(3, d) * 2
    made = steered_generation(tiny, char_tokenizer, IDS, vecs, 1, 6, keep_cache=True)
    assert made.texts == generate_steered(tiny, char_tokenizer, IDS, vecs, 1, 6)
    state = PromptState("x", IDS, residual_after(tiny, 1, IDS).float())
    torch.testing.assert_close(made.first_logits, last_token_logits(tiny, state, 1, vecs), rtol=1e-4, atol=1e-4)
    for target in (made.new_ids[0, :4], made.new_ids[0, :1]):
        full_ids = torch.cat([IDS, target[None]], dim=1)
        full = PromptState("x", full_ids, residual_after(tiny, 1, full_ids).float())
        expected = continuation_nll(tiny, full, 1, vecs, target.shape[0])
        torch.testing.assert_close(nll_after_prompt(tiny, made, vecs, 1, target), expected, rtol=1e-4, atol=1e-5)
    assert made.prompt_cache.get_seq_length() == IDS.shape[1]  # the prompt's cache again after each target
    assert hook_count(tiny) == 0 and not tiny._forward_hooks


def test_a_steered_generation_shares_the_blocks_before_the_vector_across_rows(tiny, char_tokenizer, monkeypatch):
    """Blocks 0 … s run once for every row (the vectors act after s) and the rest per row: the same completions and
    first-token logits as transformers' own generate with the vectors hooked in, on every architecture."""
    import melbo.model.forward as forward

    d = tiny.get_input_embeddings().weight.shape[1]
    torch.manual_seed(5)
    vecs = torch.randn(4, d) * 3
    shared: list[bool] = []
    real = forward._prefill_shared
    monkeypatch.setattr(forward, "_prefill_shared", lambda *a: shared.append(real(*a)) or shared[-1])
    made = forward.steered_generation(tiny, char_tokenizer, IDS, vecs, 2, 6)
    assert shared == [True] and made.prompt_cache is None  # the prefill's cache is not kept unless asked for
    with torch.no_grad(), add_to_residual(tiny, 2, vecs):
        plain = tiny.generate(IDS.expand(4, -1), attention_mask=torch.ones(4, IDS.shape[1], dtype=torch.long), max_new_tokens=6,
                              do_sample=False, temperature=None, top_k=None, top_p=None, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
    assert torch.equal(made.new_ids, plain.sequences[:, IDS.shape[1]:])
    torch.testing.assert_close(made.first_logits, plain.logits[0].float(), rtol=1e-4, atol=1e-4)
    assert hook_count(tiny) == 0 and not tiny._forward_hooks


def test_residual_norms_measure_the_share_of_a_few_massive_coordinates(tiny):
    """`melbo info`'s column for massive activations (Gemma 3 270M: 3 coordinates hold 96 % of ‖h‖² after layer 5, so
    its fluent R is 0.02× the norm, not SmolLM2's 0.2×): planted in one block's output, measured there; info says so
    when the source layer has them, and not otherwise."""
    from melbo.model.forward import residual_norms
    from melbo.output.tables import residual_norms as info_lines

    ids = torch.tensor([[3, 14, 15, 9, 26, 5]])
    plain = residual_norms(tiny, ids)
    assert all(0 < row.top_share < 0.9 for row in plain)
    boost = torch.zeros(tiny.config.hidden_size)
    boost[[1, 7, 20]] = 1e4  # three massive coordinates after block 2
    with add_to_residual(tiny, 2, boost):
        massive = residual_norms(tiny, ids)
    assert massive[2].top_share > 0.99 and massive[1].top_share == pytest.approx(plain[1].top_share)
    said = [str(line) for line in info_lines("tiny", {"class": "Tiny", "dtype": "float32"}, 4, 32, "cpu", 6, massive, (2, 3))]
    assert any("After layer 2, 3 coordinates hold 100% of the residual's squared norm (massive activations)" in line for line in said)
    said = [str(line) for line in info_lines("tiny", {"class": "Tiny", "dtype": "float32"}, 4, 32, "cpu", 6, plain, (2, 3))]
    assert not any("massive activations" in line for line in said)
