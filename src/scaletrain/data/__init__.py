from scaletrain.data.cache import TokenCorpus, prepare_corpus
from scaletrain.data.rows import Batch, Rows, split_documents
from scaletrain.data.sampler import DistributedBatchSampler, Step
from scaletrain.data.sources import read_documents, resolve_files
from scaletrain.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe

__all__ = ["TokenCorpus", "prepare_corpus", "Batch", "Rows", "split_documents", "DistributedBatchSampler", "Step",
           "read_documents", "resolve_files", "ByteTokenizer", "HFTokenizer", "train_bpe"]
