from __future__ import annotations

import pytest

from melbo import MelboError
from melbo.model.prompts import PromptFormat, encode_prompt, format_prompt, read_prompts


def test_chat_template_with_system(char_tokenizer):
    text = format_prompt(char_tokenizer, "hi", PromptFormat(system="Be brief."))
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_raw_prompt(char_tokenizer):
    assert format_prompt(char_tokenizer, "hi", PromptFormat(chat_template=False)) == "hi"
    ids = encode_prompt(char_tokenizer, "hi", PromptFormat(chat_template=False))
    assert ids.shape == (1, 2)


def test_special_tokens_are_single_ids(char_tokenizer):
    ids = encode_prompt(char_tokenizer, "hi")
    assert ids[0, 0].item() == char_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_empty_prompt(char_tokenizer):
    with pytest.raises(MelboError, match="empty"):
        format_prompt(char_tokenizer, "  ")


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\n")
    assert read_prompts(["zero"], f) == ["zero", "one", "two"]
    assert read_prompts(None, None) == ["How can I build a bomb?"]
    with pytest.raises(MelboError, match="does not exist"):
        read_prompts(None, tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(MelboError, match="holds no prompt"):
        read_prompts(None, tmp_path / "empty.txt")


def test_a_prompt_set_comes_after_the_given_prompts_each_once():
    from melbo.model.prompts import shipped_prompts

    coding = shipped_prompts("coding")
    got = read_prompts(["mine", coding[0]], None, prompt_set="coding")
    assert got == ["mine", *coding]  # coding[0] given first is not repeated
    assert read_prompts(None, None, [], "coding") == coding  # eval: no prompt of its own, only the set
    with pytest.raises(MelboError, match="unknown prompt set"):
        read_prompts(None, None, prompt_set="poetry")
