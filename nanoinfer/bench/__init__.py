"""Benchmarks shipped with the package: `nanoinfer bench` (compare.py) runs nanoinfer beside its
peers; kernels.py times the C kernels; quality.py scores weight formats by perplexity."""
