"""The frameworks people reach Ollama through, unchanged and with their
default settings, against a real `ember serve` and the demo model:
LangChain (langchain-ollama, langchain-openai) and LlamaIndex
(llama-index-llms-ollama, llama-index-embeddings-ollama)."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel
from server_fixtures import CALL_SCHEMA, TOOLS_TEMPLATE, Server, create

QUESTION = "Say hello to Ada."


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    from ember.demo import demo_model_path

    srv = Server(tmp_path_factory.mktemp("client-models"))
    create(srv.url, "tooly", f'FROM {demo_model_path()}\nTEMPLATE """{TOOLS_TEMPLATE}"""\nPARAMETER num_ctx 512\nPARAMETER batch_invariant true\n')
    yield srv
    srv.stop()


def get_weather(city: str) -> str:
    """Current weather of a city."""
    return "sunny"


class Weather(BaseModel):
    city: Literal["Paris", "Rome"]
    sunny: bool


# --- LangChain --------------------------------------------------------------------------------
def test_langchain_chat_ollama(server: Server) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model="tooly", base_url=server.url, temperature=0, num_predict=8)
    whole = llm.invoke(QUESTION)
    assert isinstance(whole.content, str) and whole.content
    assert whole.usage_metadata and whole.usage_metadata["output_tokens"] <= 8
    chunks = list(llm.stream(QUESTION))
    assert len(chunks) > 1 and "".join(str(c.content) for c in chunks) == whole.content


def test_langchain_chat_ollama_tools_and_structured_output(server: Server) -> None:
    from langchain_ollama import ChatOllama

    # the format forces a call (the plumbing is under test, not the 270M model's judgement)
    llm = ChatOllama(model="tooly", base_url=server.url, temperature=0, num_predict=40, format=CALL_SCHEMA)
    msg = llm.bind_tools([get_weather]).invoke("What's the weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert msg.tool_calls[0]["id"]
    streamed = [c for chunk in llm.bind_tools([get_weather]).stream("Weather in Paris?") for c in chunk.tool_calls]
    assert [(c["name"], c["args"]) for c in streamed] == [("get_weather", {"city": "Paris"})]
    plain = ChatOllama(model="tooly", base_url=server.url, temperature=0, num_predict=40)
    out = plain.with_structured_output(Weather).invoke("Is it sunny in Paris?")
    assert isinstance(out, Weather) and out.city in ("Paris", "Rome")


def test_langchain_ollama_llm_and_embeddings(server: Server) -> None:
    from langchain_ollama import OllamaEmbeddings, OllamaLLM

    text = OllamaLLM(model="demo", base_url=server.url, temperature=0, num_predict=6).invoke("The capital of France is")
    assert isinstance(text, str) and text
    emb = OllamaEmbeddings(model="demo", base_url=server.url)  # sends a dozen null options
    docs = emb.embed_documents(["The cat sat.", "Stock markets fell."])
    query = emb.embed_query("The cat sat.")
    assert len(docs) == 2 and len(docs[0]) == len(query) == 640
    assert max(abs(a - b) for a, b in zip(docs[0], query)) < 1e-5


def test_langchain_chat_openai(server: Server) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="tooly", base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=8)
    whole = llm.invoke(QUESTION)
    assert isinstance(whole.content, str) and whole.content
    chunks = list(llm.stream(QUESTION))
    assert "".join(str(c.content) for c in chunks) == whole.content


# --- LlamaIndex -------------------------------------------------------------------------------
def test_llama_index_ollama(server: Server) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.ollama import Ollama

    # default settings: temperature and the rest go out as null
    llm = Ollama(model="tooly", base_url=server.url, request_timeout=300, additional_kwargs={"num_predict": 8})
    assert llm.complete(QUESTION).text
    reply = llm.chat([ChatMessage(role="user", content=QUESTION)])
    assert reply.message.content
    parts = list(llm.stream_chat([ChatMessage(role="user", content=QUESTION)]))
    assert parts and parts[-1].message.content


def test_llama_index_ollama_embedding(server: Server) -> None:
    from llama_index.embeddings.ollama import OllamaEmbedding

    emb = OllamaEmbedding(model_name="demo", base_url=server.url)
    a = emb.get_text_embedding("The cat sat.")
    b = emb.get_query_embedding("The cat sat.")
    assert len(a) == len(b) == 640
