"""What a request asks for (SamplingParams) and what it gets back (RequestOutput), in vLLM's conventions."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """Per-request decoding settings. temperature < 1e-5 means greedy (like vLLM); top_k 0 or -1 means off."""

    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (isinstance(self.n, int) and self.n >= 1, "n must be an integer >= 1"),
            (self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
             "max_tokens must be an integer >= 1 (or None for the rest of the context)"),
            (isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens must be an integer >= 0"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens must be <= max_tokens"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0 (0 or -1: off)"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                name = message.split()[0]
                raise ValueError(f"{message}; got {name}={getattr(self, name)!r}")
        if self.n > 1 and self.greedy:
            raise ValueError(f"n={self.n} with greedy decoding (temperature {self.temperature}) would return the "
                             "same sequence n times; set temperature > 0 to sample")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def generation_defaults(gen) -> dict:
    """What a checkpoint's generation config (generation/config.py GenerationConfig) asks of a request that does not
    say, as transformers' generate() reads it: whether to sample (do_sample), and the temperature, top-k (50 unless
    set), top-p, min-p, repetition penalty and max_new_tokens it samples with. The server merges requests over it;
    LLM without sampling params runs it as is."""
    return {"sample": bool(getattr(gen, "do_sample", False)), "temperature": gen.temperature, "top_p": gen.top_p,
            "top_k": gen.top_k or 0, "min_p": gen.min_p or 0.0, "repetition_penalty": gen.repetition_penalty,
            "max_tokens": gen.max_new_tokens}


def default_sampling_params(gen) -> SamplingParams:
    """SamplingParams for a request that sets nothing (vLLM's LLM.get_default_sampling_params, which likewise reads
    the checkpoint's generation_config.json): greedy unless the config samples; max_tokens 16 (vLLM's default)
    unless it sets max_new_tokens."""
    d = generation_defaults(gen)
    common = {"repetition_penalty": d["repetition_penalty"], "max_tokens": d["max_tokens"] or 16}
    if not d["sample"]:
        return SamplingParams(temperature=0.0, **common)
    return SamplingParams(temperature=d["temperature"], top_p=d["top_p"], top_k=d["top_k"], min_p=d["min_p"],
                          **common)


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it, None for eos
    delta: str = ""  # text released by the latest step (for streaming)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival, first_token, finished (time.monotonic seconds)


__all__ = ["CompletionOutput", "RequestOutput", "SamplingParams", "default_sampling_params",
           "generation_defaults"]
