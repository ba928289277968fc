"""`onevision.pipeline("image-text-to-text", model=...)` against transformers' own pipeline on the same tiny
checkpoint (built by transformers' save_pretrained): every call form and option gives the same records.

    pytest tests/test_pipeline.py -q
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _processing_helpers import MEDIA, photo

import onevision

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def pipes(tiny_ckpt):
    import transformers

    ours = onevision.pipeline("image-text-to-text", model=str(tiny_ckpt), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.pipeline("image-text-to-text", model=str(tiny_ckpt), dtype=torch.float32)
    return ours, theirs


def both(pipes, *args, **kwargs):
    """(ours, theirs) for the same call; chats are built anew for each side so that a pipeline that mutates its
    input can't hide it."""
    ours, theirs = pipes
    fresh = [a() if callable(a) else a for a in args], {k: v() if callable(v) else v for k, v in kwargs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs(*[a() if callable(a) else a for a in args],
                      **{k: v() if callable(v) else v for k, v in kwargs.items()})
    return ours(*fresh[0], **fresh[1]), want


def chat(*, prefill: str | None = None, question: str = "What is in the picture?"):
    def make():
        messages = [{"role": "user", "content": [{"type": "image", "image": photo("cat.jpg")},
                                                 {"type": "text", "text": question}]}]
        if prefill is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": prefill}]})
        return messages
    return make


def test_image_and_prompt(pipes):
    path = str(MEDIA / "cat.jpg")  # a path, as users pass it; both load it themselves
    got, want = both(pipes, images=path, text="<image>What is this?", max_new_tokens=6)
    assert got == want and got[0]["generated_text"].startswith("<image>What is this?")
    got, want = both(pipes, images=photo("rocket.jpg"), text="<image>Describe.", max_new_tokens=6,
                     return_full_text=False)
    assert got == want and len(got) == 1 and got[0]["generated_text"]


def test_chat_form_and_batch_of_chats(pipes):
    got, want = both(pipes, text=chat(), max_new_tokens=7)
    assert got == want
    assert got[0]["generated_text"][-1]["role"] == "assistant" and len(got[0]["generated_text"]) == 2
    got, want = both(pipes, chat(), max_new_tokens=5, return_full_text=False)  # the chat as first argument
    assert got == want
    batch = lambda: [chat()(), chat(question="And the colours?")()]  # noqa: E731
    got, want = both(pipes, text=batch, max_new_tokens=5)
    assert got == want and len(got) == 2 and all(len(g) == 1 for g in got)


def test_prefilled_assistant_message_is_continued(pipes):
    got, want = both(pipes, text=chat(prefill="It is a"), max_new_tokens=5)
    assert got == want
    assert got[0]["generated_text"][-1]["content"][0]["text"].startswith("It is a")


def test_batch_of_prompts_with_images(pipes):
    """One padded batch: transformers pads on the right by default (and warns that generation is then wrong);
    onevision pads on the left, which is what the reference gives when asked for it."""
    images = lambda: [photo("cat.jpg"), photo("coffee.jpg"), photo("rocket.jpg")]  # noqa: E731
    texts = ["<image>What?", "<image>Describe this picture in detail.", "<image>Hm"]
    ours, theirs = pipes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs(images=images(), text=texts, max_new_tokens=6, padding_side="left")
    got = ours(images=images(), text=texts, max_new_tokens=6)
    assert got == want and len(got) == 3
    alone = [ours(images=[image], text=[t], max_new_tokens=6)[0] for image, t in zip(images(), texts, strict=True)]
    assert got == alone


def test_batch_size_gives_each_input_its_own_answer(pipes):
    """batch_size runs a list of inputs in left-padded batches; each gets transformers' answer to it alone
    (transformers' own batch_size pads on the right and generates from the padding, so it is not the oracle)."""
    chats = lambda: [chat()(), chat(question="And the colours?")(), chat(prefill="It is")()]  # noqa: E731
    ours, theirs = pipes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs(text=chats(), max_new_tokens=5)
        want_text = theirs(text=["Hello", "Tell me a story", "Hm"], max_new_tokens=4)
    assert ours(text=chats(), max_new_tokens=5, batch_size=2) == want
    assert ours(text=chats()[:2], max_new_tokens=5, batch_size=2) == want[:2]
    assert ours(text=["Hello", "Tell me a story", "Hm"], max_new_tokens=4, batch_size=3) == want_text
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ours(text=["Hello"], batch_size=0)


def test_text_only_and_generate_kwargs(pipes):
    got, want = both(pipes, text=["Hello", "Tell me a story"], generate_kwargs={"max_new_tokens": 4})
    assert got == want and len(got) == 2
    got, want = both(pipes, text="Hello", max_new_tokens=8, stop_sequence="e")
    assert got == want
    got, want = both(pipes, text="Hello", max_new_tokens=5, return_tensors=True)
    assert torch.equal(got[0]["generated_token_ids"], want[0]["generated_token_ids"])
    with pytest.raises(ValueError, match="defined twice"):
        pipes[0](text="Hello", max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})


