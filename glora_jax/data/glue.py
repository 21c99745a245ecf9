"""GLUE on tfds's `glue/<task>` configs: each task's text features, label, metrics and dev splits.

GLUE's test labels are hidden (tfds stores -1), so scores are reported on the dev (validation) splits.
"""
from __future__ import annotations

import dataclasses
import os

from glora_jax.data import tfds_named

# Names glora_jax.metrics computes.
METRICS = ('accuracy', 'f1', 'matthews_corrcoef', 'pearson', 'spearman')


@dataclasses.dataclass(frozen=True)
class GlueTask:
  """One GLUE task: its tfds config, which features make its input and label, how it is scored.

  text_pair_key is '' for single-sentence tasks; num_classes 1 means regression (stsb's 0-5
  similarity, a float label). eval_splits are the dev splits reported (test labels are -1);
  the first is dev_split's answer.
  """
  name: str
  tfds_id: str
  text_key: str
  text_pair_key: str
  num_classes: int
  metrics: tuple[str, ...]
  headline: str  # The metric reported as the task's score.
  eval_splits: tuple[str, ...] = ('validation',)
  train_split: str = 'train'
  label_key: str = 'label'

  @property
  def regression(self) -> bool:
    return self.num_classes == 1

  @property
  def data_name(self) -> str:
    """The `data.name` that reads this task: 'tfds:glue/<task>'."""
    return tfds_named.PREFIX + self.tfds_id

  @property
  def keys(self) -> dict[str, str]:
    """Canonical keys for tfds_named.open_split."""
    keys = {'text': self.text_key, 'label': self.label_key}
    if self.text_pair_key:
      keys['text_pair'] = self.text_pair_key
    return keys


def _task(name, text_key, text_pair_key, num_classes, metrics, eval_splits=('validation',)):
  return GlueTask(name, f'glue/{name}', text_key, text_pair_key, num_classes, metrics,
                  headline=metrics[0], eval_splits=eval_splits)


_TASK_LIST = (
    _task('cola', 'sentence', '', 2, ('matthews_corrcoef',)),
    _task('sst2', 'sentence', '', 2, ('accuracy',)),
    _task('mrpc', 'sentence1', 'sentence2', 2, ('f1', 'accuracy')),
    _task('stsb', 'sentence1', 'sentence2', 1, ('pearson', 'spearman')),
    _task('qqp', 'question1', 'question2', 2, ('f1', 'accuracy')),
    _task('mnli', 'premise', 'hypothesis', 3, ('accuracy',),
          eval_splits=('validation_matched', 'validation_mismatched')),
    _task('qnli', 'question', 'sentence', 2, ('accuracy',)),
    _task('rte', 'sentence1', 'sentence2', 2, ('accuracy',)),
)
TASKS: dict[str, GlueTask] = {task.name: task for task in _TASK_LIST}


def get_task(task: str | GlueTask) -> GlueTask:
  """A task by name ('sst2', 'glue/sst2' or 'tfds:glue/sst2')."""
  if isinstance(task, GlueTask):
    return task
  name = task.removeprefix(tfds_named.PREFIX).removeprefix('glue/')
  if name not in TASKS:
    raise ValueError(f"unknown GLUE task '{task}'; expected one of {list(TASKS)}")
  return TASKS[name]


def dev_split(task: str | GlueTask) -> str:
  """The split a task is reported on: 'validation', or 'validation_matched' for mnli."""
  return get_task(task).eval_splits[0]


def open_split(task: str | GlueTask, split: str, data_dir: str | os.PathLike | None = None
               ) -> tfds_named.TfdsSource:
  """A split of a prepared GLUE task as {'text', 'text_pair'?, 'label'} examples."""
  task = get_task(task)
  return tfds_named.open_split(task.tfds_id, split, data_dir, task.keys)
