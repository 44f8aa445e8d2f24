"""Data in: BEIR folders, ir-datasets ids and users' own corpora as streaming datasets; training sets and splits.

Every reader validates as it goes and names the file and line of a malformed record (:class:`DataError`).
"""

from sbmoe.data.beir import load_dataset
from sbmoe.data.corpus import load_corpus, read_queries
from sbmoe.data.dataset import DataError, Doc, RetrievalDataset, beir_text, texts_fingerprint
from sbmoe.data.splits import unseen_dev_split
from sbmoe.data.trainset import TrainSet, load_train_set
from sbmoe.paths import data_dir

__all__ = [
    "DataError",
    "Doc",
    "RetrievalDataset",
    "TrainSet",
    "beir_text",
    "data_dir",
    "load_corpus",
    "load_dataset",
    "load_train_set",
    "read_queries",
    "texts_fingerprint",
    "unseen_dev_split",
]
