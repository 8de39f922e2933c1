"""Demo corpus: documents of several content domains gathered from Debian packages and Python."""

from server.tools.demo.corpus.build import CorpusStats, build_corpus, load_documents
from server.tools.demo.corpus.document import DOMAINS, Document, Roots

__all__ = ["DOMAINS", "CorpusStats", "Document", "Roots", "build_corpus", "load_documents"]
