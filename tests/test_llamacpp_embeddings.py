"""``/v1/embeddings`` from an embedding GGUF in process, through the real gateway.

The model is tests/tiny_gguf.py's BERT, written at test time; every vector is checked
against llama-cpp-python's own ``Llama(embedding=True).embed(..., normalize=True)`` on the
same file.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import orjson
import pytest

from backends.errors import ContextLengthExceeded
from tests.conftest import run_gateway, wait_ready
from tests.tiny_gguf import write_tiny_bert

TEXTS = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9 w10", "w1 w2 w3 w4", "hello there", "w11"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("gguf") / "tiny-bert.gguf")


@pytest.fixture(scope="module")
def reference(tiny_bert: Path) -> Any:
    from llama_cpp import Llama

    # the same attention kernels as the backend's context ("auto" picks flash attention on a CPU)
    return Llama(
        model_path=str(tiny_bert), embedding=True, n_batch=128, n_ubatch=128, flash_attn=True, verbose=False
    )


def want(reference: Any, texts: list[str]) -> np.ndarray:
    return np.array(reference.embed(texts, normalize=True), dtype=np.float32)


@pytest.fixture(scope="module")
def gateway(tiny_bert: Path) -> Iterator[str]:
    config = {
        "backends": {
            "embed": {
                "kind": "llamacpp",
                "model_path": str(tiny_bert),
                "parallel": 4,
                "n_batch": 64,
                "max_queue": 2,
                "n_threads": 2,
            },
        },
        "models": {"tiny-embed": {"targets": ["embed"]}},
    }
    with run_gateway(config) as url:
        wait_ready(url)
        yield url


def test_the_sdk_gets_the_vectors_llama_cpp_gives(client: openai.OpenAI, reference: Any) -> None:
    # The SDK asks for base64 unless told otherwise, and decodes it.
    reply = client.embeddings.create(model="tiny-embed", input=TEXTS)
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert [d.index for d in reply.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(got, want(reference, TEXTS), atol=1e-5)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in got}) == len(TEXTS)  # distinct inputs, distinct vectors
    tokens = sum(len(reference.tokenize(t.encode())) for t in TEXTS)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == tokens
    assert reply.model == "tiny-embed"


def test_many_inputs_in_order_and_a_large_request_tokenized_off_the_loop(
    client: openai.OpenAI, reference: Any
) -> None:
    # 300 inputs, 20 KB of text in all: tokenized in a worker thread, 75 decodes of 4
    texts = [" ".join(f"w{(i * 7 + k * k) % 59}" for k in range(16 + i % 5)) for i in range(300)]
    assert sum(map(len, texts)) > 16_384
    reply = client.embeddings.create(model="tiny-embed", input=texts)
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    # llama-cpp-python packs other groups of inputs into each decode: float noise of ~4e-5
    np.testing.assert_allclose(got, want(reference, texts), atol=1e-4)


def test_float_and_base64_encodings_carry_the_same_vector(gateway: str, reference: Any) -> None:
    with httpx.Client(base_url=gateway, timeout=10) as http:
        plain = http.post(
            "/v1/embeddings", json={"model": "tiny-embed", "input": "w4", "encoding_format": "float"}
        ).json()
        packed = http.post(
            "/v1/embeddings", json={"model": "tiny-embed", "input": "w4", "encoding_format": "base64"}
        ).json()
    assert plain["object"] == "list" and plain["data"][0]["object"] == "embedding"
    floats = np.array(plain["data"][0]["embedding"], dtype=np.float32)
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(floats, decoded)
    np.testing.assert_allclose(floats, want(reference, ["w4"])[0], atol=1e-5)


def test_token_lists_embed_like_their_text(client: openai.OpenAI, reference: Any) -> None:
    ids = [list(reference.tokenize(t.encode())) for t in TEXTS[:2]]
    one = client.embeddings.create(model="tiny-embed", input=ids[0], encoding_format="float")
    two = client.embeddings.create(model="tiny-embed", input=ids, encoding_format="float")
    expected = want(reference, TEXTS[:2])
    np.testing.assert_allclose(one.data[0].embedding, expected[0], atol=1e-5)
    np.testing.assert_allclose([d.embedding for d in two.data], expected, atol=1e-5)


async def test_concurrent_requests_each_get_their_own_vectors(gateway: str, reference: Any) -> None:
    aclient = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key="unused", max_retries=0)
    # within max_queue: one running and two waiting
    batches = [TEXTS[i : i + 2] for i in range(0, 6, 2)]
    replies = await asyncio.gather(*(aclient.embeddings.create(model="tiny-embed", input=b) for b in batches))
    await aclient.close()
    for batch, reply in zip(batches, replies, strict=True):
        np.testing.assert_allclose([d.embedding for d in reply.data], want(reference, batch), atol=1e-5)


def test_dimensions_must_be_the_models_own(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model="tiny-embed", input="w1", dimensions=32)
    assert len(reply.data[0].embedding) == 32
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="tiny-embed", input="w1", dimensions=16)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "32-dimensional" in caught.value.body["message"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": ["w1", ""]}, "input", "empty"),
        ({"input": [[2, 6, 99999]]}, "input", "vocabulary"),
        ({"input": " ".join(["w1"] * 200)}, "input", "maximum input length is 64 tokens"),
        ({"input": "w1", "encoding_format": "hex"}, "encoding_format", ""),
    ],
    ids=["empty-string", "token-out-of-vocab", "too-long", "bad-encoding"],
)
def test_bad_embedding_requests_are_400s(gateway: str, body: dict[str, Any], param: str, words: str) -> None:
    response = httpx.post(gateway + "/v1/embeddings", json={"model": "tiny-embed", **body}, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_an_embedding_model_does_not_generate(gateway: str, path: str) -> None:
    body = {"model": "tiny-embed", "messages": [{"role": "user", "content": "w1"}], "prompt": "w1"}
    body.pop("prompt" if "chat" in path else "messages")
    response = httpx.post(gateway + path, json=body, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_endpoint"
    assert "/v1/embeddings" in response.json()["error"]["message"]


def test_a_model_with_no_kv_cache_and_no_pooling_fails_start_up_clearly(tmp_path: Path) -> None:
    from backends.llamacpp import LlamaCppBackend, ModelLoadError
    from gateway.config import parse_config

    path = write_tiny_bert(tmp_path / "no-pooling.gguf", pooling=None)
    config = parse_config(
        {
            "backends": {"b": {"kind": "llamacpp", "model_path": str(path)}},
            "models": {"m": {"targets": ["b"]}},
        },
        "<test>",
    )
    backend = LlamaCppBackend("b", config.backends["b"])  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match=r"no-pooling\.gguf.*not a generative model"):
        asyncio.run(backend.start())


async def test_the_queue_is_bounded_and_counts_a_request_until_the_worker_lets_it_go(tiny_bert: Path) -> None:
    import threading

    from backends.llamacpp.embed import EmbeddingEngine, QueueFull
    from backends.llamacpp.model import Model

    engine = EmbeddingEngine(
        Model(str(tiny_bert), n_gpu_layers=0), n_ctx=512, n_threads=1, n_batch=64, parallel=2, max_queue=1
    )
    gate = threading.Event()
    embed = engine._embed
    engine._embed = lambda inputs: (gate.wait(10), embed(inputs))[1]  # type: ignore[method-assign]
    try:
        running = asyncio.create_task(engine.embed([[2, 6, 3]]))
        waiting = asyncio.create_task(engine.embed([[2, 7, 3]]))
        await asyncio.sleep(0.05)
        assert (engine.n_active, engine.n_waiting) == (1, 1)
        with pytest.raises(QueueFull):
            await engine.embed([[2, 8, 3]])
        waiting.cancel()  # its client left before the worker reached it: the place is free
        running.cancel()  # its client left mid-work: the worker still holds its place
        await asyncio.sleep(0.05)
        assert (engine.n_active, engine.n_waiting) == (1, 0)
        later = asyncio.create_task(engine.embed([[2, 8, 3]]))
        await asyncio.sleep(0.05)
        assert engine.n_waiting == 1
        gate.set()
        assert (await later)[0].shape == (32,)
        assert (engine.n_active, engine.n_waiting) == (0, 0)
    finally:
        gate.set()
        engine.close()


# ---- a decoder that pools its last token: an embedding model with a KV cache -------------------


@pytest.fixture(scope="module")
def last_token_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 with ``llama.pooling_type = last`` added to its metadata (as decoder-based embedding
    models such as Qwen3-Embedding declare it): a model with a KV cache that serves embeddings."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    from tests.conftest import smollm2_gguf

    path = tmp_path_factory.mktemp("gguf") / "smollm2-last.gguf"
    reader = gguf.GGUFReader(smollm2_gguf(), "r")
    writer = gguf.GGUFWriter(str(path), arch="llama", endianess=reader.endianess)
    copy_with_new_metadata(
        reader,
        writer,
        {"llama.pooling_type": MetadataDetails(gguf.GGUFValueType.UINT32, int(gguf.PoolingType.LAST))},
        [],
    )
    return path


def test_a_model_with_a_kv_cache_embeds_batch_after_batch_like_llama_cpp(last_token_model: Path) -> None:
    from llama_cpp import Llama

    from backends.base import BackendRequest
    from backends.llamacpp import LlamaCppBackend
    from gateway.config import parse_config

    texts = [
        f"Sentence number {i} is about {topic}."
        for i, topic in enumerate(["the sea", "a cat", "bread", "trains", "rain", "music", "stars"])
    ]
    # flash attention off on both sides: llama-cpp-python's flag does not pick the same CPU
    # attention path as the context's "on", and this model's vectors differ by 1e-2 between them
    reference = Llama(
        model_path=str(last_token_model), embedding=True, n_ctx=1024, flash_attn=False, verbose=False
    )
    expected = np.array(reference.embed(texts, normalize=True), dtype=np.float32)
    config = parse_config(
        {
            "backends": {
                "b": {
                    "kind": "llamacpp",
                    "model_path": str(last_token_model),
                    "n_ctx": 1024,
                    "parallel": 4,
                    "n_batch": 512,
                    "n_threads": 2,
                    "flash_attn": "off",
                }
            },
            "models": {"m": {"targets": ["b"]}},
        },
        "<test>",
    )
    backend = LlamaCppBackend("b", config.backends["b"])  # type: ignore[arg-type]

    async def run() -> tuple[Any, Any]:
        await backend.start()
        try:
            # 7 inputs over 4 sequences: two decodes, the cache cleared before each; an input may
            # use one sequence's cells, 1024 // 4, which binds before n_batch (512)
            reply = await backend.complete(
                BackendRequest("embeddings", {"model": "m", "input": texts, "encoding_format": "float"}, "r")
            )
            with pytest.raises(ContextLengthExceeded, match="maximum input length is 256 tokens"):
                await backend.complete(BackendRequest("embeddings", {"model": "m", "input": "w " * 400}, "r"))
            # refused on its length alone (a BPE token is at most a few dozen characters)
            huge = {"model": "m", "input": "w " * 30_000}
            with pytest.raises(ContextLengthExceeded, match="60,000 characters: at least"):
                await backend.complete(BackendRequest("embeddings", huge, "r"))
            return reply, await backend.health()
        finally:
            await backend.close()

    reply, health = asyncio.run(run())
    got = np.array([d["embedding"] for d in orjson.loads(reply.body)["data"]], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert health.ok
