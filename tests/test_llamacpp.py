"""The in-process llama.cpp backend with the real SmolLM2 model, through the real gateway.

Greedy decoding makes the text a function of the prompt, so "each stream got its own
correct text" is checked against the same prompt served alone, and the gateway's
reply against a direct ``llama_cpp.Llama`` call with the same settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import astuple
from typing import Any

import httpx
import openai
import pytest

from gateway.config import parse_config
from tests.conftest import run_gateway, smollm2_gguf, wait_ready

pytest.importorskip("llama_cpp")

PROMPTS = [
    "Name three colors.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Count from one to five.",
    "Give me a word that rhymes with cat.",
    "What do bees make?",
    "Say hello in Spanish.",
    "Name a planet.",
]


def _config(**local: Any) -> dict[str, Any]:
    return {
        "backends": {
            "local": {
                "kind": "llamacpp",
                "n_ctx": 2048,
                "parallel": 8,
                "n_threads": 2,
                "flash_attn": "on",
                **local,
            }
        },
        "models": {"smollm2": {"targets": ["local"]}},
    }


@pytest.fixture(scope="module")
def gateway() -> Iterator[str]:
    with run_gateway(_config()) as url:
        wait_ready(url)
        yield url


def _alone(client: openai.OpenAI, prompt: str, max_tokens: int = 24) -> str:
    reply = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return reply.choices[0].message.content or ""


def test_greedy_reply_equals_a_direct_llama_call(client: openai.OpenAI) -> None:
    from llama_cpp import Llama

    llm = Llama(model_path=smollm2_gguf(), n_ctx=256, n_threads=2, flash_attn=True, verbose=False)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": PROMPTS[0]}]
    want = llm.create_chat_completion(messages=messages, max_tokens=24, temperature=0)  # type: ignore[arg-type]
    got = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    assert got.choices[0].message.content == want["choices"][0]["message"]["content"]  # type: ignore[index]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]  # type: ignore[index]
    assert got.usage is not None
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]  # type: ignore[index]
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]  # type: ignore[index]

    text = llm.create_completion("The sky is", max_tokens=8, temperature=0)
    got_text = client.completions.create(model="smollm2", prompt="The sky is", max_tokens=8, temperature=0)
    assert got_text.choices[0].text == text["choices"][0]["text"]  # type: ignore[index]


def test_stream_matches_non_stream_with_usage(client: openai.OpenAI) -> None:
    want = _alone(client, PROMPTS[1])
    text, finish, usage, roles = "", None, None, []
    for event in client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": PROMPTS[1]}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if event.choices:
            text += event.choices[0].delta.content or ""
            roles.append(event.choices[0].delta.role)
            finish = event.choices[0].finish_reason or finish
        if event.usage:
            usage = event.usage
    assert text == want
    assert roles[0] == "assistant"
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 24 and usage.prompt_tokens > 0


async def test_eight_concurrent_streams_get_their_own_text(gateway: str, client: openai.OpenAI) -> None:
    expected = {p: _alone(client, p) for p in PROMPTS}
    assert len(set(expected.values())) > 4  # distinct prompts give distinct replies, or the test is blind
    aclient = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)

    async def one(prompt: str) -> str:
        text = ""
        async for event in await aclient.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=24,
            temperature=0,
            stream=True,
        ):
            if event.choices:
                text += event.choices[0].delta.content or ""
        return text

    got = await asyncio.gather(*(one(p) for p in PROMPTS))
    await aclient.close()
    assert dict(zip(PROMPTS, got, strict=True)) == expected


async def test_greedy_and_seeded_streams_sampled_in_the_same_steps_keep_their_own_text(
    gateway: str, client: openai.OpenAI
) -> None:
    """Every step samples all sequences from one logits matrix: each row must go to its own
    request, greedy ones batched together and seeded ones drawn on their own."""

    def settings(i: int) -> dict[str, Any]:
        if i % 2:
            return {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i}
        return {"temperature": 0}

    def request(i: int) -> dict[str, Any]:
        return {
            "model": "smollm2",
            "messages": [{"role": "user", "content": PROMPTS[i]}],
            "max_tokens": 24,
            **settings(i),
        }

    expected = [
        client.chat.completions.create(**request(i)).choices[0].message.content for i in range(len(PROMPTS))
    ]
    aclient = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)

    async def one(i: int) -> str:
        text = ""
        async for event in await aclient.chat.completions.create(**request(i), stream=True):
            if event.choices:
                text += event.choices[0].delta.content or ""
        return text

    got = await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))
    await aclient.close()
    assert got == expected
    assert len(set(expected)) > 4


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Tell me a story."}],
            max_tokens=16,
            temperature=1.0,
            top_p=0.95,
            seed=seed,
        )
        return reply.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_stop_sequence_ends_with_stop(client: openai.OpenAI) -> None:
    prompt = "Count from one to ten, separated by commas."
    full = _alone(client, prompt, max_tokens=32)
    assert "," in full, full
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=32,
        temperature=0,
        stop=[","],
    )
    assert reply.choices[0].message.content == full.split(",")[0]
    assert reply.choices[0].finish_reason == "stop"


def test_over_long_prompt_is_a_400_with_the_numbers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "word " * 400}])
    body = err.value.body
    assert isinstance(body, dict)
    assert body["code"] == "context_length_exceeded"
    assert body["param"] == "messages"
    assert "256 tokens per request" in body["message"]  # 2048 cells / 8 sequences


def test_max_tokens_beyond_the_room_left_is_clamped(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="smollm2", prompt="word " * 200, max_tokens=500, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 256


def test_embeddings_and_unsupported_options_are_clear_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="smollm2", input="hello")
    assert "embeddings" in str(err.value.body)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], n=2)
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "n"


#: a text completion that counts on and on: it does not stop before max_tokens
_LONG = {
    "model": "smollm2",
    "prompt": "1, 2, 3, 4, 5, 6, 7, 8,",
    "max_tokens": 900,
    "temperature": 0,
    "stream": True,
}


def _stream_some(url: str, max_tokens: int, chunks: int) -> float:
    """Open a stream, read ``chunks`` SSE events, hang up; returns when the hang-up happened."""
    with httpx.stream(
        "POST", url + "/v1/completions", json={**_LONG, "max_tokens": max_tokens}, timeout=30
    ) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen += 1
                if seen >= chunks:
                    break
    return time.monotonic()


def test_queue_overflow_is_503_with_retry_after() -> None:
    with run_gateway(_config(parallel=1, max_queue=0, n_ctx=1024)) as url:
        wait_ready(url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        # One sequence, no queue: while a stream holds the sequence, the next request is refused.
        with httpx.stream("POST", url + "/v1/completions", json=_LONG, timeout=30) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # kept: a discarded iterator closes the response when collected
            assert next(lines).startswith("data: ")
            with pytest.raises(openai.APIStatusError) as busy:
                client.chat.completions.create(
                    model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
            assert busy.value.status_code == 503
            assert busy.value.response.headers["retry-after"] == "1"
            assert busy.value.body["code"] == "backend_overloaded"  # type: ignore[index]


def test_a_client_that_hangs_up_frees_its_sequence_at_once() -> None:
    with run_gateway(_config(parallel=1, max_queue=4, n_ctx=1024)) as url:
        wait_ready(url)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        hung_up = _stream_some(url, max_tokens=900, chunks=3)
        reply = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
        )
        assert reply.choices[0].message.content
        # With one sequence, this request waits for the old one unless the hang-up freed it:
        # 900 tokens take several seconds here, a 4-token reply a fraction of one.
        assert time.monotonic() - hung_up < 1.5


def test_a_bad_model_path_fails_start_up_naming_the_file(tmp_path: Any) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    from backends.llamacpp import LlamaCppBackend, ModelLoadError

    loaded = parse_config(_config(model_path=str(bad)), "<test>")
    backend = LlamaCppBackend("local", loaded.backends["local"])  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match=r"not-a-model\.gguf"):
        asyncio.run(backend.start())
    missing = LlamaCppBackend(
        "local", parse_config(_config(model_path=str(tmp_path / "nope.gguf")), "<test>").backends["local"]
    )  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match=r"nope\.gguf"):
        asyncio.run(missing.start())


def test_readiness_waits_for_the_model() -> None:
    from backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend("local", parse_config(_config(), "<test>").backends["local"])  # type: ignore[arg-type]

    async def lifecycle() -> list[tuple[bool, str]]:
        seen = [astuple(await backend.health())]
        await backend.start()
        seen.append(astuple(await backend.health()))
        await backend.close()
        seen.append(astuple(await backend.health()))
        return seen

    before, loaded, closed = asyncio.run(lifecycle())
    assert before == (False, "not started", False)
    assert loaded == (True, "", False)
    assert closed[0] is False


def test_a_prompt_far_too_long_is_refused_before_tokenizing_and_a_long_one_off_the_loop() -> None:
    """A 4 MB body would hold the event loop ~0.7 s in the tokenizer: one that cannot fit is
    refused on its length alone, and a long one is tokenized in a worker thread."""
    import threading

    from backends.base import BackendRequest
    from backends.errors import ContextLengthExceeded
    from backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend("local", parse_config(_config(), "<test>").backends["local"])  # type: ignore[arg-type]
    huge = "The quick brown fox jumps over the lazy dog. " * 25_000  # 1.1 MB
    long = "The quick brown fox jumps over the lazy dog. " * 400  # 18 KB: ~4,000 tokens
    threads: list[str] = []

    async def run() -> list[str]:
        await backend.start()
        model = backend._engine.model  # type: ignore[union-attr]
        tokenize = model.tokenize

        def watched(text: str, **kw: Any) -> list[int]:
            threads.append(threading.current_thread().name)
            assert len(text) < len(huge), "the huge prompt was tokenized"
            return tokenize(text, **kw)

        model.tokenize = watched  # type: ignore[method-assign]
        messages = []
        try:
            for prompt in (huge, long):
                body = {"model": "smollm2", "prompt": prompt, "max_tokens": 4}
                with pytest.raises(ContextLengthExceeded) as caught:
                    await backend.complete(BackendRequest("completions", body, "r"))
                messages.append(str(caught.value))
        finally:
            await backend.close()
        return messages

    refused, counted = asyncio.run(run())
    assert "1,125,000 characters long: at least" in refused
    assert "resulted in" in counted and "tokens" in counted
    assert len(threads) == 1 and threads[0] != threading.main_thread().name


# ---- prefix reuse: a free sequence keeps its KV cells for the next prompt ------------------

SYSTEM = "You are a helpful assistant. Answer in one short sentence."


def _chat(client: openai.OpenAI, messages: list[dict[str, str]]) -> str:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        max_tokens=24,  # type: ignore[arg-type]
        temperature=0,
    )
    return reply.choices[0].message.content or ""


def test_a_reused_prefix_does_not_change_the_greedy_reply(client: openai.OpenAI) -> None:
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[2]}]
    second = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPTS[5]}]
    reply = _chat(client, first)
    turn = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": PROMPTS[6]}]
    # On the module's gateway these reuse the system prompt, a whole prompt but its last token,
    # and a previous turn with its reply.
    got = [_chat(client, second), _chat(client, second), _chat(client, turn)]
    want = []
    for messages in (second, turn):  # each in a gateway that has seen nothing else
        with run_gateway(_config()) as url:
            wait_ready(url)
            want.append(_chat(openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0), messages))
    assert got == [want[0], want[0], want[1]]


def _engine(**kw: Any) -> Any:
    from backends.llamacpp.engine import Engine
    from backends.llamacpp.model import Model

    return Engine(
        Model(smollm2_gguf(), n_gpu_layers=0),
        **{
            "n_ctx": 1024,
            "n_threads": 2,
            "n_batch": 16,
            "parallel": 2,
            "max_queue": 4,
            "flash_attn": "on",
            **kw,
        },
    )


def _run(engine: Any, tokens: list[int], max_tokens: int = 16, cancel_after: int = 0) -> tuple[str, Any]:
    """Greedy reply to ``tokens`` and its Job; ``cancel_after``: hang up after that many deltas."""
    from backends.llamacpp.engine import Finished, Sampling

    async def go() -> tuple[str, Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        job = engine.submit(tokens, Sampling(temperature=0, max_tokens=max_tokens), queue)
        text, seen = "", 0
        while True:
            event = await queue.get()
            if type(event) is not str:
                assert isinstance(event, Finished), event
                return text, job
            text += event
            seen += 1
            if seen == cancel_after:
                engine.cancel(job)
                return text, job

    text, job = asyncio.run(go())
    while job.seq >= 0:  # a cancelled job is released before the engine's next step
        time.sleep(0.001)
    return text, job


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_the_engine_reuses_a_shared_prefix_and_counts_it() -> None:
    engine = _engine()
    fresh = _engine()
    try:

        def chat(user: str, reply: str = "") -> list[int]:
            text = (
                f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                f"<|im_start|>assistant\n{reply}"
            )
            return list(engine.model.tokenize(text, add_special=False))

        a, b = chat(PROMPTS[1]), chat(PROMPTS[3])
        _, job = _run(engine, a)
        assert job.reused == 0 and engine.reused_tokens == 0
        text_b, job = _run(engine, b)
        assert job.reused == _common(a, b) >= 15 and engine.reused_tokens == job.reused
        _, job = _run(engine, b)  # the same prompt again: all but its last token
        assert job.reused == len(b) - 1
        unrelated = list(engine.model.tokenize("The sky is", add_special=True))
        _, job = _run(engine, unrelated)
        assert job.reused == 0

        # A reply cut by max_tokens: its last sampled token never went through the model, so a
        # prompt continuing the conversation reuses the prompt and all the reply but that token.
        reply, job = _run(engine, b, max_tokens=12)
        assert len(job.generated) == 12
        turn = chat(PROMPTS[3], reply)
        kept = b + job.generated[:-1]
        text_turn, job2 = _run(engine, turn)
        assert job2.reused == min(_common(kept, turn), len(turn) - 1)
        assert job2.reused >= len(b) + 6  # the reply re-tokenizes (mostly) as generated
        assert text_turn == _run(fresh, turn)[0]
        assert text_b == _run(fresh, b)[0]
        fresh.close()
        fresh = _engine()

        # Cancelled mid-reply: the KV holds the prompt and the tokens decoded so far, no more.
        long_prompt = chat("Write a long story about a dragon and a knight.")
        _, job = _run(engine, long_prompt, max_tokens=40, cancel_after=5)
        kept = long_prompt + job.generated[: job.pos - len(long_prompt)]
        assert len(long_prompt) < len(kept) < len(long_prompt) + len(job.generated)
        again = long_prompt + job.generated
        text, job2 = _run(engine, again)
        assert job2.reused == len(kept)
        assert text == _run(fresh, again)[0]
    finally:
        engine.close()
        fresh.close()


@pytest.mark.parametrize("kv_unified", [False, True], ids=["kv-streams", "kv-unified"])
def test_a_prefix_another_sequence_holds_is_copied_not_prefilled(kv_unified: bool) -> None:
    from backends.llamacpp.engine import Finished, Sampling

    engine = _engine(kv_unified=kv_unified)
    fresh = _engine(kv_unified=kv_unified)
    try:

        def chat(user: str) -> list[int]:
            text = (
                f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
                "<|im_start|>assistant\n"
            )
            return list(engine.model.tokenize(text, add_special=False))

        a, b = chat(PROMPTS[1]), chat(PROMPTS[3])

        async def b_while_a_runs() -> tuple[str, Any]:
            # a holds the only sequence with the system prompt while b arrives: b gets the other,
            # empty one, and its prefix is copied from a's cells
            queue_a: asyncio.Queue[Any] = asyncio.Queue()
            assert engine.submit(a, Sampling(temperature=0, max_tokens=40), queue_a) is not None
            await queue_a.get()
            queue_b: asyncio.Queue[Any] = asyncio.Queue()
            job = engine.submit(b, Sampling(temperature=0, max_tokens=16), queue_b)
            text = ""
            while type(event := await queue_b.get()) is str:
                text += event
            assert isinstance(event, Finished)
            while not isinstance(await queue_a.get(), Finished):
                pass
            return text, job

        text_b, job = asyncio.run(b_while_a_runs())
        assert job.reused == _common(a, b) >= 15
        assert engine.copied_tokens == job.reused
        if not kv_unified:  # one stream per sequence: numerics do not depend on the neighbours
            assert text_b == _run(fresh, b)[0]
        else:
            assert text_b
    finally:
        engine.close()
        fresh.close()


@pytest.mark.parametrize("wait_ms", [0, 5000])
def test_a_follow_up_sent_as_a_reply_ends_is_read_in_the_next_step(wait_ms: int) -> None:
    from backends.llamacpp.engine import Finished, Sampling

    engine = _engine(follow_up_wait_ms=wait_ms)
    try:

        def prompt(user: str) -> list[int]:
            text = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            return list(engine.model.tokenize(text, add_special=False))

        async def scenario() -> tuple[int, int, float]:
            # a long reply keeps the engine stepping while a short one ends and its client,
            # 0.2 s later (a slow round trip), sends the next request
            long_q: asyncio.Queue[Any] = asyncio.Queue()
            long_job = engine.submit(prompt(PROMPTS[1]), Sampling(temperature=0, max_tokens=200), long_q)
            await long_q.get()
            short_q: asyncio.Queue[Any] = asyncio.Queue()
            engine.submit(prompt(PROMPTS[2]), Sampling(temperature=0, max_tokens=4), short_q)
            while not isinstance(await short_q.get(), Finished):
                pass
            ended_at = engine.steps
            await asyncio.sleep(0.2)
            sent_at = engine.steps
            t0 = time.monotonic()
            next_q: asyncio.Queue[Any] = asyncio.Queue()
            engine.submit(prompt(PROMPTS[3]), Sampling(temperature=0, max_tokens=2), next_q)
            assert type(await next_q.get()) is str
            first_token_s = time.monotonic() - t0
            engine.cancel(long_job)
            return ended_at, sent_at, first_token_s

        ended_at, sent_at, first_token_s = asyncio.run(scenario())
        if wait_ms:
            # the engine held the step after the reply ended, and the arrival ended the wait
            assert sent_at == ended_at
            assert first_token_s < wait_ms / 1000 / 2
        else:
            assert sent_at > ended_at  # the long reply went on without it
    finally:
        engine.close()
