from scaletrain.data.cache import TokenCorpus, prepare_corpus
from scaletrain.data.sampler import DistributedBatchSampler, SequenceDataset
from scaletrain.data.sources import read_documents, resolve_files
from scaletrain.data.tokenizer import ByteTokenizer, HFTokenizer, train_bpe

__all__ = ["TokenCorpus", "prepare_corpus", "DistributedBatchSampler", "SequenceDataset", "read_documents",
           "resolve_files", "ByteTokenizer", "HFTokenizer", "train_bpe"]
