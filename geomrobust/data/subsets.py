"""Deterministic subsets of a split: the first N examples, or the first N of each class."""

import numpy as np


def first_examples(images: np.ndarray, labels: np.ndarray, *, examples: int = 0,
                   per_class: int = 0, num_classes: int | None = None):
  """Returns ``(images, labels)`` restricted as asked, in dataset order.

  ``per_class`` > 0 keeps the first ``per_class`` examples of each class (the
  local-contrastive recipe's balanced sets); then ``examples`` > 0 keeps the
  first ``examples`` of what is left. 0 means no restriction.
  """
  if per_class:
    num_classes = num_classes or int(labels.max()) + 1
    keep = np.zeros(len(labels), bool)
    for c in range(num_classes):
      keep[np.flatnonzero(labels == c)[:per_class]] = True
    images, labels = images[keep], labels[keep]
  if examples:
    images, labels = images[:examples], labels[:examples]
  return images, labels
