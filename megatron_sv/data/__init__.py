"""Data: tokenizers (incl. sentencepiece training), the embedded stdlib corpus, atomic
indexed-dataset writing, parallel preprocessing, and GPT dataset builders on Megatron-Core.

Submodules are imported directly (e.g. `from megatron_sv.data.datasets import ...`) so that
light users (tokenizers, corpus) do not pay for importing megatron.core.
"""