def test_default_length_and_settings_given_to_pipeline(tiny_ckpt, pipes, our_model):
    """No length given: transformers' pipeline default (256 new tokens, or up to EOS); settings passed to
    pipeline(...) apply to every call; a loaded model finds its processor by its folder."""
    import transformers

    from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

    default = ImageTextToTextPipeline._default_generation_config.max_new_tokens  # 256; generating it twice is slow
    got = pipes[0](text="Once upon a time", return_tensors=True)[0]["generated_token_ids"]
    prompt = len(pipes[0].tokenizer("Once upon a time")["input_ids"])
    assert pipes[0].tokenizer.eos_token_id not in got.tolist() and len(got) == prompt + default
    ours = onevision.pipeline("image-text-to-text", model=our_model, max_new_tokens=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.pipeline("image-text-to-text", model=str(tiny_ckpt), dtype=torch.float32,
                                       max_new_tokens=3)
        want = theirs(text=chat()())
    assert ours(text=chat()()) == want


def test_errors_say_what_to_do(pipes, tiny_ckpt):
    with pytest.raises(ValueError, match="Images must be placed inside the chat"):
        pipes[0](images=photo("cat.jpg"), text=chat()())
    with pytest.raises(ValueError, match="must have a 'role' and 'content'"):
        pipes[0](text=[{"text": "hi"}])
    with pytest.raises(ValueError, match=r"\['do_sample'\] are generation.*generate_kwargs=\{'do_sample': True\}"):
        pipes[0](text="Hello", do_sample=True)  # transformers' pipeline would pass it to the processor and ignore it
    with pytest.raises(ValueError, match="provide text"):
        pipes[0](images=photo("cat.jpg"))
    with pytest.raises(ValueError, match="only the 'image-text-to-text' task"):
        onevision.pipeline("text-generation", model=str(tiny_ckpt))
    with pytest.raises(ValueError, match="needs model="):
        onevision.pipeline("image-text-to-text")


def test_readme_pipeline_snippet_as_written(tiny_ckpt, pipes, monkeypatch, capsys):
    """The README's pipeline snippet, run as written (only the hub id swapped for the tiny folder, offline): what
    it prints equals transformers' pipeline answers to the same calls."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    section = (root / "README.md").read_text(encoding="utf-8").split("### The `image-text-to-text` pipeline\n")[1]
    snippet = re.search(r"```python\n(.+?)```", section, re.S).group(1)
    assert "llava-hf/llava-onevision-qwen2-0.5b-ov-hf" in snippet
    monkeypatch.chdir(root)
    exec(snippet.replace("llava-hf/llava-onevision-qwen2-0.5b-ov-hf", str(tiny_ckpt)), {})
    printed = capsys.readouterr().out
    theirs = pipes[1]
    messages = [{"role": "user", "content": [{"type": "image", "path": "examples/cat.jpg"},
                                             {"type": "text", "text": "What is shown in this image?"}]}]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = theirs(text=messages, max_new_tokens=30)[0]["generated_text"][-1]["content"]
        second = theirs(images="examples/cat.jpg", text="<image>Describe it.", max_new_tokens=30,
                        return_full_text=False)[0]["generated_text"]
    assert printed == f"{first}\n{second}\n"
