"""Pruning internals, one module per concept (the ``prune`` stage in ``compress/prune.py`` uses them).

- ``structured``: :class:`StructuredPruner`, channel/unit/head removal to a MACs target on
  torch-pruning's dependency graph;
- ``importance``: the ranking criteria (l1, l2, bn_scale, taylor), recurrent units included;
- ``recurrent``: hidden-size pruning of LSTM/GRU/RNN layers;
- ``attention``: ``nn.MultiheadAttention`` -> :class:`PrunableAttention` and head removal;
- ``unstructured``: magnitude zeros and their compressed size;
- ``structure``: saving pruned models as safetensors and loading them with the original factory.

Submodules are imported on use, so that loading plain weights never imports torch-pruning.
"""
