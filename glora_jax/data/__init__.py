"""Data for glora_jax: tfds datasets read as array_record without TensorFlow, your own files,
tokenisation, k-shot sampling, numpy batches.

Bundled tasks (bbc_news, mnist5k) prepare themselves offline; VTAB-1k, GLUE and any
'tfds:<name>' read what the user prepared; task_data.open_task reads a run's config.data.
"""
from glora_jax.data import (bbc_news, files, glue, mnist, pipeline, prepared, sampling, task_data,
                            text, tfds_named, vtab)
from glora_jax.data.pipeline import BatchIterator, eval_iterator, train_iterator
from glora_jax.data.prepared import resolve_data_dir
from glora_jax.data.registry import (class_names, dataset_names, load_arrays, load_source,
                                     num_classes, splits)
from glora_jax.data.text import load_tokenizer, tokenize
from glora_jax.errors import DatasetNotPreparedError

__all__ = [
    'BatchIterator', 'DatasetNotPreparedError', 'bbc_news', 'class_names', 'dataset_names',
    'eval_iterator', 'files', 'glue', 'load_arrays', 'load_source',
    'load_tokenizer', 'mnist', 'num_classes', 'pipeline', 'prepared', 'resolve_data_dir',
    'sampling', 'splits', 'task_data', 'text', 'tfds_named', 'tokenize', 'train_iterator', 'vtab',
]
